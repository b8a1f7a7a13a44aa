"""``--ip-blackhole-route``: a blackhole route for the node's own subnet, through netlink (pyroute2).

Without it, a packet for an address of our subnet that no pod holds (no /32 route, no ``cni0``) follows
the overlay route into ``flannel0`` and comes back as net-unreachable from the daemon; with it the
kernel drops it at once. flanneld adds the route with metric 0 (``pkg/ip.AddBlackholeV4Route``), and we
measured in a namespace what that does next to ``cni0``'s connected route for the same /24 (metric 0
too): if ``cni0`` came first, the add fails with EEXIST (flanneld logs it every resync period); if the
blackhole came first (flanneld starts before the first pod), the kernel appends ``cni0``'s route *after*
it and the blackhole wins: the node can no longer reach its own pods. So ours has the highest metric
there is: any other route for the subnet wins, the blackhole only catches what nothing else routes.
A metric-0 blackhole for our subnet (flanneld's, after a migration) is replaced by ours.

Call these from a worker thread (``asyncio.to_thread``): pyroute2's synchronous API runs its own loop.
"""

from __future__ import annotations

import errno
import socket
from ipaddress import IPv4Network

from pyroute2 import IPRoute
from pyroute2.netlink.exceptions import NetlinkError

from udpflannel.errors import SetupError

RTN_BLACKHOLE = 6  # linux/rtnetlink.h: "drop silently"
MAIN_TABLE = 254  # RT_TABLE_MAIN
METRIC = 0xFFFF_FFFF  # the largest RTA_PRIORITY: loses to every other route for the same prefix


def _metrics(ipr: IPRoute, subnet: IPv4Network) -> list[int]:
    """The metrics of the blackhole routes for exactly ``subnet`` in the main table."""
    found = []
    for route in ipr.get_routes(family=socket.AF_INET, table=MAIN_TABLE):
        if (route["type"] == RTN_BLACKHOLE and route["dst_len"] == subnet.prefixlen
                and route.get_attr("RTA_DST") == str(subnet.network_address)):
            found.append(route.get_attr("RTA_PRIORITY") or 0)
    return found


def blackhole_present(subnet: IPv4Network) -> bool:
    """Is our blackhole route for ``subnet`` there, and no other one that would shadow cni0?"""
    with IPRoute() as ipr:
        return _metrics(ipr, subnet) == [METRIC]


def _delete_lowest(ipr: IPRoute, subnet: IPv4Network) -> None:
    # metric 0 in a delete request is a wildcard: the kernel removes the first match, the lowest metric
    ipr.route("del", dst=str(subnet), type=RTN_BLACKHOLE, table=MAIN_TABLE)


def ensure_blackhole(subnet: IPv4Network) -> None:
    """Add our blackhole route for ``subnet`` if it is missing; remove other blackholes for it."""
    try:
        with IPRoute() as ipr:
            metrics = _metrics(ipr, subnet)
            for _ in [m for m in metrics if m != METRIC]:
                _delete_lowest(ipr, subnet)  # ours has the highest metric, so the lowest is never ours
            if METRIC not in metrics:
                try:
                    ipr.route("add", dst=str(subnet), type=RTN_BLACKHOLE, table=MAIN_TABLE, priority=METRIC)
                except NetlinkError as exc:
                    if exc.code != errno.EEXIST:
                        raise
    except NetlinkError as exc:
        raise SetupError(f"cannot add blackhole route {subnet} metric {METRIC}: {exc}") from exc


def remove_blackhole(subnet: IPv4Network) -> int:
    """Remove every blackhole route for ``subnet`` (our lease moved away from it); returns how many."""
    try:
        with IPRoute() as ipr:
            metrics = _metrics(ipr, subnet)
            for _ in metrics:
                _delete_lowest(ipr, subnet)
    except NetlinkError as exc:
        raise SetupError(f"cannot remove blackhole route {subnet}: {exc}") from exc
    return len(metrics)
