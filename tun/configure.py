"""Configure the TUN exactly as flanneld does (reference §7.1), through netlink (pyroute2).

- address: the lease's *network* address as a /32 (``10.5.35.0/32``): no broadcast route, and
  host-originated overlay traffic gets a source inside the overlay;
- MTU: external interface MTU − 28 (20 bytes outer IPv4 + 8 bytes UDP);
- link up, with a transmit queue of :data:`TX_QUEUE` packets (not flanneld's: it keeps the kernel's
  500 for a TUN; the queue is not on the wire, so peers see no difference);
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

__all__ = ["ENCAP_OVERHEAD", "TX_QUEUE", "configure_tun", "readdress_tun"]

# Packets the kernel holds for the daemon to read. The TUN's default, 500, is what a busy node's
# pods fill in ~50 ms at 10 kpps: under the hostile test's flood (tests/test_hostile.py) the
# per-packet daemon, one process among a dozen on two vCPUs, was now and then away that long and
# the kernel dropped 198–298 of the pods' packets (ping replies among them) at a full flannel0.
# 1000 is an Ethernet device's default; TCP's own limit on queued bytes keeps bulk flows from
# filling it, so the extra room goes to bursts of small packets.
TX_QUEUE = 1000


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
        ipr.link("set", index=idx, mtu=mtu, txqlen=TX_QUEUE, state="up")
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
