"""udpflannel.packet: header checks, TTL decrement with checksum patch, checksums."""

from __future__ import annotations

import struct
from ipaddress import IPv4Address

import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from tests.strategies import ipv4_headers, ipv4_packets, slow_checksum, slow_header_checksum
from tests.tools import hostile
from udpflannel.packet import (
    IPV4_MIN_HEADER,
    PROTO_ICMP,
    PROTO_TCP,
    PROTO_UDP,
    Verdict,
    check_ipv4,
    check_ipv4_checksum,
    check_transport,
    decrement_ttl,
    dst_u32,
    internet_checksum,
    ipv4_header_checksum,
    src_u32,
)

# A 20-byte UDP header 10.5.35.2 -> 10.9.1.5, TTL 64, ID 0x1234, DF, total 36 (flannel §7.7).
SAMPLE = bytes.fromhex("45000024123440004011f0800a0523020a090105") + bytes(16)


def test_constants_and_verdict_labels() -> None:
    """The values and lower-case names are a contract with the engine and the metrics."""
    assert (IPV4_MIN_HEADER, PROTO_ICMP, PROTO_TCP, PROTO_UDP) == (20, 1, 6, 17)
    assert [(v.name.lower(), int(v)) for v in Verdict] == [
        ("forward", 0),
        ("too_short", 1),
        ("not_ipv4", 2),
        ("bad_header", 3),
        ("ttl_expired", 4),
        ("no_route", 5),
        ("oversize", 6),
        ("unknown_peer", 7),
        ("spoofed_source", 8),
        ("bad_checksum", 9),
        ("too_big", 10),
        ("bad_l4_checksum", 11),
    ]


# -- check_ipv4 ------------------------------------------------------------------------------


def slow_verdict(data: bytes) -> Verdict:
    """The rules of check_ipv4 written out as a decision list over exactly the valid bytes."""
    if len(data) < 20:
        return Verdict.TOO_SHORT
    version_ihl, _, total = struct.unpack("!BBH", data[:4])
    if version_ihl >> 4 != 4:
        return Verdict.NOT_IPV4
    if (version_ihl & 15) < 5 or (version_ihl & 15) * 4 > len(data) or total != len(data):
        return Verdict.BAD_HEADER
    return Verdict.FORWARD


@given(st.binary(max_size=80), st.integers(-4, 100))
def test_check_ipv4_never_raises_and_reads_only_valid_bytes(data: bytes, n: int) -> None:
    """Any bytes, any n (also past the buffer): a verdict, decided by the first min(n, len) bytes."""
    verdict = check_ipv4(data, n)
    assert type(verdict) is Verdict
    assert verdict == slow_verdict(data[: max(n, 0)])
    padded = data + bytes(20)
    assert src_u32(data) == (struct.unpack_from("!I", padded, 12)[0] if len(data) >= 16 else 0)
    assert dst_u32(memoryview(data)) == (struct.unpack_from("!I", padded, 16)[0] if len(data) >= 20 else 0)


@given(ipv4_packets(), st.binary(max_size=32))
def test_valid_packet_in_longer_buffer_forwards(packet: bytearray, stale: bytes) -> None:
    """A preallocated receive buffer holds stale bytes after the packet: only n counts."""
    buf = bytearray(packet + stale)
    assert check_ipv4(buf, len(packet)) == Verdict.FORWARD
    assert check_ipv4(memoryview(buf), len(packet)) == Verdict.FORWARD
    if stale:
        assert check_ipv4(buf, len(buf)) == Verdict.BAD_HEADER  # total length != n
        assert check_ipv4(buf, len(packet) - 1) != Verdict.FORWARD


def test_check_ipv4_cases() -> None:
    assert check_ipv4(SAMPLE, 36) == Verdict.FORWARD
    assert check_ipv4(SAMPLE, 19) == Verdict.TOO_SHORT
    assert check_ipv4(SAMPLE[:19], 36) == Verdict.TOO_SHORT
    assert check_ipv4(b"", 0) == Verdict.TOO_SHORT
    ipv6 = bytes.fromhex("6000000000083aff") + bytes(40)  # a 48-byte IPv6 packet, as the kernel writes
    assert check_ipv4(ipv6, 48) == Verdict.NOT_IPV4
    assert check_ipv4(b"\x00" * 20, 20) == Verdict.NOT_IPV4
    for first in (0x40, 0x44):  # IHL 0 and 4
        assert check_ipv4(bytes([first]) + SAMPLE[1:], 36) == Verdict.BAD_HEADER
    assert check_ipv4(b"\x46" + SAMPLE[1:], 36) == Verdict.FORWARD  # IHL 6 <= 36
    long_ihl = b"\x4f\x00\x00\x24" + SAMPLE[4:]  # IHL 15 = 60 bytes > total 36
    assert check_ipv4(long_ihl + bytes(30), 36) == Verdict.BAD_HEADER
    assert check_ipv4(SAMPLE[:2] + b"\x00\x25" + SAMPLE[4:], 36) == Verdict.BAD_HEADER


def test_addresses() -> None:
    assert src_u32(SAMPLE) == int(IPv4Address("10.5.35.2"))
    assert dst_u32(memoryview(SAMPLE)) == int(IPv4Address("10.9.1.5"))


@given(ipv4_headers())
def test_addresses_match_ipaddress(header: bytearray) -> None:
    assert src_u32(header) == int(IPv4Address(bytes(header[12:16])))
    assert dst_u32(memoryview(header)) == int(IPv4Address(bytes(header[16:20])))


# -- checksums -------------------------------------------------------------------------------


@given(st.binary(max_size=80) | st.sampled_from([b"", b"\0", b"\0\0\0", b"\xff\xff", b"\xff\xff\xff"]))
def test_internet_checksum_matches_rfc1071_loop(data: bytes) -> None:
    assert internet_checksum(data) == slow_checksum(data)
    assert internet_checksum(memoryview(bytearray(data))) == slow_checksum(data)


def test_internet_checksum_edges() -> None:
    """Sum 0xFFFF stores 0x0000 (not the equivalent 0xFFFF); all-zero data stores 0xFFFF."""
    assert internet_checksum(b"\xff\xff") == 0x0000
    assert internet_checksum(b"\xf0\x00\x0f\xff") == 0x0000
    assert internet_checksum(b"\x00\x00") == 0xFFFF
    assert internet_checksum(b"\x00\x01\xf2") == (~(0x0001 + 0xF200) & 0xFFFF)


@given(ipv4_packets(), st.data())
def test_header_checksum_recomputes_and_verifies(packet: bytearray, data: st.DataObject) -> None:
    header_len = (packet[0] & 15) * 4
    stored = struct.unpack_from("!H", packet, 10)[0]
    assert ipv4_header_checksum(packet) == stored  # whole packet in, header only read
    assert check_ipv4_checksum(packet, len(packet))
    assert check_ipv4_checksum(memoryview(packet), len(packet))
    # Any one flipped bit (past the version/IHL byte, which would change what is summed) is caught.
    position = data.draw(st.integers(1, header_len - 1))
    packet[position] ^= 1 << data.draw(st.integers(0, 7))
    assert not check_ipv4_checksum(packet, len(packet))
    assert ipv4_header_checksum(packet) == slow_header_checksum(packet)


def test_check_ipv4_checksum_rejects_what_is_not_a_header() -> None:
    assert check_ipv4_checksum(SAMPLE, 36)
    assert not check_ipv4_checksum(SAMPLE, 19)
    assert not check_ipv4_checksum(b"\x00" * 20, 20)  # sums to 0, which is not 0xFFFF
    assert not check_ipv4_checksum(b"\x4f" + SAMPLE[1:20], 20)  # IHL 15 past n


@given(st.binary(max_size=80), st.integers(-4, 100))
def test_check_ipv4_checksum_never_raises(data: bytes, n: int) -> None:
    assert check_ipv4_checksum(data, n) in (True, False)


# -- decrement_ttl ---------------------------------------------------------------------------

FLANNEL_VECTORS = [  # flannel-compat.md §7.6, verified against flanneld
    (0xF080, 0xF180),
    (0xFEFF, 0x0000),
    (0xFFFF, 0x0100),
    (0xFF10, 0x0011),
    (0xFFFE, 0x00FF),
    (0x00FF, 0x01FF),
    (0x1234, 0x1334),
]


@pytest.mark.parametrize(("before", "after"), FLANNEL_VECTORS)
def test_decrement_ttl_flannel_vectors(before: int, after: int) -> None:
    buf = bytearray(SAMPLE)
    struct.pack_into("!H", buf, 10, before)
    assert decrement_ttl(buf)
    assert buf[8] == 63
    assert struct.unpack_from("!H", buf, 10)[0] == after
    assert buf[:8] == SAMPLE[:8] and buf[9] == SAMPLE[9] and buf[12:] == SAMPLE[12:]


def test_decrement_ttl_every_checksum_value() -> None:
    """All 65536 stored checksums follow the §7.6 rule, the fast no-carry branch and the rest alike."""
    buf = bytearray(SAMPLE)
    for before in range(0x10000):
        buf[8] = 2
        struct.pack_into("!H", buf, 10, before)
        assert decrement_ttl(buf) and buf[8] == 1
        rule = before + 0x0100
        rule = (rule & 0xFFFF) + (rule >> 16)
        assert struct.unpack_from("!H", buf, 10)[0] == (0 if rule == 0xFFFF else rule), hex(before)


@given(ipv4_packets(ttl=st.integers(2, 255)), st.integers(0, 7))
def test_decrement_ttl_equals_full_recomputation(packet: bytearray, offset: int) -> None:
    """For every valid header, the incremental patch gives the from-scratch checksum exactly."""
    # Also inside a larger buffer through a memoryview, as the engine's receive buffers are.
    backing = bytearray(offset) + packet + b"\xee" * 8
    view = memoryview(backing)[offset : offset + len(packet)]
    assert decrement_ttl(view)
    expected = bytearray(packet)
    expected[8] -= 1
    struct.pack_into("!H", expected, 10, slow_header_checksum(expected))
    assert backing == bytearray(offset) + expected + b"\xee" * 8
    assert check_ipv4_checksum(view, len(packet))


@given(ipv4_packets(ttl=st.sampled_from([0, 1])))
def test_ttl_zero_and_one_dropped_untouched(packet: bytearray) -> None:
    """flannel forwards TTL 0 as 255 (§7.6); here TTL 0 and 1 are both dropped, buffer unchanged."""
    before = bytes(packet)
    assert not decrement_ttl(packet)
    assert packet == before


@given(ipv4_packets(ttl=st.integers(2, 255)))
def test_decrement_ttl_repeatedly_stays_valid(packet: bytearray) -> None:
    ttl = packet[8]
    while decrement_ttl(packet):
        assert check_ipv4_checksum(packet, len(packet))
    assert packet[8] == 1 and ttl >= 2
    assert struct.unpack_from("!H", packet, 10)[0] == slow_header_checksum(packet)


def test_decrement_ttl_needs_a_writable_buffer() -> None:
    with pytest.raises(TypeError):
        decrement_ttl(SAMPLE)


@given(ipv4_headers())
def test_header_strategy_sanity(header: bytearray) -> None:
    """The strategy really yields headers the core accepts (or the properties above prove little)."""
    assert check_ipv4(header, len(header)) == Verdict.FORWARD
    assume(header[8] > 1)
    assert decrement_ttl(header)


# -- check_transport -------------------------------------------------------------------------

CHECKSUM_PROBLEMS = {"TCP checksum", "UDP checksum", "ICMP checksum"}


@st.composite
def transport_packets(draw) -> bytearray:
    """A valid IPv4 packet carrying TCP, UDP, ICMP or GRE (not checked), maybe with NOP options, maybe a
    fragment; then maybe damaged: a byte of the transport part flipped, cut short (lengths fixed up), a
    UDP checksum of 0 ("none"), another fragment offset."""
    proto = draw(st.sampled_from([PROTO_ICMP, PROTO_TCP, PROTO_UDP, 47]))
    payload = draw(st.binary(max_size=80))
    ports = draw(st.tuples(st.integers(0, 0xFFFF), st.integers(0, 0xFFFF)))
    if proto == PROTO_TCP:
        body = hostile.tcp(*ports, draw(st.integers(0, 2**32 - 1)), draw(st.integers(0, 0xFF)), payload,
                           timestamps=draw(st.booleans()))
    elif proto == PROTO_UDP:
        body = hostile.udp(*ports, payload)
    elif proto == PROTO_ICMP:
        body = hostile.echo(*ports, payload)
    else:
        body = payload
    options = b"\x01\x01\x01\x01" * draw(st.integers(0, 2))
    packet = hostile.ipv4(proto, body, b"\x0a\x05\x02\x07", b"\x0a\x05\x01\x02", options=options,
                          frag=draw(st.sampled_from([0, 0x4000, 0x2000, 0x2000 | 185, 0x1FFF, 0x1FF0])))
    ihl = len(packet) - len(body)
    damage = draw(st.sampled_from(["none", "flip", "cut", "udp_none"]))
    if damage == "flip" and body:
        packet[draw(st.integers(ihl, len(packet) - 1))] ^= draw(st.integers(1, 255))
    elif damage == "cut":
        del packet[draw(st.integers(ihl, len(packet))):]
        packet[2:4] = len(packet).to_bytes(2, "big")
        hostile.fix_ip(packet)
    elif damage == "udp_none" and proto == PROTO_UDP and len(packet) >= ihl + 8:
        packet[ihl + 6:ihl + 8] = b"\0\0"
    return packet


@settings(max_examples=500)
@given(transport_packets())
def test_check_transport_is_the_receiving_hosts_judgement(packet: bytearray) -> None:
    """Against the slow reference (word-by-word sums): FORWARD exactly for what a receiving host would
    take, BAD_L4_CHECKSUM for a checksum that does not verify, BAD_HEADER for a transport header that
    does not fit (or a fragment out of bounds); any buffer type, never raises, reads nothing past n."""
    assert check_ipv4(packet, len(packet)) == Verdict.FORWARD and check_ipv4_checksum(packet, len(packet))
    why = hostile.problem(bytes(packet))
    expected = Verdict.FORWARD if not why else Verdict.BAD_L4_CHECKSUM if why in CHECKSUM_PROBLEMS else Verdict.BAD_HEADER
    assert check_transport(packet, len(packet)) == expected, why
    assert check_transport(memoryview(bytes(packet) + b"\xa5" * 9)[:len(packet)], len(packet)) == expected
    assert check_transport(bytearray(packet) + bytearray(b"\x5a" * 9), len(packet)) == expected


def test_check_transport_cases() -> None:
    def verdict(proto: int, body: bytes, frag: int = 0x4000) -> Verdict:
        packet = hostile.ipv4(proto, body, b"\x0a\x05\x02\x07", b"\x0a\x05\x01\x02", frag=frag)
        return check_transport(packet, len(packet))

    echo = hostile.echo(7, 1, b"ping")
    assert verdict(PROTO_ICMP, echo) == Verdict.FORWARD
    zeros = hostile.ipv4(PROTO_ICMP, bytes(8), b"\x0a\x05\x02\x07", b"\x0a\x05\x01\x02")
    zeros[20:28] = bytes(8)  # all zeros, checksum field included: sums to 0, not 0xFFFF
    assert check_transport(zeros, len(zeros)) == Verdict.BAD_L4_CHECKSUM
    assert verdict(PROTO_ICMP, echo[:7]) == Verdict.BAD_HEADER
    assert verdict(PROTO_TCP, hostile.tcp(1, 2, 3, 0x10)[:19]) == Verdict.BAD_HEADER
    segment = bytearray(hostile.tcp(1, 2, 3, 0x10, b"data"))
    segment[12] = 4 << 4  # data offset 4
    assert verdict(PROTO_TCP, bytes(segment)) == Verdict.BAD_HEADER
    segment[12] = 15 << 4  # 60 bytes, past the segment
    assert verdict(PROTO_TCP, bytes(segment)) == Verdict.BAD_HEADER
    datagram = bytearray(hostile.udp(1, 2, b"data"))
    assert verdict(PROTO_UDP, bytes(datagram)) == Verdict.FORWARD
    datagram[4:6] = (11).to_bytes(2, "big")  # UDP length != IP payload
    assert verdict(PROTO_UDP, bytes(datagram)) == Verdict.BAD_HEADER
    assert verdict(PROTO_UDP, hostile.udp(1, 2, b"")[:7]) == Verdict.BAD_HEADER
    # fragments: only their bounds; a first one must hold its transport header
    assert verdict(PROTO_TCP, b"x" * 8, frag=0x2000) == Verdict.BAD_HEADER  # RFC 1858's tiny fragment
    assert verdict(PROTO_TCP, b"x" * 20, frag=0x2000) == Verdict.FORWARD
    assert verdict(PROTO_UDP, b"x" * 8, frag=0x2000) == Verdict.FORWARD
    assert verdict(PROTO_UDP, b"x" * 11, frag=0x1FFC) == Verdict.FORWARD  # 20 + 65,504 + 11: 65,535 exactly
    assert verdict(PROTO_UDP, b"x" * 12, frag=0x1FFC) == Verdict.BAD_HEADER  # one past: the ping of death
    assert verdict(PROTO_UDP, b"x" * 12, frag=0x3FFC) == Verdict.BAD_HEADER
    assert verdict(47, b"gre?") == Verdict.FORWARD  # other protocols: a router's business only
