"""The C pass (udpflannel/_lone.c): its decisions are udpflannel.forward's, byte for byte (hypothesis),
and what it cannot take reaches the Python movers with nothing lost, on real sockets with real faults.

The engine's ordinary traffic through the C pass is covered by tests/test_engine.py's ``rig`` (run both
ways) and by every namespace test; here: what hands over, and the route table it compiles.
"""

from __future__ import annotations

import asyncio
import socket
import struct
from ipaddress import IPv4Address, IPv4Network

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from lease.events import PeerAdded
from tests.conftest import require_lone_pass
from tests.strategies import (
    crowded_addresses,
    crowded_subnets,
    ipv4_packets,
    next_hops,
    slow_checksum,
    slow_header_checksum,
)
from tests.test_engine import IcmpRecorder, after_one_hop, ip_packet, until
from tests.test_engine import Rig as PacketRig
from tests.test_fastpath import Rig as FastRig
from tests.test_fastpath import tcp_flow, tso_hdr
from tun import vnet
from udpflannel import lone
from udpflannel.forward import inbound, outbound
from udpflannel.packet import Verdict
from udpflannel.routes import RouteTable, follow


@pytest.fixture(autouse=True)
def c_pass_loaded() -> None:
    require_lone_pass()


def c():
    from udpflannel import _lone

    return _lone


# -- the decisions, against udpflannel.forward ---------------------------------------------------------

PEERS = [("192.168.0.1", 8285), ("192.168.0.2", 8285), ("192.168.0.3", 8285), ("192.168.0.1", 8286)]
tables = st.lists(st.tuples(crowded_subnets, next_hops), max_size=12).map(RouteTable)


@st.composite
def transport_packets(draw) -> bytearray:
    """A packet a peer might send: TCP, UDP (checksum or none), ICMP, a fragment or another protocol, with
    its transport checksum right (mostly), between crowded addresses, then maybe one byte damaged."""
    proto = draw(st.sampled_from([1, 6, 17, 17, 47]))
    frag = draw(st.sampled_from([0, 0, 0, 0x4000, 0x2000, 0x2001, 0x1FFF]))
    src, dst = draw(crowded_addresses), draw(crowded_addresses)
    body = bytearray(draw(st.binary(max_size=48)))
    if proto == 6:
        offset = draw(st.integers(5, 6))
        body = bytearray(struct.pack("!HHIIBBHHH", 1, 2, 3, 4, offset << 4, 0x10, 5, 0, 0)) + bytes(4 * offset - 20) + body
    elif proto in (1, 17):
        body = bytearray(8) + body
        if proto == 17:
            struct.pack_into("!H", body, 4, len(body))
    if proto in (6, 17) and not (proto == 17 and draw(st.booleans())):  # UDP: sometimes "no checksum"
        pseudo = struct.pack("!IIBBH", src, dst, 0, proto, len(body))
        at = 16 if proto == 6 else 6
        body[at:at + 2] = slow_checksum(pseudo + bytes(body)).to_bytes(2, "big")
    elif proto == 1:
        body[2:4] = slow_checksum(bytes(body)).to_bytes(2, "big")
    header = draw(ipv4_packets(payload=st.just(b""), protocol=st.just(proto), src=st.just(src), dst=st.just(dst),
                               frag=st.just(frag), ttl=st.integers(0, 255)))
    total = len(header) + len(body)
    struct.pack_into("!H", header, 2, total)
    header[10:12] = slow_header_checksum(bytes(header[:10]) + b"\0\0" + bytes(header[12:])).to_bytes(2, "big")
    packet = header + body
    if draw(st.integers(0, 3)) == 0:
        packet[draw(st.integers(0, total - 1))] ^= 1 << draw(st.integers(0, 7))
    return packet


anything = transport_packets() | st.binary(max_size=80).map(bytearray)


@settings(max_examples=400)
@given(tables, anything)
def test_the_c_outbound_decision_forwards_exactly_what_python_forwards(table, packet):
    """Same next hop, same bytes after (TTL and checksum patched), and nothing forwarded that Python drops."""
    theirs, ours = bytearray(packet) + bytes(8), bytearray(packet) + bytes(8)
    verdict, hop = outbound(theirs, len(packet), table)
    got = c().outbound(ours, len(packet), lone.compile_routes(table))
    assert got == (hop if verdict == Verdict.FORWARD else None)
    assert ours == theirs


@settings(max_examples=400)
@given(tables, anything, st.sampled_from(PEERS + [("10.9.9.9", 8285)]), st.booleans(), st.sampled_from([40, 90, 1472]))
def test_the_c_inbound_decision_accepts_exactly_what_python_accepts(table, packet, peer, check_source, tun_mtu):
    theirs, ours = bytearray(packet) + bytes(8), bytearray(packet) + bytes(8)
    verdict = inbound(theirs, len(packet), peer, table, tun_mtu=tun_mtu, check_source=check_source)
    got = c().inbound(ours, len(packet), peer, lone.compile_routes(table), tun_mtu, check_source)
    assert got == (verdict == Verdict.FORWARD)
    assert ours == theirs


@given(st.lists(st.tuples(crowded_subnets, next_hops, st.booleans()), max_size=20), st.lists(crowded_addresses, max_size=20))
def test_the_compiled_table_is_the_route_tables_longest_prefix_match(changes, addresses):
    """After any sequence of sets and deletes (a later set for one subnet replaces the earlier)."""
    table = RouteTable()
    for subnet, hop, keep in changes:
        table.set(subnet, hop)
        if not keep:
            table.delete(subnet)
    compiled = lone.compile_routes(table)
    assert len(compiled) == len(table)
    for address in addresses:
        assert compiled.lookup(address) == table.lookup(address)


@given(st.binary(min_size=20, max_size=120), st.integers(0, 130), st.integers(0, 130))
def test_completing_a_partial_checksum_matches_the_vnet_module(data, start, offset):
    theirs, ours = bytearray(data), bytearray(data)
    assert c().complete_checksum(ours, len(data), start, offset) == vnet.complete_checksum(theirs, len(data), start, offset)
    assert ours == theirs


def test_a_route_table_with_a_malformed_next_hop_is_refused_by_name():
    with pytest.raises(ValueError, match="dotted IPv4"):
        c().Routes([(0x0A050200, 24, ("not-an-address", 8285))])
    with pytest.raises(ValueError, match="port out of range"):
        c().Routes([(0x0A050200, 24, ("10.0.0.1", 70000))])


def assert_c_pass(mover) -> None:
    for callback in (mover.on_tun_readable, mover.on_udp_readable):
        assert isinstance(callback.__self__, c().Pass), f"{callback} is not the C pass"


# -- hand-overs, on the per-packet rig ------------------------------------------------------------------

@pytest.fixture
async def c_rig():
    r = PacketRig(compiled=True, icmp_sock=IcmpRecorder())
    r.dp.attach()
    assert_c_pass(r.dp.mover)
    yield r
    r.close()


async def test_a_drop_is_handed_to_python_counted_by_verdict_and_answered(c_rig: PacketRig):
    c_rig.tun_app.send(ip_packet("10.5.1.2", "10.5.7.9"))  # no route
    c_rig.tun_app.send(ip_packet("10.5.1.2", "10.5.2.9", ttl=1))  # expires here
    c_rig.tun_app.send(ip_packet("10.5.1.2", "10.5.2.9"))  # forwarded
    await until(lambda: c_rig.dp.counters.sent_packets == 1 and len(c_rig.dp.icmp_sock.sent) == 2)
    drops = c_rig.dp.counters.tun_drops
    assert drops[Verdict.NO_ROUTE] == 1 and drops[Verdict.TTL_EXPIRED] == 1
    assert [packet[20] for packet, _ in c_rig.dp.icmp_sock.sent] == [3, 11]  # unreachable, time exceeded
    assert c_rig.dp.counters.tun_packets == 3 and c_rig.dp.counters.tun_reads >= 3


async def test_a_send_the_kernel_refuses_is_handed_to_the_engine_and_the_next_packet_still_goes(c_rig: PacketRig):
    """A peer at port 0: Linux refuses the sendto (EINVAL) without sending anything."""
    follow(c_rig.dp.routes, PeerAdded(IPv4Network("10.5.3.0/24"), IPv4Address("127.0.0.1")), 0)
    c_rig.tun_app.send(ip_packet("10.5.1.2", "10.5.3.9"))
    c_rig.tun_app.send(ip_packet("10.5.1.2", "10.5.2.9", size=61))
    await until(lambda: c_rig.dp.counters.send_errors == 1 and c_rig.dp.counters.sent_packets == 1)
    assert c_rig.peer.recv(2000) == after_one_hop(ip_packet("10.5.1.2", "10.5.2.9", size=61))
    assert c_rig.dp.counters.udp_sends == 2


async def test_a_full_tun_parks_the_write_and_loses_nothing_in_between(c_rig: PacketRig):
    """The "TUN" is a socketpair whose reader stops: the C pass's write meets EAGAIN, the engine parks it
    and stops receiving; once the reader drains, every datagram that was received arrives, in order."""
    c_rig.tun_end.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
    total = 200
    for i in range(total):
        c_rig.peer.sendto(ip_packet("10.5.2.7", "10.5.1.2", size=200 + i % 50), c_rig.udp.getsockname())
        if i % 20 == 19:
            await asyncio.sleep(0.01)
    await until(lambda: c_rig.dp.counters.backpressure_pauses >= 1)
    c_rig.tun_app.setblocking(False)
    sizes: list[int] = []
    for _ in range(500):  # read as a slow TUN reader would, the event loop running in between
        try:
            sizes.append(len(c_rig.tun_app.recv(2000)))
            continue
        except BlockingIOError:
            pass
        if not c_rig.dp.parked_writes and len(sizes) == c_rig.dp.counters.udp_packets:
            break
        await asyncio.sleep(0.005)
    accepted = c_rig.dp.counters.udp_packets
    assert accepted > 0 and sizes == [200 + i % 50 for i in range(accepted)]
    assert c_rig.dp.counters.delivered_packets == accepted and c_rig.dp.counters.tun_write_errors == 0


class Recorder:
    """Stands in for a TraceHub: what the Python callbacks report while the trace is on."""

    def __init__(self) -> None:
        self.seen: list[tuple[str, Verdict]] = []

    def outbound(self, buf, n, verdict, hop) -> None:
        self.seen.append(("out", verdict))

    def inbound(self, buf, n, verdict, peer) -> None:
        self.seen.append(("in", verdict))


async def test_while_tracing_python_takes_whole_wakeups_and_after_it_the_c_pass_again(c_rig: PacketRig):
    c_rig.dp.tracer = Recorder()
    c_rig.tun_app.send(ip_packet("10.5.1.2", "10.5.2.9"))
    c_rig.peer.sendto(ip_packet("10.5.2.7", "10.5.1.2"), c_rig.udp.getsockname())
    await until(lambda: len(c_rig.dp.tracer.seen) == 2)
    assert sorted(c_rig.dp.tracer.seen) == [("in", Verdict.FORWARD), ("out", Verdict.FORWARD)]
    recorder, c_rig.dp.tracer = c_rig.dp.tracer, None
    c_rig.tun_app.send(ip_packet("10.5.1.2", "10.5.2.9"))
    await until(lambda: c_rig.dp.counters.sent_packets == 2)
    assert len(recorder.seen) == 2


# -- the fast path's first read, through the C pass --------------------------------------------------------

@pytest.fixture
async def fast_c_rig():
    r = FastRig(compiled=True)
    r.dp.attach()
    assert_c_pass(r.dp.mover)
    yield r
    r.close()


async def test_a_partial_checksum_is_completed_and_a_super_packet_handed_to_the_batch_mover(fast_c_rig: FastRig):
    """A lone packet with NEEDS_CSUM leaves as the per-packet path sends it; a TSO super-packet is cut by
    the Python batch mover into the segments the kernel would make."""
    rig = fast_c_rig
    lone_packet = bytearray(tcp_flow(100))
    partial = struct.pack("!IIBBH", *struct.unpack("!II", lone_packet[12:20]), 0, 6, len(lone_packet) - 20)
    expected = bytearray(lone_packet)
    expected[36:38] = slow_checksum(bytes(expected[12:20]) + partial[8:] + bytes(expected[20:36]) + b"\0\0"
                                    + bytes(expected[38:])).to_bytes(2, "big")
    lone_packet[36:38] = (sum(struct.unpack("!6H", partial)) % 0xFFFF).to_bytes(2, "big")  # the pseudo-header sum
    rig.tun_app.send(vnet.VnetHdr(vnet.NEEDS_CSUM, vnet.GSO_NONE, 0, 0, 20, 16).pack() + lone_packet)
    await until(lambda: rig.dp.counters.sent_packets == 1)
    assert rig.peer.recv(70000) == after_one_hop(bytes(expected))
    rig.tun_app.send(tso_hdr() + tcp_flow(3 * 1420))
    await until(lambda: rig.dp.counters.sent_packets == 4)
    got = rig.recv_datagrams(3)
    assert [len(d) for d in got] == [1472, 1472, 1472] and all(d[8] == 63 for d in got)
    assert rig.dp.counters.tun_superpackets == 1


async def test_a_lone_datagram_is_written_with_a_plain_header_and_a_stranger_dropped(fast_c_rig: FastRig):
    rig = fast_c_rig
    packet = ip_packet("10.5.2.7", "10.5.1.2")
    rig.peer.sendto(packet, rig.udp.getsockname())
    await until(lambda: rig.dp.counters.delivered_packets == 1)
    rig.tun_app.settimeout(2)
    assert rig.tun_app.recv(70000) == vnet.PLAIN + after_one_hop(packet)
    stranger = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    try:
        stranger.bind(("127.0.0.1", 0))
        stranger.sendto(packet, rig.udp.getsockname())
        await until(lambda: rig.dp.counters.udp_drops[Verdict.UNKNOWN_PEER] == 1)
    finally:
        stranger.close()
    assert rig.dp.peer_rx == {("127.0.0.1", rig.port): 1} and rig.dp.counters.delivered_packets == 1
