"""Pick the external interface and addresses the way flanneld does (reference §9.1), via netlink.

- ``--iface`` (repeatable): a name, or an IPv4 address held by some interface; first hit wins;
- then ``--iface-regex`` (repeatable): matched against every IPv4 address, then every name;
- then ``--iface-can-reach IP``: the interface and preferred source of the route towards IP;
- with no selector: ``--public-ip`` if it is a local address, else the default route's interface.

``IfaceAddr`` (the UDP bind address) is the interface's first usable IPv4 address unless the
selector named one; ``ExtAddr`` (the lease's PublicIP) is ``--public-ip`` or ``IfaceAddr``.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from ipaddress import IPv4Address, ip_address

from pyroute2 import IPRoute

from udpflannel.errors import ConfigError, SetupError

IFA_F_TEMPORARY = 0x01
IFA_F_DEPRECATED = 0x20
IFA_F_PERMANENT = 0x80


@dataclass(frozen=True)
class ExternalInterface:
    name: str
    index: int
    iface_addr: IPv4Address  # bind address for the UDP socket
    ext_addr: IPv4Address  # published as the lease's PublicIP
    mtu: int


def _usable_addresses(ipr: IPRoute, index: int) -> list[IPv4Address]:
    """Global before link-local, permanent before dynamic, non-temporary before temporary."""
    ranked = []
    for msg in ipr.get_addr(family=2, index=index):
        addr = IPv4Address(msg.get_attr("IFA_ADDRESS") or msg.get_attr("IFA_LOCAL"))
        flags = msg.get_attr("IFA_FLAGS") or msg["flags"]
        if flags & IFA_F_DEPRECATED or addr.is_loopback or addr.is_multicast or addr.is_unspecified:
            continue
        ranked.append(((addr.is_link_local, not flags & IFA_F_PERMANENT, bool(flags & IFA_F_TEMPORARY)), addr))
    return [addr for _, addr in sorted(ranked, key=lambda r: r[0])]


def _links(ipr: IPRoute) -> list[tuple[int, str, int]]:
    return [(link["index"], link.get_attr("IFLA_IFNAME"), link.get_attr("IFLA_MTU") or 0) for link in ipr.get_links()]


def _by_address(ipr: IPRoute, addr: IPv4Address) -> tuple[int, IPv4Address] | None:
    for msg in ipr.get_addr(family=2):
        if IPv4Address(msg.get_attr("IFA_ADDRESS") or msg.get_attr("IFA_LOCAL")) == addr:
            return msg["index"], addr
    return None


def _parse_ip(field: str, value: str) -> IPv4Address | None:
    try:
        addr = ip_address(value)
    except ValueError:
        return None
    if not isinstance(addr, IPv4Address):
        raise ConfigError(field, f"{value} is not an IPv4 address")
    return addr


def select_interface(
    ifaces: list[str] | None = None,
    regexes: list[str] | None = None,
    can_reach: str | None = None,
    public_ip: str | None = None,
) -> ExternalInterface:
    """Resolve flanneld's interface flags into the interface, bind address, public address and MTU."""
    public = _parse_ip("--public-ip", public_ip) if public_ip else None
    if public_ip and public is None:
        raise ConfigError("--public-ip", f"{public_ip!r} is not an IP address")
    with IPRoute() as ipr:
        links = {index: (name, mtu) for index, name, mtu in _links(ipr)}
        found: tuple[int, IPv4Address | None] | None = None
        for sel in ifaces or []:
            addr = _parse_ip("--iface", sel)
            if addr is not None:
                found = _by_address(ipr, addr)
            else:
                found = next(((i, None) for i, (name, _) in links.items() if name == sel), None)
            if found:
                break
        for pattern in [] if found else regexes or []:
            try:
                rx = re.compile(pattern)
            except re.error as exc:
                raise ConfigError("--iface-regex", f"{pattern!r} is not a valid regular expression: {exc}") from exc
            for msg in ipr.get_addr(family=2):
                addr = IPv4Address(msg.get_attr("IFA_ADDRESS"))
                if rx.search(str(addr)):
                    found = (msg["index"], addr)
                    break
            else:  # by name: the first matching interface that has a usable IPv4 address
                found = next(((i, None) for i, (name, _) in links.items() if rx.search(name) and _usable_addresses(ipr, i)), None)
            if found:
                break
        if not found and can_reach:
            target = _parse_ip("--iface-can-reach", can_reach)
            if target is None:
                raise ConfigError("--iface-can-reach", f"{can_reach!r} is not an IP address")
            route = ipr.route("get", dst=str(target))[0]
            prefsrc = route.get_attr("RTA_PREFSRC")
            found = (route.get_attr("RTA_OIF"), IPv4Address(prefsrc) if prefsrc else None)
        if not found and not (ifaces or regexes or can_reach):
            if public is not None:
                found = _by_address(ipr, public)
            else:
                found = _default_route_interface(ipr)
        if not found:
            raise SetupError("Failed to find any valid interface to use (check --iface, --iface-regex, --iface-can-reach, --public-ip)")
        index, iface_addr = found
        name, mtu = links[index]
        if iface_addr is None:
            usable = _usable_addresses(ipr, index)
            if not usable:
                raise SetupError(f"interface {name} has no usable IPv4 address")
            iface_addr = usable[0]
    if not mtu:
        raise SetupError(f"interface {name} has MTU 0")
    return ExternalInterface(name=name, index=index, iface_addr=iface_addr, ext_addr=public or iface_addr, mtu=mtu)


def _default_route_interface(ipr: IPRoute) -> tuple[int, None] | None:
    for route in ipr.get_routes(family=2, table=254):
        if route["dst_len"] == 0:
            oif = route.get_attr("RTA_OIF")
            if not oif:
                raise SetupError("the default route is multipath; choose the interface with --iface")
            return oif, None
    return None
