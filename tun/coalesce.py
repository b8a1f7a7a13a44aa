"""GRO coalesce: datagrams received back to back, merged into super-packets the TUN takes in one write —
sans-IO, after wireguard-go's ``tun/offload_linux.go``.

Consecutive segments of one TCP flow (and, where the TUN has USO, datagrams of one UDP flow) become one
``GSO_TCPV4`` (``GSO_UDP_L4``) write; the kernel cuts it again into the very packets that were sent,
or hands it on whole. A merge is only made where the kernel's own GRO would make it, and only of rows
whose IP and L4 checksums verify: the write's checksum is the kernel's to complete, so a bad one
would otherwise be laundered.
"""

from __future__ import annotations

import functools
import struct

import numpy as np

from tun import kernels, vnet
from tun.layout import (
    ACK,
    IP_ADDRESSES,
    IP_CHECKSUM,
    IP_TOTAL_LENGTH,
    IPV4_MIN_HEADER,
    MAX_IP_PACKET,
    PROTO_TCP,
    PROTO_UDP,
    PSH,
    TCP_CHECKSUM,
    TCP_FLAGS,
    UDP_HEADERS,
    UDP_LENGTH,
    UDP_MAX_SEGMENTS,
)
from tun.segment import BUFFER_SIZE

_count = np.count_nonzero
_any_per_row = np.logical_or.reduce
_pack_two_u16 = struct.Struct("!HH").pack_into
_pack_u16 = struct.Struct("!H").pack_into
_udp_length = struct.Struct("!H").unpack_from
_head_fields = struct.Struct("!BxH2xHxB").unpack_from  # version/IHL, total length, flags/fragment, protocol

# The merge rules, over an IPv4 (IHL 5) header and the TCP or UDP header after it (the kernel's
# tcp_gro_receive and udp_gro_receive rules; a short last segment is handled apart). Consecutive rows
# of a run may differ only in their checksums and, for TCP, PSH (which ends the run after its row);
# the IP ID must count on by one and a TCP sequence number by one payload; everything else — version,
# TOS, total length, DF, TTL, protocol, addresses, ports, UDP length, ACK number, data offset, the
# other flags, window, options — must match.
_FREE_TCP = (IP_CHECKSUM, IP_CHECKSUM + 1, IPV4_MIN_HEADER + TCP_CHECKSUM, IPV4_MIN_HEADER + TCP_CHECKSUM + 1)
_FREE_UDP = (IP_CHECKSUM, IP_CHECKSUM + 1, UDP_HEADERS - 2, UDP_HEADERS - 1)


@functools.lru_cache(maxsize=64)
def merge_rule(hl: int, seg: int, proto: int) -> tuple[np.ndarray, np.ndarray]:
    """The rules above as (mask, step) over a row's headers read as big-endian 32-bit words: masked,
    each row must equal the row before plus ``step``, in unsigned 32-bit arithmetic. The ID is the
    upper half of word 1, so ``1 << 16`` counts it on with the kernel's 16-bit wrap while the
    fragment field (the lower half) must stay equal; word 6 is the TCP sequence number."""
    keep = np.full(hl, 0xFF, np.uint8)
    keep[list(_FREE_UDP if proto == PROTO_UDP else _FREE_TCP)] = 0
    step = np.zeros(hl >> 2, np.uint32)
    step[1] = 1 << 16
    if proto == PROTO_TCP:
        keep[IPV4_MIN_HEADER + TCP_FLAGS] = 0xFF & ~PSH
        step[6] = seg - hl
    return keep.view(">u4").astype(np.uint32), step


class Plan:
    """One received table cut into :attr:`runs` ``(a, b)`` covering every row in order: ``b - a >= 2``
    means rows a..b-1 are consecutive segments of one flow with valid checksums, safe to merge.
    Valid until its coalescer's buffer is received into again."""

    __slots__ = ("runs", "_coalescer", "_base", "_seg", "_hl", "_proto", "_short")

    def __init__(self, coalescer: Coalescer, base: int, seg: int, hl: int, proto: int, short: dict[int, int]) -> None:
        self.runs: list[tuple[int, int]] = []
        self._coalescer, self._base, self._seg, self._hl, self._proto, self._short = coalescer, base, seg, hl, proto, short

    def row(self, i: int) -> memoryview:
        """Row ``i``, exactly as long as its datagram."""
        at = self._base + i * self._seg
        return self._coalescer._mv[at:at + self._short.get(i, self._seg)]

    def merge(self, a: int, b: int) -> list:
        """One TUN write for rows a..b-1 of a run: vnet header + the first row's headers (as they are
        now, e.g. after a TTL decrement) fixed up for the total length, + every row's payload as a
        view. The L4 checksum field gets the pseudo-header sum (NEEDS_CSUM)."""
        base, seg, hl, proto = self._base, self._seg, self._hl, self._proto
        co = self._coalescer
        mv = co._mv
        at = base + a * seg
        end = base + (b - 1) * seg
        tail = self._short.get(b - 1, seg)
        total = (b - a - 1) * (seg - hl) + tail
        h = bytearray(mv[at:at + hl])
        # The first row's header checksum is valid (plan checked it, inbound patched its TTL), so the
        # total length going from seg to total is an RFC 1624 update: HC' = ~(~HC + ~seg + total).
        x = ((h[IP_CHECKSUM] << 8 | h[IP_CHECKSUM + 1]) ^ 0xFFFF) + (seg ^ 0xFFFF) + total
        x = (x & 0xFFFF) + (x >> 16)
        x = (x & 0xFFFF) + (x >> 16)
        _pack_u16(h, IP_TOTAL_LENGTH, total)
        _pack_u16(h, IP_CHECKSUM, x ^ 0xFFFF)
        pseudo = (int.from_bytes(h[IP_ADDRESSES:IP_ADDRESSES + 8], "big") + proto + total - IPV4_MIN_HEADER) % 0xFFFF
        if proto == PROTO_UDP:
            _pack_two_u16(h, IPV4_MIN_HEADER + UDP_LENGTH, total - IPV4_MIN_HEADER, pseudo)  # UDP length; the sum
            iov = [vnet.udpv4_gso(seg - hl) + h]
        else:
            h[IPV4_MIN_HEADER + TCP_FLAGS] = co.buf[end + IPV4_MIN_HEADER + TCP_FLAGS]  # PSH as on the last row
            _pack_u16(h, IPV4_MIN_HEADER + TCP_CHECKSUM, pseudo)
            iov = [vnet.tcpv4_gso(hl, seg - hl, IPV4_MIN_HEADER) + h]
        if base % seg == 0:  # payload views of the whole buffer, cached per row shape
            views = co._payloads.get((seg, hl))
            if views is None:
                if len(co._payloads) > 32:
                    co._payloads.clear()
                views = co._payloads[(seg, hl)] = [mv[o + hl:o + seg] for o in range(0, len(mv) - seg + 1, seg)]
            first = base // seg + a
            iov += views[first:first + b - 1 - a]
        else:  # (not per phase too: tables start on any 8-byte boundary, and a list is len(buf)/seg views)
            iov += [mv[o + hl:o + seg] for o in range(at, end, seg)]
        iov.append(mv[end + hl:end + tail])
        return iov


class Coalescer:
    """GRO over datagrams received back to back into ``buf``: UDP_GRO batches (datagrams of ``seg``
    bytes, the last maybe shorter, as one ``recvmsg_into`` returns them), each starting on a row
    boundary, so that several batches form one table of ``seg``-byte rows and one kernel call checks
    them all. Two steps, so the caller can apply its own per-packet checks to the first packet of
    each run between them: :meth:`plan` → a :class:`Plan`; :meth:`Plan.merge` → the iovec of one TUN
    write carrying a run as one GSO_TCPV4 (GSO_UDP_L4) super-packet.

    ``udp``: merge UDP flows too — only where the TUN takes GSO_UDP_L4 writes (USO, Linux >= 6.2).
    ``jit``: the compiled checks (True), the numpy ones (False), or :func:`tun.kernels.choose`'s.
    """

    def __init__(self, buf: bytearray, *, udp: bool = False, jit: bool | None = None) -> None:
        if len(buf) < BUFFER_SIZE:
            raise ValueError(f"packet buffers need {BUFFER_SIZE} bytes (see SPLIT_SLACK), got {len(buf)}")
        self.buf = buf
        self.udp = udp
        self.kernels = kernels.choose(jit)
        self._check = self.kernels.new_checker()
        self._mv, self._u8 = memoryview(buf), np.frombuffer(buf, np.uint8)
        self._u32 = np.frombuffer(buf, np.uint32, len(buf) >> 2)
        self._payloads: dict[tuple[int, int], list] = {}

    @property
    def jit(self) -> bool:
        return self.kernels.compiled

    def plan(self, seg: int, sizes, *, base: int = 0, split_after=()) -> Plan:
        """Cut the table into mergeable runs and singles, in order.

        ``sizes``: the byte counts of consecutive batches from ``base``, each padded to whole rows;
        ``split_after``: indices of batches after which no run may continue (the next one comes from
        another peer, say). Reads only: it may zero-pad short rows past their ends.
        """
        short: dict[int, int] = {}
        ends = []
        rows = 0
        for nbytes in sizes:
            rows += -(-nbytes // seg)
            if nbytes % seg:
                short[rows - 1] = nbytes % seg
            ends.append(rows - 1)
        hl, proto = self._kind(base, seg, rows)
        plan = Plan(self, base, seg, hl, proto, short)
        if not hl:
            plan.runs = _singles(0, rows)
            return plan
        fixed = set(short) | {ends[j] for j in split_after if j < len(ends)}  # runs end at these rows
        cuts = self._cut_points(plan, rows, [r for r in sorted(fixed) if r < rows - 1])
        most = (MAX_IP_PACKET - hl) // (seg - hl)  # rows in one merged packet of at most 64 KB
        if proto == PROTO_UDP:
            most = min(most, UDP_MAX_SEGMENTS)  # the kernel refuses more from a virtio_net_hdr
        runs = plan.runs
        start = 0
        for end in (*cuts, rows - 1):  # each run ends after a cut, the last with the table
            for c in range(start, end + 1, most):  # no more than ``most`` rows in one write
                d = min(c + most, end + 1)
                if d - c > 1 and self._head_ok(base + c * seg, seg, proto):
                    runs.append((c, d))
                else:
                    runs += _singles(c, d)
            start = end + 1
        return plan

    def _kind(self, base: int, seg: int, rows: int) -> tuple[int, int]:
        """(header length, protocol) of a table whose rows may merge, judged by its first row; (0, 0)
        if they may not: too few, odd-sized, not IHL 5, neither TCP nor (with ``udp``) UDP."""
        buf = self.buf
        if rows < 2 or seg & 1 or seg < UDP_HEADERS + 2 or buf[base] != 0x45:
            return 0, 0
        proto = buf[base + 9]
        if proto == PROTO_TCP and seg >= 40:
            hl = IPV4_MIN_HEADER + ((buf[base + 32] >> 4) << 2)
            if hl < 40:
                return 0, 0
        elif proto == PROTO_UDP and self.udp:
            hl = UDP_HEADERS
        else:
            return 0, 0
        return (hl, proto) if hl < seg else (0, 0)

    def _cut_points(self, plan: Plan, rows: int, inner: list[int]) -> list[int]:
        """The rows after which a run must end: a pair breaks the merge rule, a row fails its checks
        (then it ends the run before it too), TCP PSH, or ``inner`` (fixed ends before the last row)."""
        base, seg, hl, proto, short = plan._base, plan._seg, plan._hl, plan._proto, plan._short
        buf, udp = self.buf, proto == PROTO_UDP
        short_bad = [r for r, length in short.items() if _short_row_wrong(buf, base + r * seg, length, hl, udp)]
        mask, step = merge_rule(hl, seg, proto)
        differ, bad, psh = self._check(buf, self._u8, self._u32, base, rows, seg, hl, proto, short, mask, step)
        if inner:  # pairs across a fixed end are cut anyway: their differences don't matter
            differ[inner] = False
        # The common case — consecutive segments of one flow, cut only after PSH — costs one count per
        # condition (count_nonzero is C; .all()/.any() go through Python wrappers); only other
        # failures pay for per-row links.
        if not short_bad and not (_count(differ) or _count(bad)):
            if psh is not None and _count(psh):
                return sorted(set(inner).union(np.flatnonzero(psh).tolist()))
            return inner
        cut = _any_per_row(differ, axis=1)
        if psh is not None:
            cut |= psh != 0
        bad_row = _any_per_row(bad, axis=1)
        bad_row[short_bad] = True
        cut |= bad_row[:-1]
        cut |= bad_row[1:]
        cut[inner] = True
        return np.flatnonzero(cut).tolist()

    def _head_ok(self, at: int, seg: int, proto: int) -> bool:
        """Rows in a run match the first one but for ID, sequence number and checksums; so only the
        first needs looking at: IHL 5, total length = row size, not a fragment; for TCP flags exactly
        ACK, for UDP the UDP length = row size − 20 (the checksums were checked with the rows)."""
        p0, total, fragment, row_proto = _head_fields(self.buf, at)
        if p0 != 0x45 or row_proto != proto or total != seg or fragment & 0x3FFF:
            return False
        if proto == PROTO_UDP:
            return _udp_length(self.buf, at + IPV4_MIN_HEADER + UDP_LENGTH)[0] == seg - IPV4_MIN_HEADER
        return self.buf[at + IPV4_MIN_HEADER + TCP_FLAGS] == ACK


def _short_row_wrong(buf: bytearray, at: int, length: int, hl: int, udp: bool) -> bool:
    """A GRO batch's short last datagram (``length`` bytes at ``at``) whose total length (or UDP
    length) disagrees, or that has no payload: it may not end a run."""
    return ((buf[at + 2] << 8 | buf[at + 3]) != length or length <= hl
            or udp and (buf[at + 24] << 8 | buf[at + 25]) != length - IPV4_MIN_HEADER)


def _singles(a: int, b: int) -> list[tuple[int, int]]:
    return [(i, i + 1) for i in range(a, b)]
