"""The GSO cut and the GRO checks as compiled loops (numba): the kernels the fast path runs where numba
is installed, with the signatures of :mod:`tun.gso_numpy`'s (:mod:`tun.kernels` picks one).

Why: numpy does a cut or a GRO check in ~20 array calls, each a pass over 200 KB or over a strided
column of headers, and in place (caches shared with the pods and the peer daemon) every pass costs
2–5× what it costs in a loop. One compiled loop per batch touches each row once, while it is in L1:
copy the payload, sum it, write the headers. The numpy kernels stay the reference and the fallback
(``UDPFLANNEL_JIT=0``, or no numba wheel for this architecture); the tests run both and require the
same bytes. Importing this module imports numba and compiles the loops (or loads them from numba's
on-disk cache): only :func:`tun.kernels.load` does, so a ``--no-fast-path`` daemon never pays for it.

Sums are plain integers (int64: a 64 KB packet's words sum to < 2**32) folded with ``% 0xFFFF``, as in
:mod:`tun.gso_numpy`. Payload bytes are summed as little-endian 32-bit words of the *array* (index
``4k``..), which gives Σ b[even index] + 256 · Σ b[odd index]; a run that starts at an even index is
therefore 256 × its big-endian (network order) sum mod 0xFFFF, one that starts at an odd index exactly
it (256 · 256 ≡ 1). So any alignment works, and the array's own base address only affects speed.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numba
import numpy as np
from numba import int64

from tun.layout import CWR, PROTO_TCP, PROTO_UDP

if TYPE_CHECKING:
    from tun.superpacket import Packet

# No bounds checks (offsets come from headers the callers have checked); numpy's error model (no
# ZeroDivisionError branches in the loops); helpers inlined into the loops (a cut of 3 super-packets:
# 46 -> 40 us); the machine code kept in numba's on-disk cache (a daemon then starts in ~0.4 s more
# instead of ~3 s).
_OPTIONS = {"cache": True, "nogil": True, "boundscheck": False, "error_model": "numpy"}
_helper = numba.njit(inline="always", **_OPTIONS)
_loop = numba.njit(**_OPTIONS)
_TCP = PROTO_TCP
_CWR = CWR


def cut(src: bytearray, src8: np.ndarray, src32: np.ndarray, out: bytearray, out8: np.ndarray, at: int,
        group: list[Packet]) -> None:
    """:class:`tun.gso_numpy.Cutter`'s work as one compiled loop (:func:`_cut`): each row written once."""
    first = group[0]
    templates = np.frombuffer(b"".join([p.template for p in group]), np.uint8).reshape(len(group), first.hl)
    packets = np.array([(p.at, p.count, p.last, p.ident, p.seq, p.flags) for p in group], np.int64)
    _cut(src8, src32, out8, at, first.proto, first.ihl, first.hl, first.mss, templates, packets)


def check(buf: bytearray, u8: np.ndarray, u32: np.ndarray, base: int, rows: int, seg: int, hl: int, proto: int,
          short: dict[int, int], mask: np.ndarray, step: np.ndarray, order: np.ndarray | None = None) -> tuple:
    """:class:`tun.gso_numpy.Checker`'s work as one compiled loop over the rows (:func:`_check`), in
    ``order`` (logical row i = physical row ``order[i]``) if given."""
    lengths = np.full(rows, seg, np.int64)
    for r, length in short.items():
        lengths[r] = length
    differ = np.zeros((rows - 1, 1), np.bool_)
    bad = np.zeros((rows, 1), np.bool_)
    psh = np.zeros(rows - 1, np.bool_)
    if order is None:
        order = np.arange(rows, dtype=np.intp)
    _check(u8, u32, base, rows, seg, hl, proto, lengths, mask, step, differ, bad, psh, order)
    return differ, bad, None if proto == PROTO_UDP else psh


@_helper
def _le_sum(b8, b32, p, n):
    """Bytes ``p .. p+n`` of ``b8`` (``b32`` is the same memory as words): Σ even-index bytes +
    256 · Σ odd-index bytes, not yet folded. Whole words from ``b32`` into four running sums (twice
    as fast as one here); the unaligned head and tail byte by byte."""
    s = 0
    end = p + n
    while p < end and p & 3:
        s += int64(b8[p]) << ((p & 1) * 8)
        p += 1
    words = b32[p >> 2:end >> 2]
    s0 = s1 = s2 = s3 = int64(0)
    whole = words.shape[0] & ~3
    for k in range(0, whole, 4):
        s0 += words[k]
        s1 += words[k + 1]
        s2 += words[k + 2]
        s3 += words[k + 3]
    for k in range(whole, words.shape[0]):
        s0 += words[k]
    s += s0 + s1 + s2 + s3
    p = max(p, (end >> 2) << 2)
    while p < end:
        s += int64(b8[p]) << ((p & 1) * 8)
        p += 1
    return s


@_helper
def _be_sum(b8, b32, p, n):
    """Bytes ``p .. p+n`` as big-endian 16-bit words (an odd tail zero-padded), mod 0xFFFF."""
    s = _le_sum(b8, b32, p, n) % 0xFFFF
    return s * 256 % 0xFFFF if p & 1 == 0 else s


@_helper
def _be_words(b8, p, n):
    """A header's big-endian 16-bit words, ``n`` even, summed (not folded): a few per row, so bytes."""
    s = 0
    for k in range(p, p + n, 2):
        s += (int64(b8[k]) << 8) | b8[k + 1]
    return s


@_helper
def _put16(b8, p, v):
    b8[p] = v >> 8
    b8[p + 1] = v & 0xFF


@_loop
def _cut(src8, src32, out8, at, proto, ihl, hl, mss, templates, packets):
    """Cut super-packets into rows of ``hl + mss`` bytes from ``out8[at]``: per packet
    ``packets[i] = (offset in src, segments, payload of the last, IP ID, TCP sequence, TCP flags)``
    and ``templates[i]`` (its middle segment's headers, ID/sequence/checksums 0, FIN/PSH/CWR off).
    Per row: headers, total length, ID, IP checksum, sequence number and flags (FIN/PSH on the last
    segment only, CWR on the first) or UDP length, payload, L4 checksum. Returns the rows written."""
    size = hl + mss
    row = 0
    for i in range(packets.shape[0]):
        off, count, last = packets[i, 0], packets[i, 1], packets[i, 2]
        ident, seq, flags = packets[i, 3], packets[i, 4], packets[i, 5]
        template = templates[i]
        addresses = _be_words(template, 12, 8)
        for r in range(count):
            d = at + row * size
            payload = mss if r < count - 1 else last
            for k in range(hl):
                out8[d + k] = template[k]
            total = hl + payload
            _put16(out8, d + 2, total)
            _put16(out8, d + 4, (ident + r) & 0xFFFF)
            _put16(out8, d + 10, (0xFFFF - _be_words(out8, d, ihl) % 0xFFFF) % 0xFFFF)
            if proto == _TCP:
                q = (seq + r * mss) & 0xFFFFFFFF
                _put16(out8, d + ihl + 4, q >> 16)
                _put16(out8, d + ihl + 6, q & 0xFFFF)
                if r == count - 1:
                    out8[d + ihl + 13] = flags if count == 1 else flags & ~_CWR
                elif r == 0:
                    out8[d + ihl + 13] |= flags & _CWR
            else:
                _put16(out8, d + ihl + 4, 8 + payload)
            s = off + hl + r * mss
            into = out8[d + hl:d + hl + payload]  # through slices: indexing out8 and src8 was 40x slower
            source = src8[s:s + payload]
            for k in range(payload):
                into[k] = source[k]
            total_sum = addresses + proto + total - ihl + _be_words(out8, d + ihl, hl - ihl) + _be_sum(src8, src32, s, payload)
            if proto == _TCP:
                _put16(out8, d + ihl + 16, (0xFFFF - total_sum % 0xFFFF) % 0xFFFF)
            else:  # never 0: UDP's "no checksum"
                _put16(out8, d + ihl + 6, 0xFFFF - total_sum % 0xFFFF)
            row += 1
    return row


@_loop
def _check(b8, b32, base, rows, seg, hl, proto, lengths, mask, step, differ, bad, psh, order):
    """GRO checks of a table of ``rows`` rows of ``seg`` bytes at ``base`` (IHL 5 headers), rows
    ``lengths[i]`` bytes long (= seg but for short last rows, which the caller vets apart):

    - ``bad[i]``: row i's IP header or L4 checksum does not verify (or, UDP, is 0: "none");
    - ``differ[i]``: rows i and i+1 break a merge rule: their header words masked with ``mask`` must
      differ by exactly ``step`` (32-bit wrap), a short row compared as if it were full;
    - ``psh[i]``: row i has TCP PSH (a run ends after it).

    Row i here is logical: physical row ``order[i]`` (``lengths`` is per physical row)."""
    words = hl >> 2
    prev = np.zeros(words, np.int64)
    for i in range(rows):
        at = base + order[i] * seg
        n = lengths[order[i]]
        ip = _be_words(b8, at, 20)
        l4 = _be_words(b8, at + 12, 8) + proto + n - 20 + _be_sum(b8, b32, at + 20, n - 20)
        ok = ip % 0xFFFF == 0 and l4 % 0xFFFF == 0
        if proto != _TCP and b8[at + 26] == 0 and b8[at + 27] == 0:
            ok = False
        bad[i] = not ok
        for w in range(words):
            p = at + 4 * w
            v = (int64(b8[p]) << 24) | (int64(b8[p + 1]) << 16) | (int64(b8[p + 2]) << 8) | b8[p + 3]
            if n != seg:  # a short row lends the comparison a full row's lengths
                if w == 0:
                    v = (v & 0xFFFF0000) | seg
                elif w == 6 and proto != _TCP:
                    v = (v & 0xFFFF) | ((seg - 20) << 16)
            v &= mask[w]
            if i > 0 and (v - prev[w]) & 0xFFFFFFFF != step[w]:
                differ[i - 1] = True
            prev[w] = v
        if i < rows - 1:
            psh[i] = proto == _TCP and b8[at + 33] & 0x08 != 0
