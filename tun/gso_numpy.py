"""The GSO cut and the GRO checks as numpy array operations: the reference and the fallback kernels.

Same signatures as the compiled loops of :mod:`tun.gso_c` (:mod:`tun.kernels` picks one); the
tests require the same bytes from both. A fixed number of array calls per batch (~20, each ~1 µs),
whatever the segment count: a plain Python loop costs ~2 µs per segment, which eats the gain.

Checksums use ``% 0xFFFF`` (2**16 ≡ 1 mod 0xFFFF, so a sum of 16- or 32-bit words folds to the one's
complement sum, and ``-s % 0xFFFF`` is the checksum of a sum ``s``: exactly what the kernel stores).
Payload words are read *little-endian* straight from the buffer: for any bytes ``sum_LE ≡ 256 · sum_BE
(mod 0xFFFF)``, so the other terms are scaled by 256 instead of byte-swapping 64 KB, and a checksum
computed in that domain is stored through a little-endian view, which lands it in network order.
UDP checksums are never 0 (0 means "none"): 0xFFFF stands in, as in the kernel's ``CSUM_MANGLED_0``.
"""

from __future__ import annotations

import functools
import struct
from typing import TYPE_CHECKING

import numpy as np

from tun.layout import (
    CWR,
    IP_CHECKSUM,
    IP_ID,
    IP_TOTAL_LENGTH,
    IPV4_MIN_HEADER,
    MAX_IP_PACKET,
    PROTO_TCP,
    PROTO_UDP,
    PSH,
    TCP_CHECKSUM,
    TCP_FLAGS,
    TCP_SEQ,
    UDP_CHECKSUM,
    UDP_HEADERS,
    UDP_LENGTH,
)

if TYPE_CHECKING:
    from tun.superpacket import Packet

ZEROS = memoryview(bytes(MAX_IP_PACKET + 8))
_BIG = 0xFFFF << 42  # a multiple of 0xFFFF above every sum here
_ID_RAMP = (np.arange(2 << 16) & 0xFFFF).astype(np.uint16)  # IP IDs from any start, wrapping
_CHECKSUM_RAMP = ((0xFFFF - np.arange(0xFFFF + (1 << 16)) % 0xFFFF) % 0xFFFF).astype(np.uint16)  # of s, s+1, ...
_SUM_DTYPE = {0: np.dtype("<u4"), 2: np.dtype("<u2")}  # by (row size % 4): the widest word that tiles it
_sum_at = np.add.reduceat
_pack_u16 = struct.Struct("!H").pack_into


def _words(data) -> int:
    """``data`` (even length) as one integer: ≡ the sum of its big-endian 16-bit words mod 0xFFFF."""
    return int.from_bytes(data, "big")


@functools.lru_cache(maxsize=8)
def _steps(mss: int) -> np.ndarray:
    """``i * mss`` for every row index a cut can have (uint64: sequence numbers wrap on assignment)."""
    return np.arange(1 << 16, dtype=np.uint64) * mss  # a stream cut has ≤ 2**16 rows


def _row_starts(rows: int, row_words: int, offsets: tuple[int, ...]) -> np.ndarray:
    """``add.reduceat``'s starts for ``rows`` rows of ``row_words`` words: ``offsets`` (in words)
    into each row. Built per power of two of rows and sliced, as row counts change every batch."""
    return _starts_upto(1 << (rows - 1).bit_length(), row_words, offsets)[:rows * len(offsets)]


@functools.lru_cache(maxsize=64)
def _starts_upto(rows: int, row_words: int, offsets: tuple[int, ...]) -> np.ndarray:
    return (np.arange(rows)[:, None] * row_words + list(offsets)).ravel()


def _column(buf: bytearray, offset: int, dtype: str, count: int, stride: int) -> np.ndarray:
    """One header field of every row: ``count`` values of ``dtype`` every ``stride`` bytes."""
    return np.ndarray((count,), dtype, buf, offset, (stride,))


class Cutter:
    """Cuts a group of like super-packets (same protocol, header lengths and segment size) into rows
    of ``hl + mss`` bytes from ``out[at]``: headers from the templates, IDs and sequence numbers,
    payloads copied beside them, then **one** ``add.reduceat`` over the output gives every
    segment's IP-header and L4 sums, from which both checksums follow.

    Keeps the array views of each table shape (rows, words for the sums, header columns): a steady
    flow cuts the same shapes again and again, and building six views costs more than a lookup.
    Make a new one when the output buffer changes."""

    def __init__(self) -> None:
        self._views: dict[tuple[int, int, int, int, int], tuple] = {}

    def __call__(self, src: bytearray, src8: np.ndarray, src32: np.ndarray, out: bytearray, out8: np.ndarray,
                 at: int, group: list[Packet]) -> None:
        first = group[0]
        proto, ihl, hl, mss = first.proto, first.ihl, first.hl, first.mss
        size = hl + mss
        rows_total = sum(p.count for p in group)
        views = self._views.get((at, rows_total, size, ihl, proto))
        if views is None:
            views = self._views_for(out, out8, at, rows_total, size, ihl, proto)
        rows, flat = views[0], views[1]
        _copy_payloads(src, src8, rows, group, hl, mss)
        stream = _SUM_DTYPE.get(size & 3) is not None and _is_stream(group, rows_total, mss)
        if stream:
            _stream_headers(rows, views, group, rows_total)
        else:
            _mixed_headers(rows, views, group, rows_total)
        shorts = _ends(out, at, group, size, stream)
        if flat is None:  # odd segment size: rows don't tile into words; one row at a time (rare)
            _checksums_slowly(rows, proto, ihl)
        else:
            _checksums(out, flat, views[5], at, first, rows_total, stream, shorts)

    def _views_for(self, out: bytearray, out8: np.ndarray, at: int, rows: int, size: int, ihl: int, proto: int) -> tuple:
        """The rows, their words for the sums, and the IP ID, IP checksum, TCP sequence number and L4
        checksum columns of a cut of ``rows`` rows of ``size`` bytes at ``at`` in ``out``."""
        if len(self._views) > 64:
            self._views.clear()
        dtype = _SUM_DTYPE.get(size & 3)
        table = out8[at:at + rows * size]
        views = self._views[(at, rows, size, ihl, proto)] = (
            table.reshape(rows, size),
            table.view(dtype) if dtype is not None else None,
            _column(out, at + IP_ID, ">u2", rows, size),
            _column(out, at + IP_CHECKSUM, ">u2", rows, size),
            _column(out, at + ihl + TCP_SEQ, ">u4", rows, size) if proto == PROTO_TCP else None,
            _column(out, at + ihl + (TCP_CHECKSUM if proto == PROTO_TCP else UDP_CHECKSUM), "<u2", rows, size),
        )
        return views


def _copy_payloads(src: bytearray, src8: np.ndarray, rows: np.ndarray, group: list[Packet], hl: int, mss: int) -> None:
    """Payloads beside their headers; each packet's last segment is zero-padded to a whole one in
    ``src`` first (the room after it is the caller's), so one reshape covers every segment."""
    index = 0
    for p in group:
        end = p.at + hl + p.count * mss
        pad = end - (p.at + hl + (p.count - 1) * mss + p.last)
        if pad:
            src[end - pad:end] = ZEROS[:pad]
        rows[index:index + p.count, hl:] = src8[p.at + hl:end].reshape(p.count, mss)
        index += p.count


def _is_stream(group: list[Packet], rows_total: int, mss: int) -> bool:
    """One flow's consecutive packets (the common case: a sender's TSO bursts read in one go): the IP
    headers alike and IDs and sequence numbers counting on from packet to packet."""
    first = group[0]
    if first.ident + rows_total > 0x10000:
        return False
    ident, seq, ip_part = first.ident, first.seq, first.template[:first.ihl]
    for p in group:
        if p.ident != ident or p.seq != seq or p.template[:p.ihl] != ip_part:
            return False
        ident += p.count
        seq = (seq + p.count * mss) & 0xFFFFFFFF
    return True


def _stream_headers(rows: np.ndarray, views: tuple, group: list[Packet], rows_total: int) -> None:
    """A stream's headers by broadcast (a run of rows per template where a TSval or window changed:
    for a few packets, cheaper than a gather), its IDs and IP checksums from ramps."""
    _, _, ids, ip_checks, seqs, _ = views
    first = group[0]
    hl, ihl = first.hl, first.ihl
    if all(p.template == first.template for p in group):
        rows[:, :hl] = np.frombuffer(first.template, np.uint8)
    else:
        row = 0
        for p in group:
            rows[row:row + p.count, :hl] = np.frombuffer(p.template, np.uint8)
            row += p.count
    ids[:] = _ID_RAMP[first.ident:first.ident + rows_total]
    ip_sum = (_words(first.template[:ihl]) + first.ident) % 0xFFFF
    ip_checks[:] = _CHECKSUM_RAMP[ip_sum:ip_sum + rows_total]
    if first.proto == PROTO_TCP:
        seqs[:] = _steps(first.mss)[:rows_total] + first.seq


def _mixed_headers(rows: np.ndarray, views: tuple, group: list[Packet], rows_total: int) -> None:
    """Anything else: per-packet templates gathered, IDs and sequence numbers per row (the IP
    checksums follow from the sums)."""
    _, _, ids, _, seqs, _ = views
    first = group[0]
    counts = [p.count for p in group]
    which = np.repeat(np.arange(len(group)), counts)  # row -> packet
    rows[:, :first.hl] = np.frombuffer(b"".join(p.template for p in group), np.uint8).reshape(len(group), first.hl)[which]
    firsts, local = [], 0
    for p in group:
        firsts.append(local)
        local += p.count
    # per packet: ID and sequence number minus the row's index, so one arange adds the rest
    base = np.array([((p.ident - f) & 0xFFFF, (p.seq - f * first.mss) & 0xFFFFFFFF)
                     for p, f in zip(group, firsts, strict=True)], dtype=np.uint64)[which]
    ramp = np.arange(rows_total, dtype=np.uint64)
    ids[:] = base[:, 0] + ramp  # IDs count on, and wrap
    if first.proto == PROTO_TCP:  # sequence numbers, mod 2**32
        seqs[:] = base[:, 1] + ramp * first.mss


def _ends(out: bytearray, at: int, group: list[Packet], size: int, stream: bool) -> list[tuple[int, int]]:
    """Each packet's last (and first) segment differs in length and flags: set them. Returns (row,
    bytes short of a full segment) of each short last segment, for the L4 checksums."""
    first = group[0]
    proto, ihl, hl, mss = first.proto, first.ihl, first.hl, first.mss
    row = 0
    shorts = []
    for p in group:
        end = at + (row + p.count - 1) * size
        if p.last != mss:
            shorts.append((row + p.count - 1, mss - p.last))
            _pack_u16(out, end + IP_TOTAL_LENGTH, hl + p.last)
            if stream:  # its IP checksum came from the ramp: RFC 1624, the length went down
                check = (out[end + IP_CHECKSUM] << 8 | out[end + IP_CHECKSUM + 1]) + mss - p.last
                check = (check & 0xFFFF) + (check >> 16)
                _pack_u16(out, end + IP_CHECKSUM, 0 if check == 0xFFFF else check)
            if proto == PROTO_UDP:
                _pack_u16(out, end + ihl + UDP_LENGTH, 8 + p.last)
        if proto == PROTO_TCP:  # FIN/PSH on the last segment only, CWR on the first
            out[end + ihl + TCP_FLAGS] = p.flags if p.count == 1 else p.flags & ~CWR
            if p.count > 1 and p.flags & CWR:
                out[at + row * size + ihl + TCP_FLAGS] |= CWR
        row += p.count
    return shorts


def _checksums(out: bytearray, flat: np.ndarray, l4_checks: np.ndarray, at: int, first: Packet, rows_total: int,
               stream: bool, shorts: list[tuple[int, int]]) -> None:
    """Every row's L4 checksum (and, unless a stream's came from the ramp, IP checksum) from one
    ``add.reduceat`` over the table."""
    proto, ihl, size = first.proto, first.ihl, first.hl + first.mss
    w = flat.dtype.itemsize
    if stream:
        # IP headers are done, so each row's L4 part plus the next row's (valid: sums to 0) IP
        # header is one interval: a single start per row.
        l4 = _sum_at(flat, _row_starts(rows_total, size // w, (ihl // w,)))
        rest = (_words(first.template[12:20]) + proto + size - ihl) % 0xFFFF * 256  # addresses, protocol, length
        x = (_BIG - rest) - l4
    else:
        # Per row, [0, 12) [12, 20) [20, ihl) [ihl, next row): IP = the first three, L4 = the last;
        # the IP checksums go in after.
        bounds = (0, 12 // w, 20 // w, ihl // w) if ihl > 20 else (0, 12 // w, 20 // w)
        parts = _sum_at(flat, _row_starts(rows_total, size // w, bounds)).reshape(rows_total, len(bounds))
        ip = parts[:, 0] + parts[:, 1]
        if ihl > 20:
            ip += parts[:, 2]
        _column(out, at + IP_CHECKSUM, "<u2", rows_total, size)[:] = (_BIG - ip) % 0xFFFF
        x = _BIG - 256 * (proto + size - ihl) - parts[:, 1] - parts[:, -1]
    for i, short in shorts:  # a short last segment: a shorter pseudo-header length (the UDP one is in)
        x[i] = int(x[i]) + 256 * short
    if proto == PROTO_TCP:
        l4_checks[:] = x % 0xFFFF
    else:  # never 0: UDP's "no checksum"
        l4_checks[:] = 0xFFFF - (_BIG - x) % 0xFFFF


def _checksums_slowly(rows: np.ndarray, proto: int, ihl: int) -> None:
    for r in rows:
        data = r.tobytes()
        length = (data[2] << 8) | data[3]
        ip = -_words(data[:10] + data[12:ihl]) % 0xFFFF
        r[10], r[11] = ip >> 8, ip & 0xFF
        l4 = data[ihl:length] + (b"\0" if (length - ihl) & 1 else b"")
        s = _words(data[12:20]) + proto + length - ihl + _words(l4)
        at = ihl + (TCP_CHECKSUM if proto == PROTO_TCP else UDP_CHECKSUM)
        check = -s % 0xFFFF if proto == PROTO_TCP else 0xFFFF - s % 0xFFFF
        r[at], r[at + 1] = check >> 8, check & 0xFF


@functools.lru_cache(maxsize=64)
def _pseudo(seg: int, proto: int) -> np.ndarray:
    """[0, 256 × (protocol + L4 length)]: what a full row of ``seg`` bytes adds to its two sums."""
    return np.array([0, 256 * (proto + seg - IPV4_MIN_HEADER)], dtype=np.uint64)


class Checker:
    """The GRO checks of a table (:class:`tun.coalesce.Coalescer`) as array operations: ``differ`` (a
    row per pair of rows, true where the pair breaks the merge rule ``mask``/``step``), ``bad`` (a row
    per row, true where a checksum fails), ``psh`` (per pair: the first has PSH; None for UDP).
    Short rows (``short``: physical row -> length, already vetted) are compared as if they were full.
    ``order`` (optional, intp, ``rows`` long): logical row i is physical row ``order[i]``; ``differ``,
    ``bad`` and ``psh`` are then per logical row (pair), so one flow's rows scattered over a table are
    checked as if they were consecutive.
    Keeps the views of each table shape, as :class:`Cutter` does."""

    def __init__(self) -> None:
        self._views: dict[tuple[int, int, int, int], tuple[np.ndarray, np.ndarray]] = {}

    def __call__(self, buf: bytearray, u8: np.ndarray, u32: np.ndarray, base: int, rows: int, seg: int, hl: int,
                 proto: int, short: dict[int, int], mask: np.ndarray, step: np.ndarray,
                 order: np.ndarray | None = None) -> tuple:
        udp = proto == PROTO_UDP
        dtype = _SUM_DTYPE[seg & 3]
        size = dtype.itemsize
        views = self._views.get((base, rows, seg, hl))
        if views is None:
            if len(self._views) > 64:
                self._views.clear()
            views = self._views[(base, rows, seg, hl)] = (
                u8[base:base + rows * seg].view(dtype),  # the table, for the sums
                np.ndarray((rows, hl >> 2), ">u4", buf, base, (seg, 4)))  # every row's headers
        flat, header_words = views
        headers = _headers_with_full_lengths(buf, header_words, base, seg, short, udp)
        if order is not None:  # logical row i is physical row order[i]: compare rows in that order
            headers = headers[order]
        # 1. Pairs of rows that break the merge rule: one array comparison checks the fields that must
        # match and the IDs and sequence numbers that must count on; PSH apart
        psh = None if udp else headers[:-1, 8] & (PSH << 16)  # TCP flags: word 8, second byte
        headers &= mask
        differ = (headers[1:] - headers[:-1]) != step
        # 2. Rows whose IP header or L4 checksum does not verify: one pass over the table sums, per
        # row, words [0, 12) [12, 20) [20, end) bytes; IP = first two, L4 = last two + pseudo-header.
        parts = _sum_at(flat, _row_starts(rows, seg // size, (0, 12 // size, 20 // size))).reshape(rows, 3)
        sums = parts[:, :2] + parts[:, 1:]  # [IP header, L4 with addresses]
        sums += _pseudo(seg, proto)  # the rest of the pseudo-header, in the LE domain (× 256)
        for r, length in short.items():
            sums[r, 1] += 0xFFFF * 256 - 256 * (seg - length)
        bad = sums % 0xFFFF
        if udp:  # a UDP checksum of 0 means "none": such a datagram is passed on as it came
            bad[:, 1] += np.ndarray((rows,), ">u2", buf, base + UDP_HEADERS - 2, (seg,)) == 0
        if order is not None:
            bad = bad[order]
        return differ, bad, psh


def _headers_with_full_lengths(buf: bytearray, header_words: np.ndarray, base: int, seg: int,
                               short: dict[int, int], udp: bool) -> np.ndarray:
    """Every row's header words, a short row's zero-padded to a whole row and read as if its total
    length (and UDP length) were a full row's: then the rule comparison covers every row's lengths
    at no cost (the bytes are borrowed and put back)."""
    borrowed = []
    for r, length in short.items():
        at = base + r * seg
        buf[at + length:at + seg] = ZEROS[:seg - length]
        borrowed.append((at, bytes(buf[at + 2:at + 4]), bytes(buf[at + 24:at + 26]) if udp else None))
        _pack_u16(buf, at + IP_TOTAL_LENGTH, seg)
        if udp:
            _pack_u16(buf, at + IPV4_MIN_HEADER + UDP_LENGTH, seg - IPV4_MIN_HEADER)
    headers = header_words.astype(np.uint32)
    for at, total, udp_length in borrowed:
        buf[at + 2:at + 4] = total
        if udp_length is not None:
            buf[at + 24:at + 26] = udp_length
    return headers

