"""Per-flow GRO coalescing (issue 18): several flows' segments interleaved in one receive table, with
duplicates, reorderings, losses and damaged rows, as a busy underlay hands them over.

- For any interleaving, the kernel's re-split of what the coalescer writes is, flow by flow, exactly
  what arrived (so each flow's byte stream is delivered exactly); a merged write carries only
  undamaged segments that are consecutive in their flow; rows of different senders never merge.
- Cleanly interleaved flows merge as if each had come alone (one write per flow), and the plan's
  counts say what broke a flow's runs (a gap, a duplicate) and what was damaged.
- A real kernel takes the merged writes through a TUN with the fast path's offloads: no write error,
  no header or checksum error, and every UDP datagram reaches its socket as it was sent.

Runs for both GRO-check backends (compiled C and numpy: the fixture from test_gso).
"""

from __future__ import annotations

import json
import struct
import sys
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.cluster import TOOLS
from tests.gso_helpers import by_flow, split
from tests.strategies import hurt, slow_checksum, slow_header_checksum
from tests.test_gso import backend, gso_hdr, resplit  # noqa: F401  (backend: autouse, module-scoped)
from tun import gso, vnet
from tun.layout import ACK, PSH

SRC, DST = 0x0A630002, 0x0A630001  # 10.99.0.2 -> 10.99.0.1: tuninject's TUN takes them locally
TCP_OPTIONS = b"\x01\x01\x08\x0a" + bytes(range(8))  # NOP NOP timestamps, as Linux sends
TCP_HL, UDP_HL = 20 + 20 + len(TCP_OPTIONS), 28


def super_packet(proto: int, sport: int, payload: bytes, mss: int, *, seq: int, ident: int, psh: bool,
                 src: int = SRC, dst: int = DST) -> bytes:
    """One TSO (USO) super-packet of a flow (ports ``sport`` → ``sport`` − 40000 + 5201), as the
    sending kernel makes it."""
    if proto == 6:
        l4 = struct.pack("!HHIIBBHHH", sport, sport - 40000 + 5201, seq, 77, (20 + len(TCP_OPTIONS)) << 2, ACK | (PSH if psh else 0),
                         502, 0, 0) + TCP_OPTIONS
    else:
        l4 = struct.pack("!HHHH", sport, sport - 40000 + 5201, 8 + len(payload), 0)
    ip = bytearray(struct.pack("!BBHHHBBHII", 0x45, 0, 20 + len(l4) + len(payload), ident, 0x4000, 64, proto, 0,
                               src, dst))
    struct.pack_into("!H", ip, 10, slow_header_checksum(ip))
    return bytes(ip) + l4 + payload


@st.composite
def flows(draw, *, max_flows: int = 4, max_segments: int = 40):
    """(seg, [flow]): 1–4 flows of one row size ``seg`` (TCP, and UDP datagrams sized to match), each
    [(sender, segments, payload)], its segments cut from 1–3 consecutive super-packets."""
    mss = draw(st.sampled_from([1448, 1400, 500, 96]))
    seg = TCP_HL + mss
    out = []
    for i in range(draw(st.integers(1, max_flows))):
        proto = draw(st.sampled_from([6, 6, 17]))
        size = seg - (TCP_HL if proto == 6 else UDP_HL)
        sender = draw(st.integers(0, 1))
        seq, ident = draw(st.integers(0, 2**32 - 1)), draw(st.integers(0, 0xFFFF))
        segments, stream = [], b""
        for _ in range(draw(st.integers(1, 3))):
            n = draw(st.integers(1, max_segments // 3))
            length = draw(st.integers((n - 1) * size + 1, n * size))
            payload = bytes((i * 37 + len(stream) + k) % 251 for k in range(length))
            packet = super_packet(proto, 40000 + i, payload, size, seq=seq, ident=ident, psh=draw(st.booleans()))
            cut = split(packet, gso_hdr(packet, size))
            segments += cut
            stream += payload
            seq, ident = (seq + length) & 0xFFFFFFFF, (ident + len(cut)) & 0xFFFF
        out.append((sender, segments, stream))
    return seg, out


def interleave(data, flows_: list, *, damage: bool = True) -> list[tuple[int, bytes]]:
    """The flows' segments in one arrival order that keeps each flow's order, then hurt as a bad wire
    hurts them: segments lost, swapped, held back, sent twice, damaged (one byte flipped; if ``damage``)."""
    turns = data.draw(st.permutations([f for f, (_, segments, _) in enumerate(flows_) for _ in segments]))
    nexts = [0] * len(flows_)
    arrivals = []
    for f in turns:
        arrivals.append((flows_[f][0], flows_[f][1][nexts[f]]))
        nexts[f] += 1
    hurt(data, arrivals, times=(0, 5), damage=_flip if damage else None)
    return arrivals


def _flip(data, arrival: tuple[int, bytes]) -> tuple[int, bytes]:
    sender, row = arrival
    damaged = bytearray(row)
    damaged[data.draw(st.integers(0, len(row) - 1))] ^= data.draw(st.integers(1, 255))
    return sender, bytes(damaged)


def receive(arrivals: list[tuple[int, bytes]]) -> list[tuple[int, list[int], list[bytes]]]:
    """Arrivals as the fast path's receive loop holds them: UDP GRO batches (one sender, datagrams of
    one size, a shorter one last, at most 64 and 64 KB), consecutive batches of one size forming a
    table: [(seg, [sender per batch], [rows])], each batch's rows then its size in ``sizes`` order."""
    tables: list = []
    batch: list[bytes] = []
    sender = None
    for s, row in [*arrivals, (None, b"")]:
        if batch and (s != sender or len(row) > len(batch[0]) or len(batch[-1]) < len(batch[0])
                      or len(batch) == 64 or sum(map(len, batch)) + len(row) > 0xFFFF or not row):
            seg = len(batch[0])
            if not tables or tables[-1][0] != seg:
                tables.append((seg, [], []))
            tables[-1][1].append(sender)
            tables[-1][2].append(batch)
            batch = []
        sender = s
        if row:
            batch.append(row)
    return tables


def coalesce_tables(tables, *, udp: bool = True) -> tuple[list[bytes], list[gso.Plan]]:
    """Each table laid out on row boundaries and planned at once, as ``fastpath_in`` does: the TUN
    write units (vnet header + packet) in the plan's order, and the plans."""
    units, plans = [], []
    for seg, senders, batches in tables:
        rows = [row for batch in batches for row in batch]
        buf = bytearray(len(rows) * seg + gso.BUFFER_SIZE)
        at = 0
        for batch in batches:
            for row in batch:
                buf[at:at + len(row)] = row
                at += seg
        plan = gso.Coalescer(buf, udp=udp).plan(seg, [sum(map(len, b)) for b in batches], senders=senders)
        plans.append(plan)
        units += [b"".join(bytes(p) for p in plan.merge(a, b)) if b - a > 1 else vnet.PLAIN + bytes(plan.row(a))
                  for a, b in plan.runs]
    return units, plans


def stream_of(packets: list[bytes], seq: int) -> bytes:
    """A receiver's TCP byte stream from ``packets`` in order, from sequence number ``seq``: segments
    whose checksums verify, each taken once, up to the first hole."""
    got: dict[int, bytes] = {}
    for p in packets:
        if slow_checksum(p[:20]) == 0 and _l4_ok(p):
            got.setdefault(struct.unpack_from("!I", p, 24)[0], p[TCP_HL:])
    out = b""
    while seq in got:
        out += got[seq]
        seq = (seq + len(got[seq])) & 0xFFFFFFFF
    return out


def _l4_ok(p: bytes) -> bool:
    pseudo = p[12:20] + bytes([0, p[9]]) + struct.pack("!H", len(p) - 20)
    return slow_checksum(pseudo + p[20:]) == 0


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(flows(), st.data())
def test_interleaved_flows_are_delivered_exactly_and_nothing_damaged_is_merged(case, data) -> None:
    seg, flows_ = case
    arrivals = interleave(data, flows_)
    units, _ = coalesce_tables(receive(arrivals))
    delivered = resplit(units)  # what the kernel makes of the writes (a model; the netns test below is real)
    assert sorted(map(len, delivered)) == sorted(len(r) for _, r in arrivals)
    assert by_flow(delivered) == by_flow([r for _, r in arrivals])  # every flow exactly as it came
    originals = {f: segments for f, (_, segments, _) in enumerate(flows_)}
    for unit in units:
        carried = resplit([unit])
        if len(carried) > 1:  # a merge: undamaged originals, consecutive in their flow
            f = next(f for f, segments in originals.items() if carried[0] in segments)
            first = originals[f].index(carried[0])
            assert carried == originals[f][first:first + len(carried)]
    for _, segments, stream in flows_:  # the byte stream a receiver reassembles
        if segments[0][9] == 6:
            mine = by_flow(delivered).get(segments[0][9:10] + segments[0][12:24], [])
            came = by_flow([r for _, r in arrivals]).get(segments[0][9:10] + segments[0][12:24], [])
            start = struct.unpack_from("!I", segments[0], 24)[0]
            assert stream_of(mine, start) == stream_of(came, start)
            if set(segments) <= set(came):  # every segment came through undamaged at least once
                assert stream_of(mine, start) == stream


def test_cleanly_interleaved_flows_merge_as_if_each_came_alone() -> None:
    """4 TCP flows of 20 full segments each, round robin in two GRO batches: 4 writes of 20."""
    segments = []
    for i in range(4):
        packet = super_packet(6, 40000 + i, bytes(20 * 1448), 1448, seq=1000 * i, ident=i, psh=False)
        segments.append(split(packet, gso_hdr(packet, 1448)))
    arrivals = [(0, segments[i][k]) for k in range(20) for i in range(4)]
    units, [plan] = coalesce_tables(receive(arrivals))
    assert [len(resplit([u])) for u in units] == [20] * 4
    assert (plan.flows, plan.breaks, plan.refused) == (4, 0, 0)
    assert by_flow(resplit(units)) == by_flow([r for _, r in arrivals])


def test_plan_counts_what_broke_a_flow() -> None:
    """Two flows interleaved; flow 0 loses a segment (a gap), flow 1 gets one twice (a duplicate) and
    one damaged: two breaks, one damaged row, and no write spans any of them."""
    flow = []
    for i in range(2):
        packet = super_packet(6, 40000 + i, bytes(10 * 1448), 1448, seq=0, ident=0, psh=False)
        flow.append(split(packet, gso_hdr(packet, 1448)))
    damaged = bytearray(flow[1][7])
    damaged[-1] ^= 1
    zero = flow[0][:4] + flow[0][5:]  # a gap after the 4th
    one = flow[1][:3] + [flow[1][2]] + flow[1][3:7] + [bytes(damaged)] + flow[1][8:]  # a duplicate, a damaged row
    arrivals = [(0, r) for pair in zip(zero, one[:9], strict=True) for r in pair] + [(0, r) for r in one[9:]]
    units, [plan] = coalesce_tables(receive(arrivals))
    assert (plan.flows, plan.breaks, plan.refused) == (2, 2, 1)
    assert sorted(len(resplit([u])) for u in units) == sorted([4, 5] + [3, 5, 1, 2])


def test_different_senders_never_merge() -> None:
    """The same flow's consecutive segments from two senders (a spoofer, say): never one write."""
    packet = super_packet(6, 40000, bytes(8 * 1448), 1448, seq=0, ident=0, psh=False)
    segments = split(packet, gso_hdr(packet, 1448))
    units, [plan] = coalesce_tables(receive([(0, r) for r in segments[:4]] + [(1, r) for r in segments[4:]]))
    assert [len(resplit([u])) for u in units] == [4, 4] and plan.flows == 2


# -- a real kernel takes the merged writes ---------------------------------------------------------------


@pytest.mark.netns
@settings(max_examples=10, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(flows(max_segments=30), st.data())
def test_kernel_accepts_every_merged_write(lab, tmp_path: Path, case, data) -> None:
    """Write the coalescer's units (interleaved flows, hurt as above) into a TUN opened with the fast
    path's offloads: the kernel takes every write, counts no header or checksum error, and each UDP
    socket receives its flow's datagrams exactly as they arrived (a merged UDP write cut back). (No
    damaged rows here: the kernel would count their checksum errors; the model test covers them.)"""
    seg, flows_ = case
    arrivals = interleave(data, flows_, damage=False)
    units, _ = coalesce_tables(receive(arrivals))
    ns = lab.add_node(len(lab.namespaces))  # a fresh namespace per example; the lab removes them all
    ns.ip("link", "set", "eth0", "down")  # nothing but the TUN may move these counters
    path = tmp_path / "units.bin"
    path.write_bytes(b"".join(len(u).to_bytes(4, "big") + u for u in units))
    deltas = json.loads(ns.run(sys.executable, str(TOOLS / "tuninject.py"), "--vnet", str(path), timeout=60).stdout)
    assert deltas["write_errors"] == [], deltas
    assert deltas.get("IpInReceives", 0) == len(units), deltas
    for bad in ("IpInHdrErrors", "IpInAddrErrors", "IpInDiscards", "TcpInCsumErrors", "TcpInErrs",
                "UdpInCsumErrors", "UdpInErrors"):
        assert deltas.get(bad, 0) == 0, (bad, deltas)
    for f, (_, segments, _) in enumerate(flows_):
        if segments[0][9] != 17:
            continue
        key = segments[0][9:10] + segments[0][12:24]
        came = by_flow([r for _, r in arrivals]).get(key, [])
        assert deltas["udp"].get(str(5201 + f), []) == [r[28:].hex() for r in came], f
