"""GRO coalesce: datagrams received back to back, merged into super-packets the TUN takes in one write —
sans-IO, after wireguard-go's ``tun/offload_linux.go``.

Consecutive segments of one TCP flow (and, where the TUN has USO, datagrams of one UDP flow) become one
``GSO_TCPV4`` (``GSO_UDP_L4``) write; the kernel cuts it again into the very packets that were sent,
or hands it on whole. *Consecutive within the flow*: a table's rows are grouped by flow first (sender,
addresses, protocol, ports; a stable sort, so each flow's rows keep their order), as Linux GRO and
wireguard-go's ``tcpGROTable`` do, so flows interleaved in one receive batch still merge; the order
across flows may change, never within one. A merge is only made where the kernel's own GRO would make
it, and only of rows whose IP and L4 checksums verify: the write's checksum is the kernel's to complete, so a bad one
would otherwise be laundered.
"""

from __future__ import annotations

import functools
import struct
from itertools import accumulate

import numpy as np

from tun import kernels, vnet
from tun.layout import (
    ACK,
    IP_ADDRESSES,
    IP_CHECKSUM,
    IP_PROTOCOL,
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
# odd 64-bit multipliers that spread a flow's address and port words over a hash's upper bits
_MIX = tuple(np.uint64(m) for m in (0x9E3779B97F4A7C15, 0xC2B2AE3D27D4EB4F, 0x165667B19E3779F9))
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
    """One received table cut into :attr:`runs` ``(a, b)`` covering every *logical* row in order:
    ``b - a >= 2`` means logical rows a..b-1 are consecutive segments of one flow from one sender with
    valid checksums, safe to merge. Logical row i is physical row :attr:`order` ``[i]`` (rows grouped
    by flow, each flow's in arrival order); ``order`` is None when the table is one flow (i is i).
    Counts for the engine: :attr:`flows` (groups), :attr:`breaks` (neighbours within a flow that may
    not merge: a gap, a reordering, a duplicate, a header change), :attr:`refused` (rows that fail the
    table's checks: a damaged row, or one of another kind than the table's first row — another
    protocol or TCP header length, say, or a short last row without payload — never merged).
    Valid until its coalescer's buffer is received into again."""

    __slots__ = ("runs", "order", "flows", "breaks", "refused", "_coalescer", "_base", "_seg", "_hl", "_proto",
                 "_short")

    def __init__(self, coalescer: Coalescer, base: int, seg: int, hl: int, proto: int, short: dict[int, int]) -> None:
        self.runs: list[tuple[int, int]] = []
        self.order: list[int] | None = None
        self.flows, self.breaks, self.refused = 1, 0, 0
        self._coalescer, self._base, self._seg, self._hl, self._proto, self._short = coalescer, base, seg, hl, proto, short

    def physical(self, i: int) -> int:
        """The physical row (its place in the buffer) of logical row ``i``."""
        return i if self.order is None else self.order[i]

    def row(self, i: int) -> memoryview:
        """Logical row ``i``, exactly as long as its datagram."""
        r = i if self.order is None else self.order[i]
        at = self._base + r * self._seg
        return self._coalescer._mv[at:at + self._short.get(r, self._seg)]

    def merge(self, a: int, b: int) -> list:
        """One TUN write for logical rows a..b-1 of a run: vnet header + the first row's headers (as
        they are now, e.g. after a TTL decrement) fixed up for the total length, + every row's payload
        as a view (gathered from wherever the rows lie: no copies). The L4 checksum field gets the
        pseudo-header sum (NEEDS_CSUM)."""
        base, seg, hl, proto, order = self._base, self._seg, self._hl, self._proto, self.order
        co = self._coalescer
        mv = co._mv
        last = b - 1 if order is None else order[b - 1]
        tail = self._short.get(last, seg)
        if base % seg == 0 and co._merger is not None:  # all of the below in one compiled call
            return co._merger(co.buf, co._views(seg, hl), base // seg, order, a, b, seg, hl, proto, tail)
        first = a if order is None else order[a]
        at = base + first * seg
        end = base + last * seg
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
            views = co._views(seg, hl)
            zero = base // seg
            if order is None:
                iov += views[zero + a:zero + b - 1]
            else:
                iov += [views[zero + r] for r in order[a:b - 1]]
        elif order is None:  # (not per phase too: tables start on any 8-byte boundary, and a list is len(buf)/seg views)
            iov += [mv[o + hl:o + seg] for o in range(at, end, seg)]
        else:
            iov += [mv[base + r * seg + hl:base + r * seg + seg] for r in order[a:b - 1]]
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
    ``jit``: the compiled kernels (True), which plan a table and merge a run in one C call each
    (flows keyed exactly, in the order they first appear); the numpy checks (False), around which
    the plan runs in Python (flows keyed by a hash, in its order), the reference the tests hold the
    compiled plan to; or :func:`tun.kernels.choose`'s.
    """

    def __init__(self, buf: bytearray, *, udp: bool = False, jit: bool | None = None) -> None:
        if len(buf) < BUFFER_SIZE:
            raise ValueError(f"packet buffers need {BUFFER_SIZE} bytes (see SPLIT_SLACK), got {len(buf)}")
        self.buf = buf
        self.udp = udp
        self.kernels = kernels.choose(jit)
        self._check = self.kernels.new_checker()
        self._planner, self._merger = self.kernels.planner, self.kernels.merger
        self._mv, self._u8 = memoryview(buf), np.frombuffer(buf, np.uint8)
        self._u32 = np.frombuffer(buf, np.uint32, len(buf) >> 2)
        self._payloads: dict[tuple[int, int], list] = {}

    @property
    def jit(self) -> bool:
        return self.kernels.compiled

    def _views(self, seg: int, hl: int) -> list[memoryview]:
        """Every ``seg``-byte row's payload in the buffer (after ``hl`` bytes of headers), as views
        cached per row shape: a merge takes its rows' views from here instead of slicing."""
        views = self._payloads.get((seg, hl))
        if views is None:
            if len(self._payloads) > 32:
                self._payloads.clear()
            mv = self._mv
            views = self._payloads[(seg, hl)] = [mv[o + hl:o + seg] for o in range(0, len(mv) - seg + 1, seg)]
        return views

    def plan(self, seg: int, sizes, *, base: int = 0, senders=None, split_after=()) -> Plan:
        """Group the table's rows by flow and cut each flow into mergeable runs and singles.

        ``sizes``: the byte counts of consecutive batches from ``base``, each padded to whole rows;
        ``senders``: per batch, a small int naming who sent it (rows of different senders never merge;
        None: one sender); ``split_after``: (without ``senders``) indices of batches after which no run
        may continue, as if the next batch came from another sender. Reads only: it may zero-pad
        short rows past their ends.
        """
        short: dict[int, int] = {}
        counts = []
        rows = 0
        for nbytes in sizes:
            n = -(-nbytes // seg)
            rows += n
            counts.append(n)
            if nbytes % seg:
                short[rows - 1] = nbytes % seg
        hl, proto = self._kind(base, seg, rows)
        plan = Plan(self, base, seg, hl, proto, short)
        if not hl:
            plan.runs = _singles(0, rows)
            return plan
        if senders is None and split_after:
            after = set(split_after)
            senders = list(accumulate(int(j - 1 in after) for j in range(len(counts))))
        most = (MAX_IP_PACKET - hl) // (seg - hl)  # rows in one merged packet of at most 64 KB
        if proto == PROTO_UDP:
            most = min(most, UDP_MAX_SEGMENTS)  # the kernel refuses more from a virtio_net_hdr
        if self._planner is not None:  # all of the below in one compiled call
            mask, step = merge_rule(hl, seg, proto)
            plan.runs, plan.order, plan.flows, plan.breaks, plan.refused = self._planner(
                self.buf, base, seg, hl, proto, short, counts, senders, mask, step, most)
            return plan
        checks = None
        if senders is None or len(set(senders)) == 1:
            # One sender: check the rows as they lie first. Where nothing breaks a run but the fixed ends
            # (the common case: one flow, or flows one after the other), grouping could merge no more,
            # so it is skipped; else the rows are grouped by flow and, if there are several, checked
            # again in that order.
            checks = self._checks(plan, rows, sorted(r for r in short if r < rows - 1))
            ends = set() if _clean(checks) else self._group(plan, rows, counts, None)
            if plan.order is not None:
                checks = None
        else:
            ends = self._group(plan, rows, counts, senders)
        if plan.order is None:
            ends.update(short)
        else:
            position = np.empty(rows, np.intp)
            position[plan.order] = np.arange(rows)
            ends.update(position[list(short)].tolist())
        inner = [r for r in sorted(ends) if r < rows - 1]  # fixed ends: flow boundaries, short rows
        if checks is None:
            checks = self._checks(plan, rows, inner)
        cuts = self._cut_points(plan, inner, checks)
        runs = plan.runs
        start = 0
        for end in (*cuts, rows - 1):  # each run ends after a cut, the last with the table
            for c in range(start, end + 1, most):  # no more than ``most`` rows in one write
                d = min(c + most, end + 1)
                if d - c > 1 and self._head_ok(base + plan.physical(c) * seg, seg, hl, proto):
                    runs.append((c, d))
                else:
                    runs += _singles(c, d)
            start = end + 1
        return plan

    def _group(self, plan: Plan, rows: int, counts: list[int], senders) -> set[int]:
        """Group the rows by flow: set ``plan.order`` (left None if the table is one flow from one
        sender) and ``plan.flows``; return the logical rows after which a flow ends. The key: the sender (exact), and a 48-bit hash of the addresses, the
        protocol and the ports (rows of flows whose hashes collide are still compared in full by the
        checks, so a collision only costs merges, never makes a wrong one)."""
        base, seg = plan._base, plan._seg
        for r, length in plan._short.items():  # a tiny last row: its key is zero past its end, not stale bytes
            if length < UDP_HEADERS - 4:
                at = base + r * seg
                self.buf[at + length:at + UDP_HEADERS - 4] = bytes(UDP_HEADERS - 4 - length)
        words = np.ndarray((rows, 3), "<u4", self.buf, base + IP_ADDRESSES, (seg, 4)).astype(np.uint64)
        key = words[:, 0] * _MIX[0] ^ words[:, 1] * _MIX[1] ^ words[:, 2] * _MIX[2]
        key >>= 16
        key ^= np.ndarray((rows,), np.uint8, self.buf, base + IP_PROTOCOL, (seg,)).astype(np.uint64) << 8
        if senders is not None and len(set(senders)) > 1:
            key |= np.repeat(np.asarray(senders, np.uint64), counts) << 48
        if not _count(key != key[0]):
            return set()
        order = np.argsort(key, kind="stable")
        ordered = key[order]
        ends = np.flatnonzero(ordered[1:] != ordered[:-1])
        plan.order, plan.flows = order.tolist(), len(ends) + 1
        return set(ends.tolist())

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

    def _checks(self, plan: Plan, rows: int, inner: list[int]) -> tuple:
        """The kernel's checks of the table in ``plan.order``: (differ, bad, psh, short rows that are
        wrong), with the pairs across ``inner`` (fixed ends: cut anyway) not counted as differing."""
        base, seg, hl, proto, short = plan._base, plan._seg, plan._hl, plan._proto, plan._short
        buf, udp = self.buf, proto == PROTO_UDP
        short_bad = [r for r, length in short.items() if _short_row_wrong(buf, base + r * seg, length, hl, udp)]
        mask, step = merge_rule(hl, seg, proto)
        order = plan.order
        differ, bad, psh = self._check(buf, self._u8, self._u32, base, rows, seg, hl, proto, short, mask, step,
                                       None if order is None else np.asarray(order, np.intp))
        if inner:
            differ[inner] = False
        return differ, bad, psh, short_bad

    def _cut_points(self, plan: Plan, inner: list[int], checks: tuple) -> list[int]:
        """The logical rows after which a run must end: a pair breaks the merge rule, a row fails its
        checks (then it ends the run before it too), TCP PSH, or ``inner`` (fixed ends before the last
        row). Sets ``plan.breaks`` and ``plan.refused``."""
        differ, bad, psh, short_bad = checks
        # The common case — consecutive segments of one flow, cut only after PSH — costs one count per
        # condition (count_nonzero is C; .all()/.any() go through Python wrappers); only other
        # failures pay for per-row links.
        if _clean(checks):
            if psh is not None and _count(psh):
                return sorted(set(inner).union(np.flatnonzero(psh).tolist()))
            return inner
        order = plan.order
        cut = _any_per_row(differ, axis=1)
        bad_row = _any_per_row(bad, axis=1)
        if short_bad:
            bad_row[short_bad if order is None else [order.index(r) for r in short_bad]] = True
        plan.breaks, plan.refused = int(_count(cut & ~(bad_row[:-1] | bad_row[1:]))), int(_count(bad_row))
        if psh is not None:
            cut |= psh != 0
        cut |= bad_row[:-1]
        cut |= bad_row[1:]
        cut[inner] = True
        return np.flatnonzero(cut).tolist()

    def _head_ok(self, at: int, seg: int, hl: int, proto: int) -> bool:
        """Rows in a run match the first one but for ID, sequence number and checksums; so only the
        first needs looking at: IHL 5, total length = row size, not a fragment; for TCP flags exactly
        ACK and the header length the table was checked with (the table's kind is judged by its first
        row; another flow may carry other options), for UDP the UDP length = row size − 20 (the
        checksums were checked with the rows)."""
        buf = self.buf
        p0, total, fragment, row_proto = _head_fields(buf, at)
        if p0 != 0x45 or row_proto != proto or total != seg or fragment & 0x3FFF:
            return False
        if proto == PROTO_UDP:
            return _udp_length(buf, at + IPV4_MIN_HEADER + UDP_LENGTH)[0] == seg - IPV4_MIN_HEADER
        return buf[at + IPV4_MIN_HEADER + TCP_FLAGS] == ACK and IPV4_MIN_HEADER + (buf[at + 32] >> 4 << 2) == hl


def _clean(checks: tuple) -> bool:
    """Nothing but PSH breaks a run: no differing pair, no row failing its checks."""
    differ, bad, _, short_bad = checks
    return not short_bad and not (_count(differ) or _count(bad))


def _short_row_wrong(buf: bytearray, at: int, length: int, hl: int, udp: bool) -> bool:
    """A GRO batch's short last datagram (``length`` bytes at ``at``) whose total length (or UDP
    length) disagrees, or that has no payload: it may not end a run."""
    return ((buf[at + 2] << 8 | buf[at + 3]) != length or length <= hl
            or udp and (buf[at + 24] << 8 | buf[at + 25]) != length - IPV4_MIN_HEADER)


def _singles(a: int, b: int) -> list[tuple[int, int]]:
    return [(i, i + 1) for i in range(a, b)]
