"""udpflannel.routes: the fast route table against a slow obvious one, and its semantics."""

from __future__ import annotations

from ipaddress import IPv4Address, IPv4Network

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, rule

from tests.strategies import crowded_addresses, crowded_subnets, mask, next_hops
from udpflannel.packet import Verdict
from udpflannel.routes import RouteTable

A = ("192.168.0.1", 8285)
B = ("192.168.0.2", 8285)


def net(cidr: str) -> IPv4Network:
    return IPv4Network(cidr)


def ip(addr: str) -> int:
    return int(IPv4Address(addr))


class SlowTable:
    """The obvious model: a dict of routes, scanned in full for every question."""

    def __init__(self) -> None:
        self.routes: dict[IPv4Network, tuple[str, int]] = {}

    def covering(self, addr: int) -> list[IPv4Network]:
        return [s for s in self.routes if addr & mask(s.prefixlen) == int(s.network_address)]

    def lookup(self, addr: int) -> tuple[str, int] | None:
        best = max(self.covering(addr), key=lambda s: s.prefixlen, default=None)
        return None if best is None else self.routes[best]

    def source_check(self, peer: tuple[str, int], src: int) -> Verdict:
        if peer not in self.routes.values():
            return Verdict.UNKNOWN_PEER
        if any(self.routes[s] == peer for s in self.covering(src)):
            return Verdict.FORWARD
        return Verdict.SPOOFED_SOURCE


class FastMatchesSlow(RuleBasedStateMachine):
    """Random set/delete/replace_all sequences; after each, every answer matches the slow model."""

    def __init__(self) -> None:
        super().__init__()
        self.fast = RouteTable()
        self.slow = SlowTable()

    @rule(subnet=crowded_subnets, hop=next_hops)
    def set(self, subnet: IPv4Network, hop: tuple[str, int]) -> None:
        self.fast.set(subnet, hop)
        self.slow.routes[subnet] = hop

    @rule(data=st.data())
    def delete_known(self, data: st.DataObject) -> None:
        if self.slow.routes:
            subnet = data.draw(st.sampled_from(sorted(self.slow.routes)))
            assert self.fast.delete(subnet)
            del self.slow.routes[subnet]

    @rule(subnet=crowded_subnets)
    def delete_any(self, subnet: IPv4Network) -> None:
        assert self.fast.delete(subnet) is (self.slow.routes.pop(subnet, None) is not None)

    @rule(entries=st.lists(st.tuples(crowded_subnets, next_hops), max_size=12))
    def replace_all(self, entries: list[tuple[IPv4Network, tuple[str, int]]]) -> None:
        self.fast.replace_all(entries)
        self.slow.routes = dict(entries)

    @rule(addrs=st.lists(crowded_addresses, max_size=8), peer=next_hops)
    def lookups_agree(self, addrs: list[int], peer: tuple[str, int]) -> None:
        # Probe every route's edges too: first address, last address, and just outside.
        for s in self.slow.routes:
            first, last = int(s.network_address), int(s.broadcast_address)
            addrs += [first, last, (first - 1) % 2**32, (last + 1) % 2**32]
        for addr in addrs:
            assert self.fast.lookup(addr) == self.slow.lookup(addr), IPv4Address(addr)
            assert self.fast.source_check(peer, addr) == self.slow.source_check(peer, addr)

    @invariant()
    def same_contents(self) -> None:
        assert self.fast.entries() == sorted(self.slow.routes.items())
        assert len(self.fast) == len(self.slow.routes)
        assert self.fast.prefix_lengths() == sorted({s.prefixlen for s in self.slow.routes}, reverse=True)
        for subnet in self.slow.routes:
            assert subnet in self.fast
        for hop in [A, B, ("192.168.0.3", 8285), ("192.168.0.1", 8286)]:
            assert self.fast.peer_known(hop) is (hop in self.slow.routes.values())


TestFastMatchesSlow = FastMatchesSlow.TestCase
TestFastMatchesSlow.settings = settings(max_examples=60, stateful_step_count=30, deadline=None)


@given(st.lists(st.tuples(crowded_subnets, next_hops), max_size=20), st.lists(crowded_addresses, max_size=20))
def test_constructor_equals_replace_all_and_slow_lookup(entries, addrs) -> None:
    built = RouteTable(entries)
    replaced = RouteTable([(net("10.0.0.0/8"), A)])
    replaced.replace_all(entries)
    slow = SlowTable()
    slow.routes = dict(entries)
    assert built.entries() == replaced.entries() == sorted(slow.routes.items())
    for addr in addrs:
        assert built.lookup(addr) == replaced.lookup(addr) == slow.lookup(addr)


def test_longest_prefix_wins_whatever_the_order() -> None:
    """flannel's first-match scan sends 10.5.7.9 to the /16 if it was added first (§7.8)."""
    for order in ([("10.5.0.0/16", A), ("10.5.7.0/24", B)], [("10.5.7.0/24", B), ("10.5.0.0/16", A)]):
        table = RouteTable((net(c), hop) for c, hop in order)
        assert table.lookup(ip("10.5.7.9")) == B
        assert table.lookup(ip("10.5.8.9")) == A
        assert table.lookup(ip("10.6.0.1")) is None


def test_set_replaces_next_hop_of_same_subnet() -> None:
    table = RouteTable()
    table.set(net("10.5.35.0/24"), A)
    table.set(net("10.5.35.0/24"), B)
    assert len(table) == 1
    assert table.entries() == [(net("10.5.35.0/24"), B)]
    assert table.lookup(ip("10.5.35.200")) == B
    assert not table.peer_known(A) and table.peer_known(B)
    assert table.source_check(A, ip("10.5.35.2")) == Verdict.UNKNOWN_PEER


def test_same_network_other_mask_is_another_route() -> None:
    table = RouteTable([(net("10.5.0.0/16"), A), (net("10.5.0.0/24"), B)])
    assert len(table) == 2
    assert table.delete(net("10.5.0.0/24"))
    assert table.lookup(ip("10.5.0.1")) == A
    assert net("10.5.0.0/16") in table and net("10.5.0.0/24") not in table


def test_delete() -> None:
    table = RouteTable([(net("10.5.35.0/24"), A)])
    assert not table.delete(net("10.5.36.0/24"))
    assert not table.delete(net("10.5.35.0/25"))
    assert table.delete(net("10.5.35.0/24"))
    assert not table.delete(net("10.5.35.0/24"))
    assert len(table) == 0 and table.lookup(ip("10.5.35.1")) is None
    assert not table.peer_known(A)


def test_next_hops_are_normalized_for_sendto_and_recvfrom() -> None:
    table = RouteTable()
    table.set(net("10.5.1.0/24"), (IPv4Address("192.168.0.1"), "8285"))
    assert table.lookup(ip("10.5.1.1")) == A
    assert type(table.lookup(ip("10.5.1.1"))[1]) is int
    assert table.peer_known(A)
    for bad in [("192.168.0.1", 70000), ("192.168.0.1", -1), ("::1", 8285), ("not-an-ip", 8285)]:
        with pytest.raises(ValueError):
            table.set(net("10.5.2.0/24"), bad)
    with pytest.raises(TypeError):
        table.set("10.5.2.0/24", A)
    assert len(table) == 1


def test_default_and_host_routes() -> None:
    table = RouteTable([(net("0.0.0.0/0"), A), (net("10.5.1.7/32"), B)])
    assert table.lookup(0) == A and table.lookup(0xFFFFFFFF) == A
    assert table.lookup(ip("10.5.1.7")) == B and table.lookup(ip("10.5.1.6")) == A


def test_source_check() -> None:
    table = RouteTable([(net("10.5.1.0/24"), A), (net("10.5.9.0/24"), A), (net("10.5.2.0/24"), B)])
    assert table.source_check(A, ip("10.5.1.9")) == Verdict.FORWARD
    assert table.source_check(A, ip("10.5.9.255")) == Verdict.FORWARD  # a peer may hold several
    assert table.source_check(A, ip("10.5.2.9")) == Verdict.SPOOFED_SOURCE  # B's subnet
    assert table.source_check(A, ip("8.8.8.8")) == Verdict.SPOOFED_SOURCE
    assert table.source_check(B, ip("10.5.2.1")) == Verdict.FORWARD
    assert table.source_check(("192.168.0.1", 8286), ip("10.5.1.9")) == Verdict.UNKNOWN_PEER  # port
    assert table.source_check(("192.168.0.9", 8285), ip("10.5.1.9")) == Verdict.UNKNOWN_PEER
    table.delete(net("10.5.1.0/24"))
    assert table.source_check(A, ip("10.5.1.9")) == Verdict.SPOOFED_SOURCE
    table.delete(net("10.5.9.0/24"))
    assert table.source_check(A, ip("10.5.9.1")) == Verdict.UNKNOWN_PEER


def test_replace_all_drops_old_routes_and_peers() -> None:
    table = RouteTable([(net("10.5.1.0/24"), A), (net("10.6.0.0/16"), A)])
    table.replace_all([(net("10.5.2.0/24"), B), (net("10.5.2.0/24"), A)])  # the later duplicate wins
    assert table.entries() == [(net("10.5.2.0/24"), A)]
    assert table.lookup(ip("10.5.1.1")) is None and table.lookup(ip("10.6.1.1")) is None
    assert not table.peer_known(B)
    table.replace_all([])
    assert len(table) == 0 and not table.peer_known(A)


def test_peer_events_become_routes_and_flanneld_log_lines() -> None:
    from lease.events import PeerAdded, PeerRemoved, Snapshot
    from udpflannel.routes import follow

    table = RouteTable()
    line = follow(table, PeerAdded(net("10.5.1.0/24"), IPv4Address("192.168.0.1")), 8285)
    assert line == "Subnet added: 10.5.1.0/24 via 192.168.0.1"
    assert sorted(table.entries()) == [(net("10.5.1.0/24"), ("192.168.0.1", 8285))]
    assert follow(table, PeerRemoved(net("10.5.1.0/24")), 8285) == "Subnet removed: 10.5.1.0/24"
    assert list(table.entries()) == []
    snapshot = Snapshot((PeerAdded(net("10.5.2.0/24"), IPv4Address("192.168.0.2")),
                         PeerAdded(net("10.5.3.0/24"), IPv4Address("192.168.0.3"))))
    assert follow(table, snapshot, 9000) == "Resync: 2 peers"
    assert sorted(table.entries()) == [(net("10.5.2.0/24"), ("192.168.0.2", 9000)),
                                       (net("10.5.3.0/24"), ("192.168.0.3", 9000))]
    with pytest.raises(TypeError):
        follow(table, "not an event", 8285)  # type: ignore[arg-type]


@given(st.lists(st.tuples(crowded_subnets, next_hops), max_size=12), crowded_addresses)
def test_subnet_of_is_the_subnet_whose_next_hop_lookup_returns(entries, addr):
    """The packet trace's ``subnet_of`` names the longest-prefix match, as the slow model does."""
    table, slow = RouteTable(), SlowTable()
    for subnet, hop in entries:
        table.set(subnet, hop)
        slow.routes[subnet] = hop
    best = max(slow.covering(addr), key=lambda s: s.prefixlen, default=None)
    assert table.subnet_of(addr) == best
    if best is not None:
        assert table.lookup(addr) == slow.routes[best] and best in table.subnets_of(slow.routes[best])
