"""Interface and address selection as flanneld's (reference §9.1), on real links in a namespace."""

from __future__ import annotations

import json
import sys

import pytest

from udpflannel.lab.netns import Lab

PROBE = """
import json, sys
from udpflannel.iface import select_interface
from udpflannel.errors import FAMILIES
kw = json.loads(sys.argv[1])
try:
    e = select_interface(kw.get("ifaces"), kw.get("regexes"), kw.get("can_reach"), kw.get("public_ip"))
    print(json.dumps([e.name, str(e.iface_addr), str(e.ext_addr), e.mtu]))
except FAMILIES as exc:
    print(json.dumps(["error", type(exc).__name__, str(exc)]))
"""


@pytest.fixture
def host(lab: Lab):
    node = lab.add_node(1)
    node.ip("route", "add", "default", "via", "198.18.0.254")
    node.ip("link", "add", "ens9", "mtu", "9000", "type", "veth", "peer", "name", "ens9p")  # no dummy module needed
    node.ip("addr", "add", "192.0.2.5/24", "dev", "ens9")
    node.ip("link", "set", "ens9", "up")
    return node


def select(host, **kw) -> list:
    return json.loads(host.run(sys.executable, "-c", PROBE, json.dumps(kw)).stdout)


@pytest.mark.parametrize(("kw", "expected"), [
    ({}, ["eth0", "198.18.0.1", "198.18.0.1", 1500]),
    ({"ifaces": ["ens9"]}, ["ens9", "192.0.2.5", "192.0.2.5", 9000]),
    ({"ifaces": ["192.0.2.5"]}, ["ens9", "192.0.2.5", "192.0.2.5", 9000]),
    ({"ifaces": ["nope0", "eth0"]}, ["eth0", "198.18.0.1", "198.18.0.1", 1500]),
    ({"regexes": [r"^192\.0\.2\."]}, ["ens9", "192.0.2.5", "192.0.2.5", 9000]),
    ({"regexes": ["^ens"]}, ["ens9", "192.0.2.5", "192.0.2.5", 9000]),
    ({"can_reach": "198.18.0.254"}, ["eth0", "198.18.0.1", "198.18.0.1", 1500]),
    ({"ifaces": ["eth0"], "public_ip": "203.0.113.9"}, ["eth0", "198.18.0.1", "203.0.113.9", 1500]),
    ({"public_ip": "192.0.2.5"}, ["ens9", "192.0.2.5", "192.0.2.5", 9000]),
])
def test_selection(host, kw, expected):
    assert select(host, **kw) == expected


def test_public_ip_alone_must_be_local(host):
    assert select(host, public_ip="203.0.113.9")[:2] == ["error", "SetupError"]


def test_nothing_matches(host):
    result = select(host, ifaces=["nope0"], regexes=["^zzz"])
    assert result[:2] == ["error", "SetupError"] and "Failed to find any valid interface" in result[2]


def test_bad_regex_names_the_flag(host):
    result = select(host, regexes=["("])
    assert result[:2] == ["error", "ConfigError"] and result[2].startswith("--iface-regex")
