"""Subnet -> peer route table with longest-prefix match and a reverse index for source checks.

flannel's C proxy scans a list and takes the first match (§7.8), so with overlapping leases the
order of events decides where packets go. Here one dict per prefix length maps the network number
to the next hop, and lengths are tried longest first: a correct longest-prefix match, and a single
dict probe in the normal case where every lease has the same length.

Sans-IO: next hops are plain ``(ip, port)`` tuples that the engine hands to ``sendto`` and
compares with what ``recvfrom`` returns.
"""

from __future__ import annotations

from collections.abc import Iterable
from ipaddress import IPv4Address, IPv4Network

from lease.events import PeerAdded, PeerEvent, PeerRemoved, Snapshot
from udpflannel.packet import FORWARD, SPOOFED_SOURCE, UNKNOWN_PEER, Verdict

NextHop = tuple[str, int]

# (shift, {network number: next hop}), longest prefix first: what lookup iterates. Keys are the
# address shifted right by 32 - prefixlen, not the masked address: masked /24s all end in 8 zero bits,
# and CPython's dict indexes by the hash's low bits, so 10,000 of them took 3.4 probes per lookup on
# average instead of 1.4 (benchmarks/route_lookup.py).
_Level = tuple[int, dict[int, NextHop]]


def normalize_next_hop(next_hop: tuple[object, int]) -> NextHop:
    """``(ip, port)`` with the IP in the dotted form ``recvfrom`` reports, so lookups compare equal.
    The control plane hands over an ``IPv4Address``, formatted here once; anything else is parsed."""
    host, port = next_hop
    port = int(port)
    if not 0 <= port <= 0xFFFF:
        raise ValueError(f"next hop port out of range: {port}")
    return (str(host if isinstance(host, IPv4Address) else IPv4Address(host)), port)


def _mask(prefixlen: int) -> int:
    return (0xFFFFFFFF << (32 - prefixlen)) & 0xFFFFFFFF


class RouteTable:
    """subnet -> next hop. lookup is O(1) in the number of peers when all subnets share one prefix length
    (dict keyed by network number, one dict per distinct prefix length, lengths tried longest first), and
    still a correct longest-prefix match when lengths differ.

    A reverse index (peer -> its subnets, grouped by mask) answers :meth:`source_check` with a
    probe per distinct prefix length of that peer's subnets.
    """

    __slots__ = ("_routes", "_by_len", "_levels", "_by_peer", "version")

    def __init__(self, entries: Iterable[tuple[IPv4Network, NextHop]] = ()) -> None:
        # Bumped by every change: the C pass (udpflannel/lone.py) compiles the table again when it moves.
        self.version = 0
        self._routes: dict[IPv4Network, NextHop] = {}
        self._by_len: dict[int, dict[int, NextHop]] = {}
        self._levels: tuple[_Level, ...] = ()
        self._by_peer: dict[NextHop, dict[int, set[int]]] = {}
        for subnet, hop in entries:
            self.set(subnet, hop)

    # -- updates (control plane, rare) -------------------------------------------------------

    def set(self, subnet: IPv4Network, next_hop: NextHop) -> None:
        """Route ``subnet`` to ``next_hop``; the same network and mask replaces the next hop (§7.8)."""
        if not isinstance(subnet, IPv4Network):
            raise TypeError(f"subnet must be an IPv4Network, got {subnet!r}")
        hop = normalize_next_hop(next_hop)
        old = self._routes.get(subnet)
        if old == hop:
            return
        if old is not None:
            self._unindex_peer(subnet, old)
        self._routes[subnet] = hop
        net, plen = int(subnet.network_address), subnet.prefixlen
        level = self._by_len.get(plen)
        if level is None:
            level = self._by_len[plen] = {}
            self._rebuild_levels()
        level[net >> (32 - plen)] = hop
        self._by_peer.setdefault(hop, {}).setdefault(_mask(plen), set()).add(net)
        self.version += 1

    def delete(self, subnet: IPv4Network) -> bool:
        """Remove the route for exactly this network and mask; False if there was none."""
        hop = self._routes.pop(subnet, None)
        if hop is None:
            return False
        plen = subnet.prefixlen
        level = self._by_len[plen]
        del level[int(subnet.network_address) >> (32 - plen)]
        if not level:
            del self._by_len[plen]
            self._rebuild_levels()
        self._unindex_peer(subnet, hop)
        self.version += 1
        return True

    def replace_all(self, entries: Iterable[tuple[IPv4Network, NextHop]]) -> None:
        """Swap in a whole new table (after a resync); later duplicates win, as with repeated set."""
        fresh = RouteTable(entries)
        # Assign the finished structures, so a lookup never sees a half-built table.
        self._routes, self._by_len, self._by_peer = fresh._routes, fresh._by_len, fresh._by_peer
        self._levels = fresh._levels
        self.version += 1

    def _rebuild_levels(self) -> None:
        self._levels = tuple((32 - plen, self._by_len[plen]) for plen in sorted(self._by_len, reverse=True))

    def _unindex_peer(self, subnet: IPv4Network, hop: NextHop) -> None:
        groups = self._by_peer[hop]
        mask = int(subnet.netmask)
        members = groups[mask]
        members.discard(int(subnet.network_address))
        if not members:
            del groups[mask]
            if not groups:
                del self._by_peer[hop]

    # -- hot path ----------------------------------------------------------------------------

    def lookup(self, dst: int) -> NextHop | None:
        """Next hop for destination ``dst`` (host-order u32) by longest-prefix match, or None."""
        for shift, level in self._levels:
            hop = level.get(dst >> shift)
            if hop is not None:
                return hop
        return None

    def source_check(self, peer_addr: tuple[str, int], inner_src: int) -> Verdict:
        """Receive-side filter for a datagram from ``peer_addr`` whose inner source is ``inner_src``.

        FORWARD if the peer is a next hop and ``inner_src`` lies in one of the subnets routed to
        it; UNKNOWN_PEER if no route leads to that address and port; SPOOFED_SOURCE otherwise.
        flannel checks neither (§9.4 item 7), so anyone reaching the port can inject packets.
        """
        groups = self._by_peer.get(peer_addr)
        if groups is None:
            return UNKNOWN_PEER
        for mask, members in groups.items():
            if inner_src & mask in members:
                return FORWARD
        return SPOOFED_SOURCE

    def peer_known(self, peer_addr: tuple[str, int]) -> bool:
        """Whether some route leads to ``peer_addr`` (address and port)."""
        return peer_addr in self._by_peer

    # -- inspection --------------------------------------------------------------------------

    def subnet_of(self, dst: int) -> IPv4Network | None:
        """The leased subnet :meth:`lookup` matches for ``dst`` (for the packet trace, not the hot path)."""
        for shift, _ in self._levels:
            net = IPv4Network((dst >> shift << shift, 32 - shift))
            if net in self._routes:
                return net
        return None

    def subnets_of(self, peer_addr: tuple[str, int]) -> list[IPv4Network]:
        """The subnets routed to ``peer_addr`` (for the packet trace)."""
        return sorted(subnet for subnet, hop in self._routes.items() if hop == peer_addr)

    def prefix_lengths(self) -> list[int]:
        """Distinct prefix lengths, longest first: lookup probes at most one dict per length."""
        return [32 - shift for shift, _ in self._levels]

    def entries(self) -> list[tuple[IPv4Network, NextHop]]:
        """All routes, sorted by network then prefix length (stable output for logs and tests)."""
        return sorted(self._routes.items())

    def __len__(self) -> int:
        return len(self._routes)

    def __contains__(self, subnet: object) -> bool:
        return subnet in self._routes

    def __repr__(self) -> str:
        return f"RouteTable({self.entries()!r})"


def follow(routes: RouteTable, event: PeerEvent, port: int) -> str:
    """Apply a peer event from the control plane to ``routes`` (every peer listens on ``port``); returns
    the log line, in flanneld's words so operators can grep for the same lines. The one place that
    turns events into routes."""
    match event:
        case PeerAdded(subnet, public_ip):
            routes.set(subnet, (public_ip, port))
            return f"Subnet added: {subnet} via {public_ip}"
        case PeerRemoved(subnet):
            routes.delete(subnet)
            return f"Subnet removed: {subnet}"
        case Snapshot(peers):
            routes.replace_all((p.subnet, (p.public_ip, port)) for p in peers)
            return f"Resync: {len(peers)} peers"
    raise TypeError(f"not a peer event: {event!r}")
