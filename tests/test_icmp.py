"""udpflannel.icmp: when ICMP errors may be sent, and what they contain."""

from __future__ import annotations

import struct
from ipaddress import IPv4Address

import pytest
from hypothesis import given
from hypothesis import strategies as st

from tests.strategies import ipv4_packets, slow_checksum, slow_header_checksum, u8, u16, u32, unicast_u32
from udpflannel.icmp import (
    build_icmp_error,
    frag_needed,
    may_send_icmp_error,
    net_unreachable,
    time_exceeded,
)
from udpflannel.packet import PROTO_ICMP, PROTO_UDP

TUN_ADDR = int(IPv4Address("10.5.35.0"))

# flannel-compat.md §7.7, verified against flanneld: net unreachable from 10.5.35.0 (TTL 8) about
# UDP 10.5.35.2:40000 -> 10.9.1.5:53, TTL 64, ID 0x1234, DF.
FLANNEL_VECTOR = bytes.fromhex(
    "45 00 00 38 00 00 00 00 08 01 58 ba 0a 05 23 00"
    "0a 05 23 02 03 00 60 7a 00 00 00 00 45 00 00 24"
    "12 34 40 00 40 11 f0 80 0a 05 23 02 0a 09 01 05"
    "9c 40 00 35 00 10 00 00"
)
# The offender the vector quotes: total length 0x24 = 20 + UDP length 0x10 (8 header + 8 data);
# its 8 data bytes lie beyond the quote, so any will do.
FLANNEL_OFFENDER = (
    bytes.fromhex("45000024123440004011f0800a0523020a090105")  # IPv4 header
    + bytes.fromhex("9c40003500100000")  # UDP 40000 -> 53, length 16, no checksum
    + b"example!"
)

# Offenders an error is allowed about: first fragments (any flags) between unicast hosts.
first_fragments = st.integers(0, 7).map(lambda flags: flags << 13)
allowed_offenders = ipv4_packets(
    frag=first_fragments, protocol=u8.filter(lambda p: p != PROTO_ICMP), src=unicast_u32, dst=unicast_u32
)


def quoted_len(offender: bytes, n: int) -> int:
    header_len = (offender[0] & 15) * 4
    total = struct.unpack_from("!H", offender, 2)[0]
    return min(header_len + 8, n, total, len(offender))


def assert_well_formed(error: bytes, offender: bytes, n: int, *, src: int, ttl: int = 64) -> bytes:
    """Check the IP header and ICMP checksum of ``error``; return its ICMP part."""
    version_ihl, tos, total, ident, frag, got_ttl, proto, _, got_src, got_dst = struct.unpack_from(
        "!BBHHHBBHII", error
    )
    assert (version_ihl, tos, total, ident, frag, got_ttl, proto) == (0x45, 0, len(error), 0, 0, ttl, 1)
    assert (got_src, got_dst) == (src, struct.unpack_from("!I", offender, 12)[0])
    assert struct.unpack_from("!H", error, 10)[0] == slow_header_checksum(error)
    icmp = error[20:]
    assert slow_checksum(icmp) == 0  # checksum field included: the sum is 0xFFFF
    assert icmp[8:] == offender[: quoted_len(offender, n)]
    return icmp


def test_flannel_vector_byte_for_byte() -> None:
    assert len(FLANNEL_VECTOR) == 56
    assert slow_header_checksum(FLANNEL_OFFENDER) == 0xF080
    error = build_icmp_error(FLANNEL_OFFENDER, 36, icmp_type=3, code=0, src=TUN_ADDR, ttl=8)
    assert error == FLANNEL_VECTOR
    assert net_unreachable(FLANNEL_OFFENDER, 36, src=TUN_ADDR, ttl=8) == FLANNEL_VECTOR


@given(allowed_offenders, unicast_u32, u8)
def test_net_unreachable_is_well_formed(offender: bytearray, src: int, ttl: int) -> None:
    error = net_unreachable(offender, len(offender), src=src, ttl=ttl)
    assert error is not None
    icmp = assert_well_formed(error, offender, len(offender), src=src, ttl=ttl)
    assert icmp[:2] == b"\x03\x00" and icmp[4:8] == bytes(4)


@given(allowed_offenders, unicast_u32, st.integers(68, 0xFFFF))
def test_time_exceeded_and_frag_needed(offender: bytearray, src: int, mtu: int) -> None:
    icmp = assert_well_formed(
        time_exceeded(offender, len(offender), src=src), offender, len(offender), src=src
    )
    assert icmp[:2] == b"\x0b\x00" and icmp[4:8] == bytes(4)
    error = frag_needed(offender, len(offender), src=src, mtu=mtu)
    icmp = assert_well_formed(error, offender, len(offender), src=src)
    assert icmp[:2] == b"\x03\x04" and icmp[4:8] == b"\x00\x00" + mtu.to_bytes(2, "big")  # RFC 1191


def test_next_hop_mtu_only_for_frag_needed() -> None:
    for icmp_type, code, field in [(3, 4, b"\x00\x00\x05\xdc"), (3, 0, bytes(4)), (11, 0, bytes(4))]:
        error = build_icmp_error(
            FLANNEL_OFFENDER, 36, icmp_type=icmp_type, code=code, src=TUN_ADDR, next_hop_mtu=1500
        )
        assert error is not None and error[24:28] == field
    with pytest.raises(ValueError):
        frag_needed(FLANNEL_OFFENDER, 36, src=TUN_ADDR, mtu=0x10000)


@given(allowed_offenders, st.data())
def test_quote_never_reads_past_n(offender: bytearray, data: st.DataObject) -> None:
    """A receive buffer holds stale bytes past n: flannel quotes them (§7.7), this must not."""
    header_len = (offender[0] & 15) * 4
    n = data.draw(st.integers(header_len, len(offender)))
    buf = bytearray(offender[:n]) + b"\xee" * 64
    error = net_unreachable(memoryview(buf), n, src=TUN_ADDR)
    assert error is not None
    icmp = assert_well_formed(error, bytes(buf), n, src=TUN_ADDR)
    assert len(icmp) == 8 + min(header_len + 8, n)


@given(allowed_offenders, st.binary(min_size=1, max_size=16))
def test_quote_stops_at_total_length(offender: bytearray, trailer: bytes) -> None:
    """Padding after the packet (n > total length) is not part of the offender."""
    buf = offender + trailer
    icmp = assert_well_formed(net_unreachable(buf, len(buf), src=TUN_ADDR), buf, len(buf), src=TUN_ADDR)
    assert icmp[8:] == offender[: (offender[0] & 15) * 4 + 8]


def test_sixty_byte_header_is_quoted_whole() -> None:
    """flannel refuses ihl*4 >= 60 (an off-by-one); a 60-byte header is legal."""
    offender = bytearray(b"\x4f" + FLANNEL_OFFENDER[1:20] + bytes(40) + FLANNEL_OFFENDER[20:])
    struct.pack_into("!HH", offender, 2, len(offender), 0)
    struct.pack_into("!H", offender, 10, slow_header_checksum(offender))
    error = net_unreachable(offender, len(offender), src=TUN_ADDR)
    assert error is not None and len(error) == 20 + 8 + 60 + 8


@pytest.mark.parametrize(("icmp_type", "allowed"), [
    (0, True), (8, True), (13, True), (14, True), (3, False), (4, False), (5, False), (11, False), (12, False),
])  # fmt: skip
def test_icmp_offenders(icmp_type: int, allowed: bool) -> None:
    """No errors about ICMP errors; queries such as echo requests (8) do get one, unlike flannel."""
    offender = bytearray(FLANNEL_OFFENDER)
    offender[9] = PROTO_ICMP
    offender[20] = icmp_type
    assert may_send_icmp_error(offender, len(offender)) is allowed
    assert (net_unreachable(offender, len(offender), src=TUN_ADDR) is not None) is allowed


def test_icmp_offender_without_a_type_byte() -> None:
    """An ICMP packet cut off after its IP header might be an error: stay quiet."""
    offender = bytearray(FLANNEL_OFFENDER[:20])
    offender[9] = PROTO_ICMP
    struct.pack_into("!H", offender, 2, 20)
    assert not may_send_icmp_error(offender, 20)
    offender[9] = PROTO_UDP
    assert may_send_icmp_error(offender, 20)


@given(allowed_offenders, st.integers(1, 0x1FFF), st.integers(0, 7))
def test_no_error_about_non_first_fragments(offender: bytearray, offset: int, flags: int) -> None:
    struct.pack_into("!H", offender, 6, flags << 13 | offset)
    assert not may_send_icmp_error(offender, len(offender))
    assert time_exceeded(offender, len(offender), src=TUN_ADDR) is None


@pytest.mark.parametrize(("field", "addr", "allowed"), [
    (12, "0.0.0.0", False), (12, "127.0.0.1", False), (12, "127.255.0.9", False), (12, "224.0.0.1", False),
    (12, "239.255.255.255", False), (12, "255.255.255.255", False), (12, "240.0.0.1", False),
    (12, "0.0.0.1", True), (12, "126.255.255.255", True), (12, "128.0.0.0", True), (12, "223.255.255.255", True),
    (16, "224.0.0.5", False), (16, "239.1.2.3", False), (16, "255.255.255.255", False),
    (16, "0.0.0.0", True), (16, "10.9.1.255", True), (16, "223.255.255.255", True),
])  # fmt: skip
def test_address_rules(field: int, addr: str, allowed: bool) -> None:
    """Only sources naming one host; no multicast or broadcast destinations (RFC 1812 §4.3.2.7)."""
    offender = bytearray(FLANNEL_OFFENDER)
    offender[field : field + 4] = IPv4Address(addr).packed
    assert may_send_icmp_error(offender, len(offender)) is allowed


@given(st.binary(max_size=80), st.integers(-4, 100), u16, u32)
def test_garbage_never_raises(data: bytes, n: int, mtu: int, src: int) -> None:
    allowed = may_send_icmp_error(data, n)
    assert allowed in (True, False)
    error = frag_needed(data, n, src=src, mtu=mtu)
    assert (error is not None) is allowed
    if error is not None:
        assert_well_formed(error, data, min(n, len(data)), src=src)


def test_unusable_offenders() -> None:
    assert not may_send_icmp_error(FLANNEL_OFFENDER, 19)
    assert not may_send_icmp_error(b"\x65" + FLANNEL_OFFENDER[1:], 36)  # version 6
    assert not may_send_icmp_error(b"\x44" + FLANNEL_OFFENDER[1:], 36)  # IHL 4
    assert not may_send_icmp_error(b"\x46" + FLANNEL_OFFENDER[1:], 23)  # header past n
    assert not may_send_icmp_error(
        FLANNEL_OFFENDER[:2] + b"\x00\x13" + FLANNEL_OFFENDER[4:], 36
    )  # total < 20
    assert may_send_icmp_error(FLANNEL_OFFENDER, 36)


def test_error_for_a_verdict_is_the_routers_answer() -> None:
    from udpflannel.icmp import error_for
    from udpflannel.packet import Verdict

    offender = bytes(FLANNEL_OFFENDER)
    assert error_for(Verdict.NO_ROUTE, offender, 36, src=TUN_ADDR) == net_unreachable(offender, 36, src=TUN_ADDR)
    assert error_for(Verdict.TTL_EXPIRED, offender, 36, src=TUN_ADDR) == time_exceeded(offender, 36, src=TUN_ADDR)
    assert error_for(Verdict.NO_ROUTE, offender, 36, src=TUN_ADDR) is not None
    for quiet in set(Verdict) - {Verdict.NO_ROUTE, Verdict.TTL_EXPIRED}:
        assert error_for(quiet, offender, 36, src=TUN_ADDR) is None


def test_rate_limiter_allows_a_burst_then_the_rate() -> None:
    from udpflannel.icmp import RateLimiter

    limiter = RateLimiter(rate=10.0, burst=3.0)
    assert [limiter.allow(now=0.0) for _ in range(4)] == [True, True, True, False]
    assert not limiter.allow(now=0.05)  # half a token
    assert limiter.allow(now=0.1) and not limiter.allow(now=0.1)
    assert [limiter.allow(now=100.0) for _ in range(4)] == [True, True, True, False]  # never more than the burst
