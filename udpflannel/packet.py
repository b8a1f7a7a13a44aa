"""IPv4 header checks, TTL decrement and checksums: the sans-IO packet core.

Pure functions over ``bytes`` / ``bytearray`` / ``memoryview``; nothing here does I/O, so the
asyncio engine can call them on its receive buffers and tests can call them on plain bytes.
Bad packets never raise: the checks return a :class:`Verdict`, which the engine counts and acts on.

Buffers are often preallocated and longer than the packet, so the checks take ``n``, the number of
valid bytes, and never look past ``min(n, len(buf))``.
"""

from __future__ import annotations

import struct
from enum import IntEnum

from tun.layout import IPV4_MIN_HEADER, PROTO_ICMP, PROTO_TCP, PROTO_UDP

__all__ = ["IPV4_MIN_HEADER", "PROTO_ICMP", "PROTO_TCP", "PROTO_UDP", "Verdict"]

_U32 = struct.Struct("!I")
_unpack_u32 = _U32.unpack_from


class Verdict(IntEnum):
    """What happened to one packet. Metrics use ``name.lower()`` as the Prometheus label value."""

    FORWARD = 0
    TOO_SHORT = 1  # fewer than 20 bytes
    NOT_IPV4 = 2  # version nibble != 4 (IPv6 from the kernel, garbage)
    BAD_HEADER = 3  # IHL < 5, IHL*4 > length, total length != buffer length
    TTL_EXPIRED = 4  # TTL 0 or 1 on input: dropped (flannel wraps TTL 0 to 255 instead)
    NO_ROUTE = 5  # destination in no leased subnet
    OVERSIZE = 6  # datagram larger than the TUN MTU (flannel silently truncates)
    UNKNOWN_PEER = 7  # datagram from an address/port that is no current lease's PublicIP:port
    SPOOFED_SOURCE = 8  # inner source not in the sending peer's leased subnet
    BAD_CHECKSUM = 9  # IPv4 header checksum wrong (received side)
    TOO_BIG = 10  # larger than the path MTU to its peer, with DF: answered with ICMP frag-needed
    BAD_L4_CHECKSUM = 11  # TCP, UDP or ICMP checksum wrong in an unfragmented packet (received side)


# Every member as a module global, defined here once for the hot paths to import (``from
# udpflannel.packet import FORWARD``): ``Verdict.X`` costs ~90 ns per access on CPython 3.11, a global ~5.
(FORWARD, TOO_SHORT, NOT_IPV4, BAD_HEADER, TTL_EXPIRED, NO_ROUTE, OVERSIZE, UNKNOWN_PEER, SPOOFED_SOURCE,
 BAD_CHECKSUM, TOO_BIG, BAD_L4_CHECKSUM) = Verdict

_FIRST_AND_TOTAL = struct.Struct("!BxH")  # version/IHL byte, total length
_unpack_first_and_total = _FIRST_AND_TOTAL.unpack_from


def check_ipv4(buf, n: int) -> Verdict:
    """FORWARD if the first ``n`` bytes of ``buf`` are exactly one plausible IPv4 packet.

    flannel checks only the length (§7.4/§7.5), so IPv6 from the kernel and truncated or padded
    datagrams reach the route lookup; here they get a verdict first. Never raises.
    """
    if n > len(buf):
        n = len(buf)
    if n < IPV4_MIN_HEADER:
        return TOO_SHORT
    first, total_len = _unpack_first_and_total(buf)
    # Version 4 with IHL 5..15, total length == n, header within it: one test for the usual case.
    if 0x45 <= first <= 0x4F and total_len == n and (first & 0x0F) << 2 <= n:
        return FORWARD
    if first >> 4 != 4:
        return NOT_IPV4
    return BAD_HEADER


# Unpackers of IHL big-endian u32 words, indexed by IHL (5..15).
_HEADER_WORDS = [struct.Struct(f"!{ihl}I").unpack_from if ihl >= 5 else None for ihl in range(16)]


def check_ipv4_checksum(buf, n: int) -> bool:
    """True if the header checksum is valid; False for anything that is not a whole header.

    The one's complement sum of a valid header (checksum included) is 0xFFFF, i.e. 0 mod 0xFFFF;
    it cannot be 0, which would need an all-zero header. Since 2**32 == 1 (mod 0xFFFF), summing
    the header as u32 words gives the same remainder as the whole header read as one integer.
    """
    if n > len(buf):
        n = len(buf)
    if n < IPV4_MIN_HEADER:
        return False
    ihl = buf[0] & 0x0F
    if ihl < 5 or ihl << 2 > n:
        return False
    return sum(_HEADER_WORDS[ihl](buf)) % 0xFFFF == 0


# The shortest header of each transport whose checksum is checked: a first fragment shorter than
# this cannot carry it whole (RFC 1858's tiny fragment), and an unfragmented packet must hold it.
_TRANSPORT_HEADER = {PROTO_ICMP: 8, PROTO_TCP: 20, PROTO_UDP: 8}


def check_transport(buf, n: int) -> Verdict:
    """FORWARD if the TCP, UDP or ICMP packet in the first ``n`` bytes is whole and its checksum
    verifies (call :func:`check_ipv4` and :func:`check_ipv4_checksum` first).

    A router does not look this deep, but this one is where datagrams from the underlay enter a node,
    and anyone can forge one from a peer's address: what it lets in is what a pod would accept.
    Fragments carry one checksum for the whole datagram, so only their bounds can be checked: a
    fragment must not make a datagram longer than 65,535 bytes (the "ping of death") and a first
    fragment must hold its transport header (RFC 1858). Other protocols pass (routers forward them
    unchecked). A UDP checksum of 0 means "none" (RFC 768). Costs one big-int fold over the packet.
    """
    ihl = (buf[0] & 0x0F) << 2
    length = n - ihl
    proto = buf[9]
    fragment = (buf[6] << 8 | buf[7]) & 0x3FFF  # MF and the offset
    if fragment:
        if ((fragment & 0x1FFF) << 3) + n > 0xFFFF:  # past 64 KB: the first fragment's header is ≥ ours
            return BAD_HEADER
        if fragment == 0x2000 and length < _TRANSPORT_HEADER.get(proto, 0):
            return BAD_HEADER
        return FORWARD
    if proto == PROTO_TCP:
        if length < 20 or not 5 <= buf[ihl + 12] >> 4 <= length >> 2:
            return BAD_HEADER
    elif proto == PROTO_UDP:
        if length < 8 or (buf[ihl + 4] << 8 | buf[ihl + 5]) != length:
            return BAD_HEADER
        if not buf[ihl + 6] and not buf[ihl + 7]:
            return FORWARD
    elif proto == PROTO_ICMP:
        if length < 8:
            return BAD_HEADER
    else:
        return FORWARD
    value = int.from_bytes(buf[ihl:n], "big")
    if length & 1:
        value <<= 8
    if proto != PROTO_ICMP:  # the pseudo-header: addresses, protocol, transport length
        value += int.from_bytes(buf[12:20], "big") + proto + length
    # Valid: the one's complement sum is 0xFFFF, i.e. 0 mod 0xFFFF, but not a sum of nothing but zeros
    # (only possible for ICMP, whose sum has no pseudo-header).
    return FORWARD if value and value % 0xFFFF == 0 else BAD_L4_CHECKSUM


def dst_u32(buf) -> int:
    """Destination address (offset 16) as a host-order int, the key for route lookup.

    0 (0.0.0.0) if ``buf`` is too short to hold one; call :func:`check_ipv4` first. Never raises,
    and the ``try`` costs nothing on the normal path.
    """
    try:
        return _unpack_u32(buf, 16)[0]
    except struct.error:
        return 0


def src_u32(buf) -> int:
    """Source address (offset 12) as a host-order int, for the receive-side source check.

    0 (0.0.0.0) if ``buf`` is too short to hold one, like :func:`dst_u32`.
    """
    try:
        return _unpack_u32(buf, 12)[0]
    except struct.error:
        return 0


def dont_fragment(buf) -> bool:
    """The DF bit (flags, offset 6): the sender does path-MTU discovery and wants frag-needed, not
    fragments. ``buf`` must hold at least 7 bytes (call :func:`check_ipv4` first)."""
    return bool(buf[6] & 0x40)


def decrement_ttl(buf) -> bool:
    """TTL -= 1 in place with an RFC 1624 checksum patch; False (buf untouched) if TTL is 0 or 1.

    ``buf`` must be writable and hold at least 12 bytes (call :func:`check_ipv4` first).
    The TTL is the high byte of header word 4, so the checksum grows by 0x0100 with end-around
    carry; a result of 0xFFFF is stored as 0x0000, which is what a full recomputation gives for a
    header whose checksum was valid. flannel (§7.6) does the same, except that it forwards TTL 0
    as 255; a packet that cannot be forwarded is dropped here instead.
    """
    ttl = buf[8]
    if ttl <= 1:
        return False
    buf[8] = ttl - 1
    high = buf[10]
    if high < 0xFE:
        # No carry and no 0xFFFF result possible: only the high checksum byte changes (254 in 256).
        buf[10] = high + 1
        return True
    check = ((high << 8) | buf[11]) + 0x0100
    check = (check & 0xFFFF) + (check >> 16)
    if check == 0xFFFF:
        check = 0
    buf[10] = check >> 8
    buf[11] = check & 0xFF
    return True


def _checksum_of(value: int) -> int:
    """Checksum to store for data whose big-endian 16-bit words, concatenated, are ``value``.

    ``value % 0xFFFF`` equals the end-around-carry sum because 2**16 == 1 (mod 0xFFFF); a
    remainder of 0 means the sum is 0xFFFF (checksum 0), unless the data is all zeros (sum 0).
    """
    if value == 0:
        return 0xFFFF
    return 0xFFFF - (value % 0xFFFF or 0xFFFF)


def internet_checksum(data) -> int:
    """RFC 1071 checksum of ``data`` (odd length padded with a zero byte), ready to store.

    Gives exactly what the classic word-by-word loop gives, 0x0000 rather than 0xFFFF when the
    sum is 0xFFFF, so built packets are byte-identical to other stacks'.
    """
    value = int.from_bytes(data, "big")
    if len(data) & 1:
        value <<= 8
    return _checksum_of(value)


def ipv4_header_checksum(header) -> int:
    """Checksum for the first IHL*4 bytes of ``header``, counting its checksum field as zero.

    ``header`` may be a whole packet; only the header part is read. The stored checksum's
    contribution is subtracted instead of copying the header with a zeroed field.
    """
    header_len = (header[0] & 0x0F) << 2
    head = header[:header_len]
    # Subtracting the field at its exact weight equals zeroing it; no copy of the header needed.
    stored = (head[10] << 8) | head[11]
    value = int.from_bytes(head, "big") - (stored << (8 * (len(head) - 12)))
    return _checksum_of(value)
