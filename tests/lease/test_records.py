"""lease.records: byte-exact values, flanneld's key format, and what a watch must ignore."""

from __future__ import annotations

from ipaddress import IPv4Address, IPv4Network

import pytest

from lease.records import (
    LeaseAttrs,
    Malformed,
    SubnetKey,
    clean_prefix,
    config_key,
    decode_lease_value,
    encode_lease_value,
    make_subnet_key,
    parse_subnet_key,
    subnets_dir,
)

P = "/coreos.com/network"

# Verbatim from the reference (§3): what flanneld's UDP backend writes, and a vxlan lease.
FLANNELD_UDP_VALUE = b'{"PublicIP":"192.168.1.10","PublicIPv6":null}'
FLANNELD_VXLAN_VALUE = (
    b'{"PublicIP":"192.168.64.3","PublicIPv6":null,"BackendType":"vxlan",'
    b'"BackendData":{"VNI":1,"VtepMAC":"c6:d2:32:6f:8f:44"}}'
)


def test_value_is_byte_identical_to_flanneld():
    assert encode_lease_value(IPv4Address("192.168.1.10")) == FLANNELD_UDP_VALUE


def test_key_is_byte_identical_to_flanneld():
    assert make_subnet_key(P, IPv4Network("10.5.35.0/24")) == "/coreos.com/network/subnets/10.5.35.0-24"
    assert config_key(P) == "/coreos.com/network/config"


@pytest.mark.parametrize("prefix", ["/coreos.com/network/", "/coreos.com//network", "//coreos.com/network//"])
def test_prefix_is_cleaned_like_path_join(prefix):
    assert clean_prefix(prefix) == P
    assert subnets_dir(prefix) == "/coreos.com/network/subnets/"


def test_decode_flanneld_and_vxlan_values():
    assert decode_lease_value(FLANNELD_UDP_VALUE) == LeaseAttrs(IPv4Address("192.168.1.10"))
    assert decode_lease_value(FLANNELD_VXLAN_VALUE) == LeaseAttrs(IPv4Address("192.168.64.3"), "vxlan")
    # Case-insensitive keys and unknown keys, like Go's json.Unmarshal.
    assert decode_lease_value(b'{"publicip":"10.0.0.1","Extra":{"a":1}}') == LeaseAttrs(IPv4Address("10.0.0.1"))
    # A missing PublicIP is Go's zero value.
    assert decode_lease_value(b'{"PublicIPv6":null}') == LeaseAttrs(IPv4Address("0.0.0.0"))


@pytest.mark.parametrize(
    "value",
    [b"", b"not json", b"[1]", b'{"PublicIP":"fc00::1"}', b'{"PublicIP":"300.1.1.1"}', b'{"PublicIP":7}',
     b'{"PublicIP":"10.0.0.1","BackendType":5}', b"\xff\xfe"],
)
def test_malformed_values_are_values_not_exceptions(value):
    assert isinstance(decode_lease_value(value), Malformed)


@pytest.mark.parametrize(
    "tail,expected",
    [
        ("10.5.35.0-24", SubnetKey(IPv4Network("10.5.35.0/24"))),
        ("10.5.35.0-31", SubnetKey(IPv4Network("10.5.35.0/31"))),
        ("10.5.35.7-24", SubnetKey(IPv4Network("10.5.35.0/24"), host_bits=True)),
        ("10.5.35.0-24&fc00:0:0:1::-64", SubnetKey(IPv4Network("10.5.35.0/24"), dual_stack=True)),
    ],
)
def test_parse_good_keys(tail, expected):
    assert parse_subnet_key(P, f"{P}/subnets/{tail}") == expected
    assert parse_subnet_key(P, f"{P}/subnets/{tail}".encode()) == expected


@pytest.mark.parametrize(
    "key",
    [
        f"{P}/subnets/10.5.35.0-32",  # Go parses the length in 5 bits
        f"{P}/subnets/10.5.35.0-24 ",
        f"{P}/subnets/10.5.35-24",
        f"{P}/subnets/300.5.35.0-24",
        f"{P}/subnets/10.5.35.0-24&FC00::-64",  # Go's regex only takes lower-case hex
        f"{P}/subnets/10.5.35.0-24&fc00::-200",
        f"{P}/subnets/garbage",
        f"{P}/subnets_old/10.5.1.0-24",  # shares the byte prefix, but is not under subnets/
        f"{P}/subnets/old/10.5.1.0-24",  # deeper than directly under subnets/
        "/other/network/subnets/10.5.1.0-24",
        b"/coreos.com/network/subnets/\xff",
    ],
)
def test_parse_bad_keys(key):
    assert isinstance(parse_subnet_key(P, key), Malformed)


def test_make_then_parse_round_trips():
    for plen in range(8, 32):
        net = IPv4Network((0x0A050000, plen), strict=False)
        assert parse_subnet_key(P, make_subnet_key(P, net)) == SubnetKey(net)
