"""Static mode: the dataplane without etcd, routes from the command line — for labs and teaching.

    udpflannel static --iface eth0 --subnet 10.5.1.0/24 --network 10.5.0.0/16 \\
                      --route 10.5.2.0/24=198.18.0.2 [--route ...] [--port 8285]

Every ``--route SUBNET=PUBLIC_IP`` is one peer, exactly as if its lease had appeared in etcd.
"""

from __future__ import annotations

import logging
from ipaddress import IPv4Address, IPv4Network

from lease.events import PeerAdded
from udpflannel.errors import ConfigError

log = logging.getLogger(__name__)


def parse_network(field: str, value: str) -> IPv4Network:
    try:
        return IPv4Network(value, strict=False)
    except ValueError as exc:
        raise ConfigError(field, f"{value!r} is not an IPv4 CIDR ({exc})") from exc


def parse_route(spec: str) -> PeerAdded:
    """``10.5.2.0/24=198.18.0.2`` → PeerAdded(10.5.2.0/24, 198.18.0.2)."""
    subnet, sep, public_ip = spec.partition("=")
    if not sep:
        raise ConfigError("--route", f"{spec!r} should look like SUBNET=PUBLIC_IP, e.g. 10.5.2.0/24=198.18.0.2")
    try:
        address = IPv4Address(public_ip)
    except ValueError as exc:
        raise ConfigError("--route", f"{public_ip!r} in {spec!r} is not an IPv4 address") from exc
    return PeerAdded(parse_network("--route", subnet), address)


def check_static_layout(subnet: IPv4Network, network: IPv4Network, routes: list[PeerAdded], port: int) -> None:
    """Refuse layouts that cannot work instead of failing one packet at a time."""
    if not 0 < port < 65536:
        raise ConfigError("--port", f"{port} is not a UDP port (1-65535)")
    if not subnet.subnet_of(network):
        raise ConfigError("--subnet", f"{subnet} is not inside --network {network}")
    for route in routes:
        if not route.subnet.subnet_of(network):
            raise ConfigError("--route", f"{route.subnet} is not inside --network {network}")
        if route.subnet.overlaps(subnet):
            raise ConfigError("--route", f"{route.subnet} overlaps this node's own --subnet {subnet}")
