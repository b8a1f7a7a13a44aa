"""tun.vnet and tun.gso: virtio_net_hdr, GSO split and GRO coalesce, against slow obvious references
and against a real kernel (split packets injected through a plain TUN in a namespace)."""

from __future__ import annotations

import json
import struct
import sys
from pathlib import Path

import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from tests.cluster import TOOLS
from tests.conftest import require_compiled_kernels
from tests.gso_helpers import by_flow, coalesce, split
from tests.strategies import hurt, slow_checksum, slow_header_checksum, super_packets
from tun import gso, kernels, vnet
from tun.layout import ACK, CWR, FIN, PSH, UDP_MAX_SEGMENTS
from tun.segment import Refused

TCP_HDR = vnet.VnetHdr(vnet.NEEDS_CSUM, vnet.GSO_TCPV4, 0, 0, 0, 16)


@pytest.fixture(autouse=True, scope="module", params=["compiled", "numpy"])
def backend(request):
    """Every test here runs twice: with the compiled kernels (C; CI must have them, unless
    UDPFLANNEL_JIT=0 runs the suite for the numpy ones) and with the numpy reference. Module-scoped,
    so hypothesis sees no per-test fixture."""
    compiled = request.param == "compiled"
    if compiled:
        require_compiled_kernels()
    saved, kernels.COMPILED = kernels.COMPILED, compiled
    try:
        yield request.param
    finally:
        kernels.COMPILED = saved


def gso_hdr(packet: bytes, mss: int, *, hdr_len: int = 0) -> vnet.VnetHdr:
    """The header a TUN puts in front of ``packet``; ``hdr_len`` is junk on purpose (never trusted)."""
    ihl = (packet[0] & 0x0F) * 4
    if packet[9] == 6:
        return vnet.VnetHdr(vnet.NEEDS_CSUM, vnet.GSO_TCPV4, hdr_len, mss, ihl, 16)
    return vnet.VnetHdr(vnet.NEEDS_CSUM, vnet.GSO_UDP_L4, hdr_len, mss, ihl, 6)


def slow_split(packet: bytes, mss: int) -> list[bytes]:
    """The kernel's tcp_gso_segment / __udp_gso_segment written out one segment at a time."""
    ihl = (packet[0] & 0x0F) * 4
    proto = packet[9]
    l4 = (packet[ihl + 12] >> 4) * 4 if proto == 6 else 8
    hl = ihl + l4
    payload = packet[hl:]
    chunks = [payload[i:i + mss] for i in range(0, len(payload), mss)] or [b""]
    ident = struct.unpack_from("!H", packet, 4)[0]
    out = []
    for i, chunk in enumerate(chunks):
        h = bytearray(packet[:hl])
        struct.pack_into("!HH", h, 2, hl + len(chunk), (ident + i) & 0xFFFF)
        struct.pack_into("!H", h, 10, slow_header_checksum(h))
        pseudo = bytes(h[12:20]) + bytes([0, proto]) + struct.pack("!H", l4 + len(chunk))
        if proto == 6:
            seq = (struct.unpack_from("!I", packet, ihl + 4)[0] + i * mss) & 0xFFFFFFFF
            struct.pack_into("!I", h, ihl + 4, seq)
            flags = packet[ihl + 13]
            if i < len(chunks) - 1:
                flags &= ~(FIN | PSH)
            if i > 0:
                flags &= ~CWR
            h[ihl + 13] = flags
            struct.pack_into("!H", h, ihl + 16, 0)
            struct.pack_into("!H", h, ihl + 16, slow_checksum(pseudo + bytes(h[ihl:]) + chunk))
        else:
            struct.pack_into("!HH", h, ihl + 4, 8 + len(chunk), 0)
            struct.pack_into("!H", h, ihl + 6, slow_checksum(pseudo + bytes(h[ihl:]) + chunk) or 0xFFFF)
        out.append(bytes(h) + chunk)
    return out


def assert_valid(packet: bytes) -> None:
    """One ordinary IPv4 packet: total length = size, IP and L4 checksums verify."""
    ihl = (packet[0] & 0x0F) * 4
    assert struct.unpack_from("!H", packet, 2)[0] == len(packet)
    assert slow_checksum(packet[:ihl]) == 0, "IP header checksum"
    pseudo = packet[12:20] + bytes([0, packet[9]]) + struct.pack("!H", len(packet) - ihl)
    assert slow_checksum(pseudo + packet[ihl:]) == 0, "L4 checksum"
    if packet[9] == 17:
        assert packet[ihl + 6:ihl + 8] != b"\0\0"


def header_len(packet: bytes) -> int:
    ihl = (packet[0] & 0x0F) * 4
    return ihl + ((packet[ihl + 12] >> 4) * 4 if packet[9] == 6 else 8)


# -- vnet -------------------------------------------------------------------------------------------


def test_vnet_constants_and_layout() -> None:
    """The uapi values (linux/virtio_net.h), and host byte order for the u16 fields."""
    assert (vnet.VNET_HDR_LEN, vnet.NEEDS_CSUM, vnet.DATA_VALID) == (10, 1, 2)
    assert (vnet.GSO_NONE, vnet.GSO_TCPV4, vnet.GSO_UDP, vnet.GSO_TCPV6, vnet.GSO_UDP_L4, vnet.GSO_ECN) == (
        0, 1, 3, 4, 5, 0x80)
    hdr = vnet.VnetHdr(1, 1, 0x1234, 1448, 20, 16)
    assert hdr.pack() == struct.pack("=BBHHHH", 1, 1, 0x1234, 1448, 20, 16)
    assert len(hdr.pack()) == 10 and vnet.parse(hdr.pack()) == hdr
    assert vnet.PLAIN == bytes(10)
    assert vnet.tcpv4_gso(52, 1420, 20) == vnet.VnetHdr(1, 1, 52, 1420, 20, 16).pack()


# -- split --------------------------------------------------------------------------------------------


@given(super_packets(protocol=6) | super_packets(protocol=17), st.integers(0, 0xFFFF))
def test_split_is_the_kernels_segmentation(case, junk_hdr_len) -> None:
    """Byte for byte what tcp_gso_segment/__udp_gso_segment make, whatever hdr_len claims."""
    packet, mss = case
    segments = split(packet, gso_hdr(packet, mss, hdr_len=junk_hdr_len))
    assert segments == slow_split(packet, mss)


@given(super_packets(protocol=6) | super_packets(protocol=17))
def test_split_segments_are_ordinary_packets(case) -> None:
    """Every segment is a valid IPv4 packet no bigger than headers + gso_size, the payloads add up to
    the original, and FIN/PSH travel only on the last segment, CWR only on the first."""
    packet, mss = case
    segments = split(packet, gso_hdr(packet, mss))
    hl = header_len(packet)
    assert b"".join(s[hl:] for s in segments) == packet[hl:]
    for i, segment in enumerate(segments):
        assert_valid(segment)
        assert len(segment) <= hl + mss
        assert segment[hl:] or len(segments) == 1
        if packet[9] == 6:
            flags = segment[(packet[0] & 0x0F) * 4 + 13]
            if i < len(segments) - 1:
                assert not flags & (FIN | PSH)
            if i > 0:
                assert not flags & CWR


@given(st.binary(max_size=200), st.sampled_from([vnet.GSO_TCPV4, vnet.GSO_UDP_L4, vnet.GSO_TCPV6, 2, 0x81]),
       st.integers(0, 0xFFFF))
def test_split_never_raises(data, gso_type, mss) -> None:
    result = split(data, vnet.VnetHdr(vnet.NEEDS_CSUM, gso_type, 0, mss, 20, 16))
    assert isinstance(result, (list, Refused))
    if isinstance(result, list):
        for segment in result:
            assert_valid(segment)


def test_split_refuses_what_it_cannot_cut() -> None:
    packet, _ = _example_flow(3000)
    assert split(packet[:10], TCP_HDR._replace(gso_size=1000)) == Refused.TOO_SHORT
    assert split(b"\x60" + packet[1:], TCP_HDR._replace(gso_size=1000)) == Refused.NOT_IPV4
    assert split(packet, TCP_HDR._replace(gso_type=vnet.GSO_TCPV6, gso_size=1000)) == Refused.NOT_IPV4
    assert split(packet, TCP_HDR._replace(gso_type=vnet.GSO_UDP_L4, gso_size=1000)) == Refused.BAD_HEADER
    assert split(packet, TCP_HDR._replace(gso_size=0)) == Refused.BAD_HEADER
    assert split(packet + b"x", TCP_HDR._replace(gso_size=1000)) == Refused.BAD_HEADER  # length mismatch
    fragment = bytearray(packet)
    fragment[6] |= 0x20  # MF
    assert split(bytes(fragment), TCP_HDR._replace(gso_size=1000)) == Refused.BAD_HEADER


@given(super_packets(protocol=6, max_segments=1) | super_packets(protocol=17, max_segments=1))
def test_complete_checksum_finishes_a_partial_sum(case) -> None:
    """NEEDS_CSUM without GSO: the field holds the pseudo-header sum; the result is the full checksum."""
    packet, _ = case
    ihl = (packet[0] & 0x0F) * 4
    offset = 16 if packet[9] == 6 else 6
    pseudo = packet[12:20] + bytes([0, packet[9]]) + struct.pack("!H", len(packet) - ihl)
    partial = bytearray(packet)
    struct.pack_into("!H", partial, ihl + offset, ~slow_checksum(pseudo) & 0xFFFF)
    [done] = split(bytes(partial), vnet.VnetHdr(vnet.NEEDS_CSUM, 0, 0, 0, ihl, offset))
    assert_valid(done)
    assert done[:ihl + offset] == packet[:ihl + offset] and done[ihl + offset + 2:] == packet[ihl + offset + 2:]
    assert split(bytes(partial), vnet.VnetHdr(vnet.NEEDS_CSUM, 0, 0, 0, ihl, len(packet))) == Refused.BAD_HEADER


# -- coalesce -------------------------------------------------------------------------------------------


def resplit(units: list[bytes]) -> list[bytes]:
    """What the kernel does with our TUN writes: GSO units are cut again, plain ones pass as they are."""
    out: list[bytes] = []
    for unit in units:
        hdr, packet = vnet.parse(unit), unit[vnet.VNET_HDR_LEN:]
        if hdr.gso_type == vnet.GSO_NONE:
            assert hdr == vnet.VnetHdr()
            out.append(packet)
            continue
        ihl = (packet[0] & 0x0F) * 4
        proto = packet[9]
        if proto == 17:  # a merged UDP flow: IHL 5, ≤ 64 datagrams (the kernel's limit for a TUN write)
            assert (hdr.flags, hdr.gso_type, hdr.hdr_len, hdr.csum_start, hdr.csum_offset) == (
                vnet.NEEDS_CSUM, vnet.GSO_UDP_L4, 28, 20, 6)
            assert ihl == 20 and struct.unpack_from("!H", packet, 24)[0] == len(packet) - 20
            assert -(-(len(packet) - 28) // hdr.gso_size) <= UDP_MAX_SEGMENTS
            check_at = 26
        else:
            assert (hdr.flags, hdr.gso_type, hdr.csum_start, hdr.csum_offset) == (vnet.NEEDS_CSUM, vnet.GSO_TCPV4, ihl, 16)
            assert hdr.hdr_len == header_len(packet)
            check_at = ihl + 16
        assert len(packet) <= 0xFFFF and slow_checksum(packet[:ihl]) == 0
        # the L4 checksum field holds the folded pseudo-header sum, as NEEDS_CSUM wants
        pseudo = packet[12:20] + bytes([0, proto]) + struct.pack("!H", len(packet) - ihl)
        assert struct.unpack_from("!H", packet, check_at)[0] % 0xFFFF == (~slow_checksum(pseudo) & 0xFFFF) % 0xFFFF
        segments = split(packet, hdr)
        assert isinstance(segments, list) and len(segments) >= 2
        out.extend(segments)
    return out


def merged_groups(packets: list[bytes]) -> list[int]:
    """How many packets each TUN write carries once ``packets`` are coalesced."""
    return [len(resplit([u])) for u in coalesce(packets)]


def edited(segments: list[bytes], i: int, offset: int, value: int) -> list[bytes]:
    """``segments`` with one byte of segment ``i`` changed, and its checksums made valid again."""
    out = list(segments)
    seg = bytearray(out[i])
    seg[offset] = value
    struct.pack_into("!H", seg, 10, 0)
    struct.pack_into("!H", seg, 10, slow_header_checksum(seg))
    out[i] = slow_split(bytes(seg), 1 << 16)[0] if offset >= 20 else bytes(seg)
    return out


@given(super_packets(protocol=6, max_segments=48), st.data())
def test_split_then_coalesce_gives_back_the_stream(case, data) -> None:
    """split → coalesce → the kernel's re-split is the same list of packets, so the byte stream is
    the original; flows with only ACK/ACK|PSH segments are merged, nothing else is."""
    packet, mss = case
    segments = split(packet, gso_hdr(packet, mss))
    units = coalesce(segments)
    assert resplit(units) == segments
    hl = header_len(packet)
    flags = packet[(packet[0] & 0x0F) * 4 + 13]
    if (flags & ~PSH == ACK and packet[0] == 0x45 and len(segments) > 1 and hl + mss <= 0xFFFF // 2 and mss > 1
            and (hl + mss) % 2 == 0):  # odd rows are never merged (the sums work in 16-bit words)
        assert len(units) < len(segments)


@given(super_packets(protocol=6, max_segments=48) | super_packets(protocol=17, max_segments=48), st.data())
def test_coalesce_merges_nothing_damaged(case, data) -> None:
    """Flip one byte of one segment (TCP or UDP) anywhere: that segment is never merged (its IP or L4
    checksum no longer verifies, or a field no longer matches), so the kernel still sees it as it came,
    in its flow's order."""
    packet, mss = case
    packet = _with_ihl5(packet)
    segments = split(packet, gso_hdr(packet, mss))
    assume(len(segments) > 1)
    victim = data.draw(st.integers(0, len(segments) - 1))
    spot = data.draw(st.integers(0, len(segments[victim]) - 1))
    damaged = bytearray(segments[victim])
    damaged[spot] ^= data.draw(st.integers(1, 255))
    segments[victim] = bytes(damaged)
    assert by_flow(resplit(coalesce(segments))) == by_flow(segments)  # (a damaged address: another flow)


@given(super_packets(protocol=17, max_segments=100), st.data())
def test_udp_split_then_coalesce_gives_back_the_datagrams(case, data) -> None:
    """The same for a UDP flow (USO in, GSO_UDP_L4 out): merged where the headers allow, at most 64
    datagrams a write, and the kernel's re-split gives back every datagram as it came."""
    packet, mss = case
    if data.draw(st.booleans()):
        packet = _with_ihl5(packet)
    segments = split(packet, gso_hdr(packet, mss))
    units = coalesce(segments)
    assert resplit(units) == segments
    if packet[0] == 0x45 and len(segments) > 1 and (28 + mss) % 2 == 0:
        assert len(units) < len(segments)
    assert coalesce(segments, udp=False) == [vnet.PLAIN + s for s in segments]  # no USO on the TUN


@given(super_packets(protocol=6, max_segments=48) | super_packets(protocol=17, max_segments=48), st.data())
def test_coalesce_never_merges_across_a_gap_a_reordering_or_a_duplicate(case, data) -> None:
    """What a bad wire does to a flow before GRO batches it: segments lost, swapped, held back, sent twice.
    The kernel's re-split of what we write is exactly the batch as it came, in its order: a merged write
    re-splits into consecutive sequence numbers (and IP IDs), so any merge over a gap, a reordering or a
    duplicate would show as a difference here. And nothing of it is merged that was not contiguous."""
    packet, mss = case
    packet = _with_ihl5(packet)
    segments = split(packet, gso_hdr(packet, mss))
    assume(len(segments) > 2)
    batch = list(segments)
    hurt(data, batch)
    units = coalesce(batch)
    assert resplit(units) == batch
    at = 0
    for unit in units:
        carried = len(resplit([unit]))
        if carried > 1:  # a merge: its rows were neighbours in the original stream, in order
            first = segments.index(batch[at])
            assert batch[at:at + carried] == segments[first:first + carried]
        at += carried


def test_udp_coalesce_rules_by_example() -> None:
    """UDP merge rules one at a time on a 10-datagram flow (1400-byte payloads, ID wraps inside it)."""
    payload = bytes(i * 7 % 251 for i in range(10 * 1400 - 300))
    udp = struct.pack("!HHHH", 40000, 5201, 8 + len(payload), 0)
    ip = bytearray(struct.pack("!BBHHHBBHII", 0x45, 0, 28 + len(payload), 0xFFFA, 0x4000, 63, 17, 0,
                               0x0A050102, 0x0A050202))
    struct.pack_into("!H", ip, 10, slow_header_checksum(ip))
    segments = split(bytes(ip) + udp + payload, vnet.VnetHdr(0, vnet.GSO_UDP_L4, 0, 1400, 0, 0))
    assert len(segments) == 10 and len(segments[-1]) == 28 + 1100
    [unit] = coalesce(segments)
    assert resplit([unit]) == segments and vnet.parse(unit).gso_size == 1400

    assert merged_groups(edited(segments, 4, 8, 62)) == [4, 1, 5]  # TTL differs
    # source port differs: another flow (grouped apart); no merge over the ID gap it leaves
    assert sorted(merged_groups(edited(segments, 4, 21, 1))) == [1, 4, 5]
    assert merged_groups(edited(segments, 4, 6, 0)) == [4, 1, 5]  # DF differs
    assert merged_groups(segments[:4] + segments[5:]) == [4, 5]  # ID gap
    # "No checksum" (0) is valid, but the kernel's re-split would add one: not merged. The last payload
    # word is chosen so that the datagram's words sum to 0 (as a checksum would make them): only the
    # zero itself can tell this datagram apart.
    no_checksum = bytearray(segments[4])
    no_checksum[26:28] = no_checksum[-2:] = b"\0\0"
    pseudo = no_checksum[12:20] + bytes([0, 17]) + no_checksum[24:26]
    struct.pack_into("!H", no_checksum, len(no_checksum) - 2, slow_checksum(bytes(pseudo + no_checksum[20:])))
    assert slow_checksum(bytes(pseudo + no_checksum[20:])) in (0, 0xFFFF)
    assert merged_groups(segments[:4] + [bytes(no_checksum)] + segments[5:]) == [4, 1, 5]
    bad = bytearray(segments[4])
    bad[-1] ^= 1
    assert merged_groups(segments[:4] + [bytes(bad)] + segments[5:]) == [4, 1, 5]  # UDP checksum
    assert merged_groups(segments[:9] + [segments[9]] * 2) == [10, 1]  # a short datagram ends a run
    # many small datagrams: at most 64 per write, however many fit in 64 KB
    small = split(_with_length(bytearray(ip), 28 + 100 * 64)[:20] + struct.pack("!HHHH", 1, 2, 8 + 6400, 0)
                      + bytes(6400), vnet.VnetHdr(0, vnet.GSO_UDP_L4, 0, 64, 0, 0))
    assert merged_groups(small) == [64, 36]


def _with_ihl5(packet: bytes) -> bytes:
    """Drop IP options (GRO only merges IHL 5) and fix up length and checksum."""
    ihl = (packet[0] & 0x0F) * 4
    out = bytearray(packet[:20] + packet[ihl:])
    out[0] = 0x45
    struct.pack_into("!H", out, 2, len(out))
    struct.pack_into("!H", out, 10, 0)
    struct.pack_into("!H", out, 10, slow_header_checksum(out))
    return bytes(out)


def _example_flow(size: int, *, mss: int = 1420, flags: int = ACK | PSH) -> tuple[bytes, int]:
    """One TSO packet 10.5.1.2:40000 → 10.5.2.2:5201 with a timestamp option, as the kernel makes them."""
    payload = bytes(i * 7 % 251 for i in range(size))
    opts = b"\x01\x01\x08\x0a" + bytes(range(8))
    tcp = struct.pack("!HHIIBBHHH", 40000, 5201, 0xFFFFF000, 77, 8 << 4, flags, 502, 0, 0) + opts
    ip = bytearray(struct.pack("!BBHHHBBHII", 0x45, 0, 20 + len(tcp) + size, 0xFFF0, 0x4000, 63, 6, 0,
                               0x0A050102, 0x0A050202))
    struct.pack_into("!H", ip, 10, slow_header_checksum(ip))
    return bytes(ip) + tcp + payload, mss


def test_coalesce_rules_by_example() -> None:
    """The merge rules one at a time on a 10-segment flow (sequence and ID wrap inside it)."""
    packet, mss = _example_flow(14000)
    segments = split(packet, gso_hdr(packet, mss))
    assert len(segments) == 10
    [unit] = coalesce(segments)
    assert resplit([unit]) == segments and vnet.parse(unit).gso_size == mss

    assert merged_groups(edited(segments, 4, 8, 62)) == [4, 1, 5]  # TTL differs
    assert merged_groups(edited(segments, 4, 1, 4)) == [4, 1, 5]  # TOS differs
    assert merged_groups(edited(segments, 4, 33, ACK | PSH)) == [5, 5]  # PSH ends a run
    assert merged_groups(edited(segments, 4, 33, ACK | FIN)) == [4, 1, 5]  # other flags: never merged
    assert merged_groups(edited(segments, 4, 30, 1)) == [4, 1, 5]  # ACK number differs
    assert merged_groups(edited(segments, 4, 45, 0xAA)) == [4, 1, 5]  # options differ
    assert merged_groups(edited(segments, 4, 6, 0)) == [4, 1, 5]  # DF differs
    assert merged_groups(edited(segments, 4, 5, segments[4][5] ^ 0x10)) == [4, 1, 5]  # IP ID gap
    assert merged_groups(edited(segments, 4, 34, segments[4][34] ^ 1)) == [4, 1, 5]  # window differs
    assert merged_groups(edited(segments, 4, 39, 1)) == [4, 1, 5]  # urgent pointer differs
    assert merged_groups(segments[:4] + segments[5:]) == [4, 5]  # sequence gap
    bad = bytearray(segments[4])
    bad[-1] ^= 1
    assert merged_groups(segments[:4] + [bytes(bad)] + segments[5:]) == [4, 1, 5]  # TCP checksum
    bad = bytearray(segments[4])
    bad[11] ^= 1
    assert merged_groups(segments[:4] + [bytes(bad)] + segments[5:]) == [4, 1, 5]  # IP checksum


# -- a real kernel accepts what split makes --------------------------------------------------------------

INJECT_SRC, INJECT_DST = 0x0A630002, 0x0A630001  # 10.99.0.2 -> 10.99.0.1, the TUN's own address


@pytest.mark.netns
@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.lists(super_packets(protocol=6, kernel_valid=True, src=st.just(INJECT_SRC), dst=st.just(INJECT_DST),
                              max_segments=16)
                | super_packets(protocol=17, kernel_valid=True, src=st.just(INJECT_SRC),
                                dst=st.just(INJECT_DST), max_segments=16),
                min_size=1, max_size=8))
def test_kernel_accepts_every_segment(lab, tmp_path: Path, cases) -> None:
    """Inject the segments through a plain TUN: the kernel delivers them all to TCP/UDP and counts
    no header or checksum error (IpInHdrErrors, TcpInCsumErrors, UdpInCsumErrors: what nstat shows)."""
    ns = lab.add_node(len(lab.namespaces))  # a fresh namespace per example; the lab removes them all
    ns.ip("link", "set", "eth0", "down")  # nothing but the TUN may move these counters
    segments = [s for packet, mss in cases for s in split(packet, gso_hdr(packet, mss))]
    path = tmp_path / "packets.bin"
    path.write_bytes(b"".join(len(s).to_bytes(4, "big") + s for s in segments))
    result = ns.run(sys.executable, str(TOOLS / "tuninject.py"), str(path), timeout=60)
    deltas = json.loads(result.stdout)
    assert deltas.get("IpInReceives", 0) == len(segments), deltas
    assert deltas.get("IpInDelivers", 0) == len(segments), deltas
    for bad in ("IpInHdrErrors", "IpInAddrErrors", "IpInDiscards", "TcpInCsumErrors", "TcpInErrs",
                "UdpInCsumErrors", "UdpInErrors"):
        assert deltas.get(bad, 0) == 0, (bad, deltas)


# -- coalesce over several receive batches at once (the engine's layout) --------------------------------


def plan_table(batches: list[list[bytes]], split_after: list[int]) -> tuple[list[tuple[int, int]], list[bytes]]:
    """Lay GRO-like batches (rows of one size, each batch's last maybe shorter) out back to back on row
    boundaries, as the engine receives them, and plan them as one table; return runs and write units."""
    seg = len(batches[0][0])
    rows = [row for batch in batches for row in batch]
    buf = bytearray(len(rows) * seg + gso.BUFFER_SIZE)
    for i, row in enumerate(rows):
        buf[i * seg:i * seg + len(row)] = row
    coalescer = gso.Coalescer(buf)
    plan = coalescer.plan(seg, [sum(map(len, batch)) for batch in batches], split_after=split_after)
    runs = plan.runs
    units = [b"".join(bytes(p) for p in plan.merge(a, b)) if b - a > 1 else vnet.PLAIN + bytes(plan.row(a))
             for a, b in runs]
    return runs, units


def _with_length(packet: bytearray, length: int) -> bytes:
    out = bytearray(packet[:length])
    struct.pack_into("!H", out, 2, length)
    struct.pack_into("!H", out, 10, 0)
    struct.pack_into("!H", out, 10, slow_header_checksum(out))
    return bytes(out)


@settings(max_examples=60, deadline=None)
@given(st.lists(st.integers(1, 50), min_size=1, max_size=5), st.integers(0, 2**32 - 1), st.data())
def test_one_pass_over_many_batches(batch_rows, seq, data) -> None:
    """Consecutive segments of one flow arriving in several batches (some from another peer, some
    damaged) are merged across batches where allowed, never across a peer change, never beyond 64 KB,
    and the kernel's re-split still gives back every packet as it came."""
    mss = data.draw(st.sampled_from([1420, 1432, 1448, 700]))
    segments = []
    left = sum(batch_rows)
    while left:  # consecutive TSO packets of one flow, as a sender makes them
        n = min(left, 40)
        packet = bytearray(_example_flow(n * mss, mss=mss, flags=ACK)[0])
        struct.pack_into("!I", packet, 24, (seq + len(segments) * mss) & 0xFFFFFFFF)
        segments += split(bytes(packet), gso_hdr(bytes(packet), mss))
        left -= n
    if data.draw(st.booleans()):  # a short last segment
        last = bytearray(segments[-1])
        cut = data.draw(st.integers(1, mss - 1))
        segments[-1] = slow_split(bytes(_with_length(last, len(last) - cut)), 1 << 16)[0]
    batches, at = [], 0
    for n in batch_rows:
        batches.append(segments[at:at + n])
        at += n
    batches = [b for b in batches if b]
    if data.draw(st.booleans()):  # damage one row's payload
        b = data.draw(st.integers(0, len(batches) - 1))
        r = data.draw(st.integers(0, len(batches[b]) - 1))
        damaged = bytearray(batches[b][r])
        damaged[-1] ^= 0x55
        batches[b][r] = bytes(damaged)
    split_after = data.draw(st.lists(st.integers(0, len(batches) - 1), unique=True))
    runs, units = plan_table(batches, split_after)
    rows = [row for batch in batches for row in batch]
    assert [r for a, b in runs for r in range(a, b)] == list(range(len(rows)))
    assert resplit(units) == rows
    ends = set()
    at = 0
    for j, batch in enumerate(batches):
        at += len(batch)
        if j in split_after:
            ends.add(at)
    assert not any(a < e < b for a, b in runs for e in ends)


@settings(max_examples=60, deadline=None)
@given(st.lists(super_packets(protocol=6, max_segments=12) | super_packets(protocol=17, max_segments=12)
                | st.binary(min_size=0, max_size=60).map(lambda b: (b, 100)), min_size=1, max_size=6))
def test_one_cut_over_many_packets(cases) -> None:
    """Packets read back to back (as the engine reads them) and cut in one call: each gives exactly
    what it gives alone — its segments, or the same verdict — whatever its neighbours are."""
    buf = bytearray(sum(len(p) + mss + 16 for p, mss in cases) + gso.BUFFER_SIZE)
    items, at = [], 0
    for packet, mss in cases:
        buf[at:at + len(packet)] = packet
        hdr = gso_hdr(packet, mss) if len(packet) >= 20 else TCP_HDR._replace(gso_size=mss)
        items.append((at, len(packet), hdr.gso_type, mss))
        at = at + len(packet) + mss + 7 & ~7
    segmenter = gso.Segmenter(1024)  # grows as needed
    results = segmenter.cut(buf, items)
    for (packet, mss), (_, _, gso_type, _), result in zip(cases, items, results, strict=True):
        alone = split(packet, TCP_HDR._replace(gso_type=gso_type, gso_size=mss))
        if isinstance(result, Refused):
            assert result == alone
        else:
            out = segmenter.out
            got = [bytes(out[result.start + j * result.size:result.start + j * result.size
                             + (result.size if j < result.count - 1 else result.last)])
                   for j in range(result.count)]
            assert got == alone


@settings(max_examples=80, deadline=None)
@given(super_packets(protocol=6, max_segments=12) | super_packets(protocol=17, max_segments=12),
       st.integers(1, 6), st.data())
def test_one_cut_over_a_stream(case, packets, data) -> None:
    """A sender's consecutive TSO/USO bursts of one flow (IDs and sequence numbers counting on, the
    window maybe changing, the last burst maybe short or flagged), cut in one call: each burst gives
    the kernel's segments."""
    template, mss = case
    ihl = (template[0] & 0x0F) * 4
    hl = header_len(template)
    count = max(1, -(-(len(template) - hl) // mss))
    assume(count * packets < 300)
    ident = struct.unpack_from("!H", template, 4)[0]
    seq = struct.unpack_from("!I", template, ihl + 4)[0] if template[9] == 6 else 0
    bursts = []
    for k in range(packets):
        size = count * mss if k < packets - 1 else data.draw(st.integers(0, count * mss))
        size = min(size, 0xFFFF - hl)
        burst = bytearray(template[:hl]) + bytes((i * 7 + k) % 251 for i in range(size))
        struct.pack_into("!HH", burst, 2, len(burst), (ident + k * count) & 0xFFFF)
        if template[9] == 6:
            struct.pack_into("!I", burst, ihl + 4, (seq + k * count * mss) & 0xFFFFFFFF)
            if data.draw(st.booleans()):  # a new window (or timestamp) from one burst to the next
                struct.pack_into("!H", burst, ihl + 14, data.draw(st.integers(0, 0xFFFF)))
            if k == packets - 1:
                burst[ihl + 13] = data.draw(st.sampled_from([burst[ihl + 13], burst[ihl + 13] | PSH | FIN]))
        struct.pack_into("!H", burst, 10, 0)
        struct.pack_into("!H", burst, 10, slow_header_checksum(burst))
        bursts.append(bytes(burst))
    buf = bytearray(sum(len(b) + mss + 16 for b in bursts) + gso.BUFFER_SIZE)
    items, at = [], 0
    for burst in bursts:
        buf[at:at + len(burst)] = burst
        items.append((at, len(burst), gso_hdr(burst, mss).gso_type, mss))
        at = at + len(burst) + mss + 7 & ~7
    segmenter = gso.Segmenter(1024)
    for burst, result in zip(bursts, segmenter.cut(buf, items), strict=True):
        assert not isinstance(result, Refused)
        got = [bytes(segmenter.out[result.start + j * result.size:result.start + j * result.size
                                   + (result.size if j < result.count - 1 else result.last)])
               for j in range(result.count)]
        assert got == slow_split(burst, mss)


# -- cutting for a narrower path (fit_segment_size) ----------------------------------------------------


@settings(max_examples=80, deadline=None)
@given(super_packets(protocol=6, max_segments=12), st.integers(68, 1500) | st.integers(68, 9100))
def test_a_super_packet_cut_to_fit_a_narrower_path(case, largest) -> None:
    """At the size ``fit_segment_size`` gives, every segment fits (or the packet could not be cut:
    its headers leave no room, and the size is unchanged), the cut is the kernel's segmentation at
    that size, and it carries the same TCP bytes from the same sequence number: a TSO super-packet
    is a byte range, any segment size cuts it."""
    packet, mss = case
    hl = header_len(packet)
    fitted = gso.fit_segment_size(packet, 0, len(packet), vnet.GSO_TCPV4, mss, largest)
    assert fitted <= mss
    if hl + min(mss, len(packet) - hl) <= largest:
        assert fitted == mss  # it fits already: nothing changes
        return
    if (largest & ~3) - hl < gso.SMALLEST_CUT:
        assert fitted == mss  # no room for a cut
        return
    assert (hl + fitted) % 4 == 0 and hl + fitted <= largest
    segments = split(packet, gso_hdr(packet, fitted))
    assert segments == slow_split(packet, fitted)
    assert all(len(s) <= largest for s in segments)
    assert b"".join(s[hl:] for s in segments) == packet[hl:]


@given(super_packets(protocol=17, max_segments=6), st.integers(68, 1500))
def test_what_cannot_be_cut_keeps_its_size(case, largest) -> None:
    """A USO segment is one UDP datagram: never cut smaller (the engine answers it as a router would)."""
    packet, mss = case
    assert gso.fit_segment_size(packet, 0, len(packet), vnet.GSO_UDP_L4, mss, largest) == mss
    assert gso.fit_segment_size(packet, 0, len(packet), vnet.GSO_TCPV4, mss, largest) == mss  # not TCP inside


@given(st.binary(max_size=120), st.integers(-4, 130), st.integers(0, 130), st.integers(0, 2000), st.integers(0, 2000))
def test_fit_segment_size_never_raises(data, off, n, gso_size, largest) -> None:
    fitted = gso.fit_segment_size(data, off, n, vnet.GSO_TCPV4, gso_size, largest)
    assert fitted == gso_size or 0 < fitted < gso_size


def test_a_plain_tcp_packet_is_cut_as_a_super_packet_of_one() -> None:
    """The engine re-cuts a datagram the kernel refused (EMSGSIZE) the same way: ``gso_size`` = its
    length. A 1472-byte segment with 12 bytes of TCP options, for a 1372-byte limit: 1320 + 100."""
    packet = bytes(slow_split(_tcp_with_timestamps(1420), 1420)[0])
    assert len(packet) == 1472
    fitted = gso.fit_segment_size(packet, 0, 1472, vnet.GSO_TCPV4, 1472, 1372)
    assert fitted == 1320
    assert [len(s) for s in split(packet, gso_hdr(packet, fitted))] == [1372, 152]
    assert gso.fit_segment_size(packet, 0, 1472, vnet.GSO_TCPV4, 1472, 1472) == 1472  # it fits


def _tcp_with_timestamps(size: int) -> bytes:
    ip = bytearray(struct.pack("!BBHHHBBH4s4s", 0x45, 0, 52 + size, 7, 0x4000, 64, 6, 0,
                               bytes([10, 5, 1, 2]), bytes([10, 5, 2, 2])))
    ip[10:12] = slow_header_checksum(bytes(ip)).to_bytes(2, "big")
    tcp = struct.pack("!HHIIBBHHH", 40000, 5201, 1000, 5, 8 << 4, ACK, 500, 0, 0) + b"\x01\x01\x08\x0a" + bytes(8)
    return bytes(ip) + tcp + bytes(i % 251 for i in range(size))
