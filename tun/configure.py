"""Configure the TUN exactly as flanneld does (reference §7.1), through netlink (pyroute2).

- address: the lease's *network* address as a /32 (``10.5.35.0/32``): no broadcast route, and
  host-originated overlay traffic gets a source inside the overlay;
- MTU: external interface MTU − 28 (20 bytes outer IPv4 + 8 bytes UDP);
- link up;
- one route for the whole overlay network via the device (``EEXIST`` tolerated), no per-peer routes:
  the daemon, not the kernel, picks the peer.
"""

from __future__ import annotations

import errno
from ipaddress import IPv4Network

from pyroute2 import IPRoute
from pyroute2.netlink.exceptions import NetlinkError

from tun.errors import TunError
from tun.layout import ENCAP_OVERHEAD

__all__ = ["ENCAP_OVERHEAD", "configure_tun", "readdress_tun"]


def _index(ipr: IPRoute, ifname: str) -> int:
    found = ipr.link_lookup(ifname=ifname)
    if not found:
        raise TunError(f"interface {ifname!r} does not exist")
    return found[0]


def configure_tun(ifname: str, lease_subnet: IPv4Network, network: IPv4Network, mtu: int) -> None:
    """Address, MTU, up, overlay route. ``mtu`` is the TUN MTU (already minus the overhead)."""
    with IPRoute() as ipr:
        idx = _index(ipr, ifname)
        try:
            ipr.addr("add", index=idx, address=str(lease_subnet.network_address), prefixlen=32)
        except NetlinkError as exc:
            raise TunError(f"cannot add {lease_subnet.network_address}/32 to {ifname}: {exc}") from exc
        ipr.link("set", index=idx, mtu=mtu, state="up")
        try:
            ipr.route("add", dst=str(network), oif=idx, scope=0)
        except NetlinkError as exc:
            if exc.code != errno.EEXIST:
                raise TunError(f"cannot add route {network} dev {ifname}: {exc}") from exc


def readdress_tun(ifname: str, old: IPv4Network, new: IPv4Network) -> None:
    """Move the TUN to a new lease (our subnet changed after losing the old lease).

    The new address goes on first: removing a device's last IPv4 address makes the kernel flush every
    route through it, the overlay route included.
    """
    with IPRoute() as ipr:
        idx = _index(ipr, ifname)
        try:
            ipr.addr("add", index=idx, address=str(new.network_address), prefixlen=32)
        except NetlinkError as exc:
            if exc.code != errno.EEXIST:
                raise TunError(f"cannot add {new.network_address}/32 to {ifname}: {exc}") from exc
        try:
            ipr.addr("del", index=idx, address=str(old.network_address), prefixlen=32)
        except NetlinkError as exc:
            if exc.code != errno.EADDRNOTAVAIL:
                raise TunError(f"cannot remove {old.network_address}/32 from {ifname}: {exc}") from exc
