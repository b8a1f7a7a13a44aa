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
from tests.strategies import slow_checksum, slow_header_checksum, super_packets
from tun import gso, vnet
from tun.gso import ACK, CWR, FIN, PSH
from udpflannel.packet import Verdict

TCP_HDR = vnet.VnetHdr(vnet.NEEDS_CSUM, vnet.GSO_TCPV4, 0, 0, 0, 16)


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
    segments = gso.split(packet, gso_hdr(packet, mss, hdr_len=junk_hdr_len))
    assert segments == slow_split(packet, mss)


@given(super_packets(protocol=6) | super_packets(protocol=17))
def test_split_segments_are_ordinary_packets(case) -> None:
    """Every segment is a valid IPv4 packet no bigger than headers + gso_size, the payloads add up to
    the original, and FIN/PSH travel only on the last segment, CWR only on the first."""
    packet, mss = case
    segments = gso.split(packet, gso_hdr(packet, mss))
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
    result = gso.split(data, vnet.VnetHdr(vnet.NEEDS_CSUM, gso_type, 0, mss, 20, 16))
    assert isinstance(result, (list, Verdict))
    if isinstance(result, list):
        for segment in result:
            assert_valid(segment)


def test_split_refuses_what_it_cannot_cut() -> None:
    packet, _ = _example_flow(3000)
    assert gso.split(packet[:10], TCP_HDR._replace(gso_size=1000)) == Verdict.TOO_SHORT
    assert gso.split(b"\x60" + packet[1:], TCP_HDR._replace(gso_size=1000)) == Verdict.NOT_IPV4
    assert gso.split(packet, TCP_HDR._replace(gso_type=vnet.GSO_TCPV6, gso_size=1000)) == Verdict.NOT_IPV4
    assert gso.split(packet, TCP_HDR._replace(gso_type=vnet.GSO_UDP_L4, gso_size=1000)) == Verdict.BAD_HEADER
    assert gso.split(packet, TCP_HDR._replace(gso_size=0)) == Verdict.BAD_HEADER
    assert gso.split(packet + b"x", TCP_HDR._replace(gso_size=1000)) == Verdict.BAD_HEADER  # length mismatch
    fragment = bytearray(packet)
    fragment[6] |= 0x20  # MF
    assert gso.split(bytes(fragment), TCP_HDR._replace(gso_size=1000)) == Verdict.BAD_HEADER


@given(super_packets(protocol=6, max_segments=1) | super_packets(protocol=17, max_segments=1))
def test_complete_checksum_finishes_a_partial_sum(case) -> None:
    """NEEDS_CSUM without GSO: the field holds the pseudo-header sum; the result is the full checksum."""
    packet, _ = case
    ihl = (packet[0] & 0x0F) * 4
    offset = 16 if packet[9] == 6 else 6
    pseudo = packet[12:20] + bytes([0, packet[9]]) + struct.pack("!H", len(packet) - ihl)
    partial = bytearray(packet)
    struct.pack_into("!H", partial, ihl + offset, ~slow_checksum(pseudo) & 0xFFFF)
    [done] = gso.split(bytes(partial), vnet.VnetHdr(vnet.NEEDS_CSUM, 0, 0, 0, ihl, offset))
    assert_valid(done)
    assert done[:ihl + offset] == packet[:ihl + offset] and done[ihl + offset + 2:] == packet[ihl + offset + 2:]
    assert gso.split(bytes(partial), vnet.VnetHdr(vnet.NEEDS_CSUM, 0, 0, 0, ihl, len(packet))) == Verdict.BAD_HEADER


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
        assert (hdr.flags, hdr.gso_type, hdr.csum_start, hdr.csum_offset) == (vnet.NEEDS_CSUM, vnet.GSO_TCPV4, ihl, 16)
        assert hdr.hdr_len == header_len(packet) and len(packet) <= 0xFFFF
        assert slow_checksum(packet[:ihl]) == 0
        # the TCP checksum field holds the folded pseudo-header sum, as NEEDS_CSUM wants
        pseudo = packet[12:20] + bytes([0, 6]) + struct.pack("!H", len(packet) - ihl)
        assert struct.unpack_from("!H", packet, ihl + 16)[0] % 0xFFFF == (~slow_checksum(pseudo) & 0xFFFF) % 0xFFFF
        segments = gso.split(packet, hdr)
        assert isinstance(segments, list) and len(segments) >= 2
        out.extend(segments)
    return out


@given(super_packets(protocol=6, max_segments=48), st.data())
def test_split_then_coalesce_gives_back_the_stream(case, data) -> None:
    """split → coalesce → the kernel's re-split is the same list of packets, so the byte stream is
    the original; flows with only ACK/ACK|PSH segments are merged, nothing else is."""
    packet, mss = case
    segments = gso.split(packet, gso_hdr(packet, mss))
    units = gso.coalesce(segments)
    assert resplit(units) == segments
    hl = header_len(packet)
    flags = packet[(packet[0] & 0x0F) * 4 + 13]
    if flags & ~PSH == ACK and packet[0] == 0x45 and len(segments) > 1 and hl + mss <= 0xFFFF // 2 and mss > 1:
        assert len(units) < len(segments)


@given(super_packets(protocol=6, max_segments=48), st.data())
def test_coalesce_merges_nothing_damaged(case, data) -> None:
    """Flip one byte of one segment anywhere: that segment is never merged (its IP or TCP checksum no
    longer verifies, or a field no longer matches), so the kernel still sees it as it came."""
    packet, mss = case
    packet = _with_ihl5(packet)
    segments = gso.split(packet, gso_hdr(packet, mss))
    assume(len(segments) > 1)
    victim = data.draw(st.integers(0, len(segments) - 1))
    spot = data.draw(st.integers(0, len(segments[victim]) - 1))
    damaged = bytearray(segments[victim])
    damaged[spot] ^= data.draw(st.integers(1, 255))
    segments[victim] = bytes(damaged)
    assert resplit(gso.coalesce(segments)) == segments


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
    segments = gso.split(packet, gso_hdr(packet, mss))
    assert len(segments) == 10
    [unit] = gso.coalesce(segments)
    assert resplit([unit]) == segments and vnet.parse(unit).gso_size == mss

    def merged_groups(packets: list[bytes]) -> list[int]:
        return [len(resplit([u])) for u in gso.coalesce(packets)]

    def edit(i: int, offset: int, value: int) -> list[bytes]:
        out = list(segments)
        seg = bytearray(out[i])
        seg[offset] = value
        struct.pack_into("!H", seg, 10, 0)
        struct.pack_into("!H", seg, 10, slow_header_checksum(seg))
        out[i] = slow_split(bytes(seg), 1 << 16)[0] if offset >= 20 else bytes(seg)
        return out

    assert merged_groups(edit(4, 8, 62)) == [4, 1, 5]  # TTL differs
    assert merged_groups(edit(4, 1, 4)) == [4, 1, 5]  # TOS differs
    assert merged_groups(edit(4, 33, ACK | PSH)) == [5, 5]  # PSH ends a run
    assert merged_groups(edit(4, 33, ACK | FIN)) == [4, 1, 5]  # other flags: never merged
    assert merged_groups(edit(4, 30, 1)) == [4, 1, 5]  # ACK number differs
    assert merged_groups(edit(4, 45, 0xAA)) == [4, 1, 5]  # options differ
    assert merged_groups(edit(4, 6, 0)) == [4, 1, 5]  # DF differs
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
    segments = [s for packet, mss in cases for s in gso.split(packet, gso_hdr(packet, mss))]
    path = tmp_path / "packets.bin"
    path.write_bytes(b"".join(len(s).to_bytes(4, "big") + s for s in segments))
    result = ns.run(sys.executable, str(TOOLS / "tuninject.py"), str(path), timeout=60)
    deltas = json.loads(result.stdout)
    assert deltas.get("IpInReceives", 0) == len(segments), deltas
    assert deltas.get("IpInDelivers", 0) == len(segments), deltas
    for bad in ("IpInHdrErrors", "IpInAddrErrors", "IpInDiscards", "TcpInCsumErrors", "TcpInErrs",
                "UdpInCsumErrors", "UdpInErrors"):
        assert deltas.get(bad, 0) == 0, (bad, deltas)
