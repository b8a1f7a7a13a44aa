"""ICMP error messages about packets the dataplane cannot forward (sans-IO).

flannel sends only net-unreachable, suppresses it for every ICMP offender (echo requests too),
rejects 60-byte headers by an off-by-one and quotes ``ihl*4 + 8`` bytes even from shorter packets,
leaking stale buffer bytes (§7.7). Here the RFC 792 / RFC 1812 §4.3.2.7 rules decide, and the quote
never reaches past the valid bytes or the offender's total length.

The policy is here too, as pure functions with the time passed in (``now=``): which error a verdict
earns (:func:`error_for`), and how many the node may send (:class:`RateLimiter`). The engine only sends.
"""

from __future__ import annotations

import struct

from udpflannel.packet import (
    IPV4_MIN_HEADER,
    NO_ROUTE,
    PROTO_ICMP,
    TTL_EXPIRED,
    Verdict,
    dst_u32,
    internet_checksum,
    ipv4_header_checksum,
    src_u32,
)

# ICMP types that are errors; never answer one with another error (RFC 792, RFC 1812 §4.3.2.7).
ICMP_ERROR_TYPES = frozenset({3, 4, 5, 11, 12})

ICMP_DEST_UNREACHABLE = 3
ICMP_TIME_EXCEEDED = 11
CODE_NET_UNREACHABLE = 0
CODE_FRAG_NEEDED = 4
CODE_TTL_EXCEEDED = 0

DEFAULT_TTL = 64
QUOTED_PAYLOAD = 8  # bytes of the offender's payload quoted after its header (RFC 792)

_IP_HEADER = struct.Struct("!BBHHHBBHII")
_ICMP_HEADER = struct.Struct("!BBHHH")


def _bad_source(addr: int) -> bool:
    """0.0.0.0, 127/8, multicast 224/4 and class E 240/4 (which holds 255.255.255.255)."""
    return addr == 0 or addr >> 24 == 127 or addr >= 0xE0000000


def _bad_destination(addr: int) -> bool:
    """Multicast 224/4 or the limited broadcast: errors about these would multiply."""
    return addr >> 28 == 0xE or addr == 0xFFFFFFFF


def _quote_end(offender, n: int) -> int:
    """Bytes to quote (header + up to 8 payload bytes), or 0 if the offender is unusable.

    Bounded by ``n``, ``len(offender)`` and the offender's total length, so nothing beyond the
    packet is ever copied.
    """
    n = min(n, len(offender))
    if n < IPV4_MIN_HEADER:
        return 0
    first = offender[0]
    header_len = (first & 0x0F) << 2
    total_len = (offender[2] << 8) | offender[3]
    if first >> 4 != 4 or header_len < IPV4_MIN_HEADER or header_len > min(n, total_len):
        return 0
    return min(header_len + QUOTED_PAYLOAD, n, total_len)


def may_send_icmp_error(offender, n: int) -> bool:
    """Whether RFC 1812 §4.3.2.7 allows an ICMP error about this packet. Never raises.

    No error about an ICMP error (or an ICMP packet too short to tell), a non-first fragment,
    a source that names no single host, or a multicast/broadcast destination. ICMP queries such
    as echo requests do get errors, so ping to an unleased subnet reports net unreachable.
    """
    end = _quote_end(offender, n)
    if end == 0:
        return False
    if ((offender[6] << 8) | offender[7]) & 0x1FFF:
        return False
    if _bad_source(src_u32(offender)):
        return False
    if _bad_destination(dst_u32(offender)):
        return False
    if offender[9] == PROTO_ICMP:
        header_len = (offender[0] & 0x0F) << 2
        return end > header_len and offender[header_len] not in ICMP_ERROR_TYPES
    return True


def build_icmp_error(
    offender,
    n: int,
    *,
    icmp_type: int,
    code: int,
    src: int,
    ttl: int = DEFAULT_TTL,
    next_hop_mtu: int = 0,
) -> bytes | None:
    """A complete IPv4 packet carrying an ICMP error to the offender's source, or None.

    ``offender`` holds ``n`` valid bytes as received, before any TTL decrement. ``src`` (host-order
    int) is the address the error comes from. ``next_hop_mtu`` fills the low 16 bits of the
    otherwise unused field only for type 3 code 4 (fragmentation needed, RFC 1191).
    """
    if not may_send_icmp_error(offender, n):
        return None
    if not 0 <= next_hop_mtu <= 0xFFFF:
        raise ValueError(f"next_hop_mtu must fit in 16 bits, got {next_hop_mtu}")
    quote = bytes(offender[: _quote_end(offender, n)])
    mtu = next_hop_mtu if (icmp_type, code) == (ICMP_DEST_UNREACHABLE, CODE_FRAG_NEEDED) else 0
    icmp = bytearray(_ICMP_HEADER.pack(icmp_type, code, 0, 0, mtu))
    icmp += quote
    struct.pack_into("!H", icmp, 2, internet_checksum(icmp))
    total_len = IPV4_MIN_HEADER + len(icmp)
    header = bytearray(_IP_HEADER.pack(0x45, 0, total_len, 0, 0, ttl, PROTO_ICMP, 0, src, src_u32(offender)))
    struct.pack_into("!H", header, 10, ipv4_header_checksum(header))
    return bytes(header + icmp)


def net_unreachable(offender, n: int, *, src: int, ttl: int = DEFAULT_TTL) -> bytes | None:
    """Type 3 code 0: the destination is in no leased subnet (flannel's only ICMP error)."""
    return build_icmp_error(
        offender, n, icmp_type=ICMP_DEST_UNREACHABLE, code=CODE_NET_UNREACHABLE, src=src, ttl=ttl
    )


def time_exceeded(offender, n: int, *, src: int, ttl: int = DEFAULT_TTL) -> bytes | None:
    """Type 11 code 0: TTL exceeded in transit (flannel drops silently, a TODO in its source)."""
    return build_icmp_error(
        offender, n, icmp_type=ICMP_TIME_EXCEEDED, code=CODE_TTL_EXCEEDED, src=src, ttl=ttl
    )


def frag_needed(offender, n: int, *, src: int, mtu: int, ttl: int = DEFAULT_TTL) -> bytes | None:
    """Type 3 code 4 with the next-hop MTU, so path-MTU discovery works across the overlay."""
    return build_icmp_error(
        offender,
        n,
        icmp_type=ICMP_DEST_UNREACHABLE,
        code=CODE_FRAG_NEEDED,
        src=src,
        ttl=ttl,
        next_hop_mtu=mtu,
    )


def error_for(verdict: Verdict, offender, n: int, *, src: int) -> bytes | None:
    """The error a router sends about a packet it drops with ``verdict``: net unreachable for no
    route, time exceeded for an expired TTL; None for the rest (malformed packets, strangers' datagrams:
    nobody to tell) and where RFC 1812 forbids one. Frag-needed needs the path's MTU: :func:`frag_needed`."""
    if verdict == NO_ROUTE:
        return net_unreachable(offender, n, src=src)
    if verdict == TTL_EXPIRED:
        return time_exceeded(offender, n, src=src)
    return None


class RateLimiter:
    """Token bucket for the ICMP errors we originate (the kernel limits its own the same way): ``rate``
    per second, ``burst`` at once. Time comes in as ``now`` (any monotonic clock, in seconds)."""

    def __init__(self, rate: float = 1000.0, burst: float = 50.0) -> None:
        self.rate, self.burst = rate, burst
        self.tokens, self.stamp = burst, 0.0

    def allow(self, *, now: float) -> bool:
        self.tokens = min(self.burst, self.tokens + (now - self.stamp) * self.rate)
        self.stamp = now
        if self.tokens >= 1.0:
            self.tokens -= 1.0
            return True
        return False
