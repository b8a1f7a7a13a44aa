"""GSO split and GRO coalesce for IPv4 TCP (and UDP), as plain functions over buffers — sans-IO.

The shape is wireguard-go's ``tun/offload_linux.go``: the device hands us one *super-packet* (a TSO/USO
skb: headers once, up to 64 KB of payload, a virtio_net_hdr saying how to cut it) and we cut it into
ordinary MTU-sized IPv4 packets; on the way back consecutive segments of one TCP flow are glued into one
super-packet the TUN takes in a single write. Nothing on the wire changes: every segment we produce is
a complete IPv4 packet with correct IP and L4 checksums, exactly what the kernel's own GSO would emit.

Why not Python: a plain Python loop costs ~2 µs per segment, which eats the gain. Where numba is
installed the per-segment work runs as compiled loops over the rows (:mod:`tun.gso_jit`); the numpy
code here is the reference they are tested against and the fallback: a fixed number of array
operations per batch (~20, each ~1 µs), whatever the segment count.
Checksums use ``% 0xFFFF`` (2**16 ≡ 1 mod 0xFFFF, so a sum of 16- or 32-bit words folds to the one's
complement sum, and ``-s % 0xFFFF`` is the checksum of a sum ``s``: exactly what the kernel stores).
Payload words are read *little-endian* straight from the buffer: for any bytes ``sum_LE ≡ 256 · sum_BE
(mod 0xFFFF)``, so the other terms are scaled by 256 instead of byte-swapping 64 KB, and a checksum
computed in that domain is stored through a little-endian view, which lands it in network order.
UDP checksums are never 0 (0 means "none"): 0xFFFF stands in, as in the kernel's ``CSUM_MANGLED_0``.

Never raises for bad packets: :meth:`Segmenter.cut` returns a :class:`Refused` reason for them.
"""

from __future__ import annotations

import functools
import struct
from enum import IntEnum
from typing import NamedTuple

import numpy as np

from tun import gso_jit, vnet
from tun.layout import ACK, CWR, FIN, MAX_IP_PACKET, PROTO_TCP, PROTO_UDP, PSH, UDP_HEADERS, UDP_MAX_SEGMENTS

# Read buffers must have this much room beyond the largest packet: split() zero-pads the last segment's
# payload to a whole segment so one reshape sums every segment (the zeros don't change a checksum).
SPLIT_SLACK = MAX_IP_PACKET + 8

# Segmenters and Coalescers run the compiled loops of gso_jit where numba is installed, unless built
# with jit=False or this is False (the tests run both and compare).
COMPILED = True



class Refused(IntEnum):
    """Why a super-packet cannot be cut. ``udpflannel`` counts it as the packet verdict of the same name."""

    TOO_SHORT = 1  # fewer than 20 bytes
    NOT_IPV4 = 2  # not version 4, or an IPv6 GSO type
    BAD_HEADER = 3  # lengths, protocol or GSO type that do not fit together, a fragment


_ZEROS = memoryview(bytes(MAX_IP_PACKET + 8))
_BIG = 0xFFFF << 42  # a multiple of 0xFFFF above every sum here
_ID_RAMP = (np.arange(2 << 16) & 0xFFFF).astype(np.uint16)  # IP IDs from any start, wrapping
_CHECKSUM_RAMP = ((0xFFFF - np.arange(0xFFFF + (1 << 16)) % 0xFFFF) % 0xFFFF).astype(np.uint16)  # of s, s+1, ...


@functools.lru_cache(maxsize=8)
def _steps(mss: int) -> np.ndarray:
    """``i * mss`` for every row index a cut can have (uint64: sequence numbers wrap on assignment)."""
    return np.arange(1 << 16, dtype=np.uint64) * mss  # a stream cut has ≤ 2**16 rows


_SUM_DTYPE = {0: np.dtype("<u4"), 2: np.dtype("<u2")}
_any_per_row = np.logical_or.reduce
_count = np.count_nonzero
_sum_at = np.add.reduceat  # by (segment size % 4): widest word that tiles it


BUFFER_SIZE = (MAX_IP_PACKET + SPLIT_SLACK + 7) & ~7  # a packet buffer for split() or a Coalescer (whole words)


def packet_buffer() -> bytearray:
    return bytearray(BUFFER_SIZE)


def _views(buf: bytearray) -> tuple[memoryview, np.ndarray]:
    if len(buf) < BUFFER_SIZE:
        raise ValueError(f"packet buffers need {BUFFER_SIZE} bytes (see SPLIT_SLACK), got {len(buf)}")
    return memoryview(buf), np.frombuffer(buf, np.uint8)


def complete_checksum(buf, n: int, csum_start: int, csum_offset: int) -> bool:
    """Finish a ``NEEDS_CSUM`` packet in place: the field holds the pseudo-header sum; add the rest.

    False (buffer untouched) if the offsets do not fit the packet. Every ACK the kernel routes into
    the TUN arrives like this once checksum offload is on, so it must be cheap: one big-int fold.
    """
    at = csum_start + csum_offset
    if csum_start < 20 or at + 2 > n:
        return False
    value = int.from_bytes(buf[csum_start:n], "big")
    if (n - csum_start) & 1:
        value <<= 8
    check = 0xFFFF - value % 0xFFFF
    buf[at] = check >> 8
    buf[at + 1] = check & 0xFF
    return True


def _words(data) -> int:
    """``data`` (even length) as one integer: ≡ the sum of its big-endian 16-bit words mod 0xFFFF."""
    return int.from_bytes(data, "big")


class Cut(NamedTuple):
    """One super-packet cut into datagrams, ready for one UDP_SEGMENT ``sendmsg`` each batch: datagram
    ``j`` is ``size`` bytes at ``start + j * size`` in :attr:`Segmenter.out`, except the last, which is
    ``last`` bytes long. Valid until the next :meth:`Segmenter.cut`."""

    start: int
    count: int
    size: int
    last: int


class _Packet(NamedTuple):
    """What the per-packet (Python) pass learns about one super-packet."""

    at: int  # offset of the packet in the input buffer
    proto: int
    ihl: int
    hl: int
    mss: int
    count: int
    last: int  # payload bytes of the last segment
    template: bytes  # headers for a middle segment: total length set, ID/seq/checksums 0, FIN/PSH/CWR off
    ident: int
    seq: int
    flags: int  # TCP flags as read (0 for UDP)


class Segmenter:
    """Cuts many TSO/USO super-packets at once into ready datagrams, laid out back to back in
    :attr:`out` so each batch to a peer is one buffer (no scatter-gather list to build).

    Per group of like packets (same protocol, header lengths and segment size) a fixed number of array
    operations, whatever the packet and segment counts: headers from the templates, IDs and sequence
    numbers, payloads copied beside them, then **one** ``add.reduceat`` over the output gives every
    segment's IP-header and L4 sums, from which both checksums follow. Packets are parsed in Python.
    With ``jit`` (the default where numba is installed: :data:`COMPILED`) one compiled loop
    (:func:`tun.gso_jit.cut`) does all of it per row instead.
    """

    def __init__(self, capacity: int = 20 * BUFFER_SIZE, *, jit: bool | None = None) -> None:
        self.jit = (COMPILED if jit is None else jit) and gso_jit.load()  # gso_jit's loops, not the arrays below
        self.out = bytearray(capacity)
        self.out_mv = memoryview(self.out)
        self._out_u8 = np.frombuffer(self.out, np.uint8)
        self._views: dict[tuple[int, int, int, int, int], tuple] = {}
        self._in: bytearray | None = None
        self._in_u8 = self._out_u8
        self._in_u32 = self._out_u8

    def cut(self, buf: bytearray, items) -> list[Cut | Refused]:
        """Cut the packets ``(offset, length, gso_type, gso_size)`` of ``buf``, in order. Each needs
        room for ``gso_size`` more bytes after it in ``buf`` (its last segment is zero-padded there).
        """
        results: list = []
        group: list[_Packet] = []
        at = 0
        need = sum(n + (n // size + 2) * 128 + size for _, n, _, size in items if size > 0)  # ≥ rows × row size
        if need > len(self.out):  # grow now, never halfway (earlier cuts point into out)
            self._grow(need)
        for off, n, gso_type, gso_size in items:
            packet = _parse(buf, off, n, gso_type, gso_size)
            if isinstance(packet, Refused):
                at = self._flush(buf, group, results, at)
                group = []
                results.append(packet)
                continue
            if group and packet[1:5] != group[0][1:5]:
                at = self._flush(buf, group, results, at)
                group = []
            group.append(packet)
        self._flush(buf, group, results, at)
        return results

    def _flush(self, buf: bytearray, group: list[_Packet], results: list, at: int) -> int:
        """Cut ``group`` into ``out`` from ``at``; append its Cuts; return the next free offset."""
        if not group:
            return at
        if self.jit:
            return self._flush_compiled(buf, group, results, at)
        first = group[0]
        proto, ihl, hl, mss = first.proto, first.ihl, first.hl, first.mss
        size = hl + mss
        counts = [p.count for p in group]
        rows_total = sum(counts)
        out = self.out
        views = self._views.get((at, rows_total, size, ihl, proto))
        if views is None:
            views = self._views_for(at, rows_total, size, ihl, proto)
        rows, flat, ids, ip_checks, seqs, l4_checks = views
        in_u8 = self._in_u8 if buf is self._in else self._input(buf)
        index = 0
        for p in group:  # payloads beside their headers (the last one's tail zero-padded in the input)
            end = p.at + hl + p.count * mss
            pad = end - (p.at + hl + (p.count - 1) * mss + p.last)
            if pad:
                buf[end - pad:end] = _ZEROS[:pad]
            rows[index:index + p.count, hl:] = in_u8[p.at + hl:end].reshape(p.count, mss)
            index += p.count
        dtype = _SUM_DTYPE.get(size & 3)
        # One flow's consecutive packets (the common case: a sender's TSO bursts read in one go) share
        # a template and count IDs and sequence numbers on: headers by broadcast, IDs and IP checksums
        # from ramps. Anything else gets per-packet templates and per-row sums.
        stream = dtype is not None and first.ident + rows_total <= 0x10000
        same = True  # and every header alike, not just the IP ones (no TSval or window change)
        if stream:
            ident, seq, ip_part = first.ident, first.seq, first.template[:ihl]
            for p in group:
                if p.ident != ident or p.seq != seq:
                    stream = False
                    break
                if p.template != first.template:
                    same = False
                    if p.template[:ihl] != ip_part:
                        stream = False
                        break
                ident += p.count
                seq = (seq + p.count * mss) & 0xFFFFFFFF
        if stream:
            if same:
                rows[:, :hl] = np.frombuffer(first.template, np.uint8)
            else:  # a run of rows per template (a few packets: cheaper than a gather)
                row = 0
                for p in group:
                    rows[row:row + p.count, :hl] = np.frombuffer(p.template, np.uint8)
                    row += p.count
            ids[:] = _ID_RAMP[first.ident:first.ident + rows_total]
            ip_sum = (_words(first.template[:ihl]) + first.ident) % 0xFFFF
            ip_checks[:] = _CHECKSUM_RAMP[ip_sum:ip_sum + rows_total]
            if proto == PROTO_TCP:
                seqs[:] = _steps(mss)[:rows_total] + first.seq
        else:
            which = np.repeat(np.arange(len(group)), counts)  # row -> packet
            rows[:, :hl] = np.frombuffer(b"".join(p.template for p in group), np.uint8).reshape(len(group), hl)[which]
            firsts, local = [], 0
            for p in group:
                firsts.append(local)
                local += p.count
            # per packet: ID and sequence number minus the row's index, so one arange adds the rest
            base = np.array([((p.ident - f) & 0xFFFF, (p.seq - f * mss) & 0xFFFFFFFF)
                             for p, f in zip(group, firsts, strict=True)], dtype=np.uint64)[which]
            ramp = np.arange(rows_total, dtype=np.uint64)
            ids[:] = base[:, 0] + ramp  # IDs count on, and wrap
            if proto == PROTO_TCP:  # sequence numbers, mod 2**32
                seqs[:] = base[:, 1] + ramp * mss
        row = 0
        shorts = []  # (row, bytes short of a full segment) of each short last segment
        for p in group:  # the last (and first) segment of each packet differ in length and flags
            end = at + (row + p.count - 1) * size
            if p.last != mss:
                shorts.append((row + p.count - 1, mss - p.last))
                out[end + 2] = (hl + p.last) >> 8
                out[end + 3] = (hl + p.last) & 0xFF
                if stream:
                    check = (out[end + 10] << 8 | out[end + 11]) + mss - p.last
                    check = (check & 0xFFFF) + (check >> 16)  # RFC 1624: the length went down
                    if check == 0xFFFF:
                        check = 0
                    out[end + 10] = check >> 8
                    out[end + 11] = check & 0xFF
                if proto == PROTO_UDP:
                    out[end + ihl + 4] = (8 + p.last) >> 8
                    out[end + ihl + 5] = (8 + p.last) & 0xFF
            if proto == PROTO_TCP:
                out[end + ihl + 13] = p.flags if p.count == 1 else p.flags & ~CWR
                if p.count > 1 and p.flags & CWR:
                    out[at + row * size + ihl + 13] |= CWR
            results.append(_new_packet(Cut, (at + row * size, p.count, size, hl + p.last)))
            row += p.count
        if dtype is None:  # odd segment size: rows don't tile into words; one row at a time (rare)
            self._checksums_slowly(rows, proto, ihl, hl)
            return at + rows_total * size + 8 & ~7
        w = dtype.itemsize
        if stream:
            # IP headers are done, so each row's L4 part plus the next row's (valid: sums to 0) IP
            # header is one interval: a single start per row.
            l4 = _sum_at(flat, _row_starts(rows_total, size // w, (ihl // w,)))
        else:
            # Per row, [0, 12) [12, 20) [20, ihl) [ihl, next row): IP = the first three, L4 = the last;
            # the IP checksums go in after.
            bounds = (0, 12 // w, 20 // w, ihl // w) if ihl > 20 else (0, 12 // w, 20 // w)
            parts = _sum_at(flat, _row_starts(rows_total, size // w, bounds)).reshape(rows_total, len(bounds))
            ip = parts[:, 0] + parts[:, 1]
            if ihl > 20:
                ip += parts[:, 2]
            _column(out, at + 10, "<u2", rows_total, size)[:] = (_BIG - ip) % 0xFFFF
            l4 = parts[:, -1]
        # L4 checksum: the rest of the pseudo-header is the addresses and the protocol and L4 length
        rest = (_words(first.template[12:20]) + proto + size - ihl) % 0xFFFF * 256 if stream else None
        x = (_BIG - rest) - l4 if stream else _BIG - 256 * (proto + size - ihl) - parts[:, 1] - l4
        for i, short in shorts:  # a short last segment: a shorter pseudo-header length (the UDP one is in)
            x[i] = int(x[i]) + 256 * short
        if proto == PROTO_TCP:
            l4_checks[:] = x % 0xFFFF
        else:  # never 0: UDP's "no checksum"
            l4_checks[:] = 0xFFFF - (_BIG - x) % 0xFFFF
        return at + rows_total * size + 8 & ~7

    def _flush_compiled(self, buf: bytearray, group: list[_Packet], results: list, at: int) -> int:
        """:meth:`_flush` as one compiled loop (:func:`tun.gso_jit.cut`): each row written once."""
        first = group[0]
        hl, size = first.hl, first.hl + first.mss
        if buf is not self._in:
            self._input(buf)
        templates = np.frombuffer(b"".join([p.template for p in group]), np.uint8).reshape(len(group), hl)
        packets = np.array([p[:1] + p[5:7] + p[8:] for p in group], np.int64)  # at, count, last, ident, seq, flags
        gso_jit.cut(self._in_u8, self._in_u32, self._out_u8, at, first.proto, first.ihl, hl, first.mss, templates, packets)
        row = 0
        for p in group:
            results.append(_new_packet(Cut, (at + row * size, p.count, size, hl + p.last)))
            row += p.count
        return at + row * size + 8 & ~7

    def _checksums_slowly(self, rows: np.ndarray, proto: int, ihl: int, hl: int) -> None:
        for r in rows:
            data = r.tobytes()
            length = (data[2] << 8) | data[3]
            ip = -_words(data[:10] + data[12:ihl]) % 0xFFFF
            r[10], r[11] = ip >> 8, ip & 0xFF
            l4 = data[ihl:length] + (b"\0" if (length - ihl) & 1 else b"")
            s = _words(data[12:20]) + proto + length - ihl + _words(l4)
            at = ihl + (16 if proto == PROTO_TCP else 6)
            check = -s % 0xFFFF if proto == PROTO_TCP else 0xFFFF - s % 0xFFFF
            r[at], r[at + 1] = check >> 8, check & 0xFF

    def _grow(self, size: int) -> None:
        self.out = bytearray(size)
        self.out_mv = memoryview(self.out)
        self._out_u8 = np.frombuffer(self.out, np.uint8)
        self._views.clear()

    def _views_for(self, at: int, rows: int, size: int, ihl: int, proto: int) -> tuple:
        """The arrays a cut of ``rows`` rows of ``size`` bytes at ``at`` in ``out`` writes through:
        the rows, their words for the sums, and the IP ID, IP checksum, TCP sequence number and L4
        checksum columns. Cached: a steady flow cuts the same shapes again and again, and building
        six views costs more than the dict lookup."""
        if len(self._views) > 64:
            self._views.clear()
        out, dtype = self.out, _SUM_DTYPE.get(size & 3)
        table = self._out_u8[at:at + rows * size]
        views = self._views[(at, rows, size, ihl, proto)] = (
            table.reshape(rows, size),
            table.view(dtype) if dtype is not None else None,
            _column(out, at + 4, ">u2", rows, size),
            _column(out, at + 10, ">u2", rows, size),
            _column(out, at + ihl + 4, ">u4", rows, size) if proto == PROTO_TCP else None,
            _column(out, at + ihl + (16 if proto == PROTO_TCP else 6), "<u2", rows, size),
        )
        return views

    def _input(self, buf: bytearray) -> np.ndarray:
        """``buf`` as bytes for numpy, kept for the next cut (the fast path cuts from one buffer)."""
        self._in, self._in_u8 = buf, np.frombuffer(buf, np.uint8)
        self._in_u32 = np.frombuffer(buf, np.uint32, len(buf) >> 2)
        return self._in_u8


_new_packet = tuple.__new__  # builds a _Packet or a Cut without NamedTuple's Python-level __new__


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


# One unpack per header instead of a byte at a time (the parse runs once per super-packet, on the hot path)
_ip_fields = struct.Struct("!BxHHHxB").unpack_from  # version/IHL, total length, ID, flags/fragment, protocol
_tcp_fields = struct.Struct("!4xI4xBB").unpack_from  # sequence number, data offset, flags
_pack_two_u16 = struct.Struct("!HH").pack_into
_pack_u16 = struct.Struct("!H").pack_into
_udp_length = struct.Struct("!H").unpack_from
_head_fields = struct.Struct("!BxH2xHxB").unpack_from  # version/IHL, total length, flags/fragment, protocol
_PROTO_OF_GSO = {vnet.GSO_TCPV4: PROTO_TCP, vnet.GSO_UDP_L4: PROTO_UDP}
_NOT_ECN = ~vnet.GSO_ECN
_TOO_SHORT, _NOT_IPV4, _BAD_HEADER = Refused


def _parse(buf, off: int, n: int, gso_type: int, gso_size: int) -> _Packet | Refused:
    """Validate one super-packet's headers and derive its segments' template. ``hdr_len`` from the
    vnet header is never used: header lengths come from the IHL and the TCP data offset."""
    if n < 20:
        return _TOO_SHORT
    p0, total, ident, fragment, proto = _ip_fields(buf, off)
    if p0 >> 4 != 4:
        return _NOT_IPV4
    want = _PROTO_OF_GSO.get(gso_type & _NOT_ECN)
    if want is None:
        return _NOT_IPV4 if gso_type & _NOT_ECN == vnet.GSO_TCPV6 else _BAD_HEADER
    ihl = (p0 & 0x0F) << 2
    if ihl < 20 or total != n or proto != want or fragment & 0x3FFF or gso_size <= 0:  # MF or an offset
        return _BAD_HEADER
    if proto == PROTO_TCP:
        if n < ihl + 20:
            return _BAD_HEADER
        seq, offset, flags = _tcp_fields(buf, off + ihl)
        if offset < 0x50:
            return _BAD_HEADER
        hl = ihl + (offset >> 4 << 2)
    else:
        seq = flags = 0
        hl = ihl + 8
    if hl > n:
        return _BAD_HEADER
    count = -(-(n - hl) // gso_size) or 1
    last = n - hl - (count - 1) * gso_size
    t = bytearray(buf[off:off + hl])
    _pack_two_u16(t, 2, hl + gso_size, 0)  # total length of a full segment; ID 0
    t[10] = t[11] = 0
    if proto == PROTO_TCP:
        t[ihl + 4:ihl + 8] = b"\0\0\0\0"
        t[ihl + 13] = flags & ~(FIN | PSH | CWR)
        t[ihl + 16] = t[ihl + 17] = 0
    else:
        _pack_two_u16(t, ihl + 4, 8 + gso_size, 0)  # UDP length of a full segment; checksum 0
    return _new_packet(_Packet, (off, proto, ihl, hl, gso_size, count, last, bytes(t), ident, seq, flags))


SMALLEST_CUT = 8  # payload bytes per segment, at least, when cutting for a narrow path


def fit_segment_size(buf, off: int, n: int, gso_type: int, gso_size: int, largest: int) -> int:
    """The segment size to cut a super-packet at so that each datagram is at most ``largest`` bytes.

    A TSO super-packet is a byte range of one TCP stream, so any segment size cuts it into valid
    segments (the receiver's TCP takes them as it takes any): ``gso_size`` if its segments fit
    already, else the most that fits, in whole 32-bit words with the headers (so the numpy cut and
    the receiving node's GRO check keep their fast routes). Everything else comes back as
    ``gso_size``, unchanged: a USO segment is one UDP datagram and cannot be cut; a malformed packet
    gets its verdict from the cut; headers that leave fewer than ``SMALLEST_CUT`` bytes, no cut.
    A plain TCP packet may be passed too, as ``gso_type`` TCPV4 with ``gso_size`` = ``n``.

    IP IDs count on from the packet's own for each segment, as in any cut, so the segments of a
    packet cut smaller overlap the next packet's IDs: harmless for DF packets (RFC 6864), which
    are the ones that get cut until their sender lowers its MSS (a frag-needed tells it).
    """
    if gso_type & _NOT_ECN != vnet.GSO_TCPV4 or n < 40 or off < 0 or off + n > len(buf):
        return gso_size
    p0, _, _, fragment, proto = _ip_fields(buf, off)
    ihl = (p0 & 0x0F) << 2
    if p0 >> 4 != 4 or ihl < 20 or proto != PROTO_TCP or fragment & 0x3FFF or n < ihl + 20:
        return gso_size
    hl = ihl + (buf[off + ihl + 12] >> 4 << 2)
    room = (largest & ~3) - hl
    if hl + min(gso_size, n - hl) <= largest or room < SMALLEST_CUT:  # the largest segment fits
        return gso_size
    return room


# The merge rules, over an IPv4 (IHL 5) header and the TCP or UDP header after it (the kernel's
# tcp_gro_receive and udp_gro_receive rules; a short last segment is handled apart). Consecutive rows
# of a run may differ only in their checksums and, for TCP, PSH (which ends the run after its row);
# the IP ID must count on by one and a TCP sequence number by one payload; everything else — version,
# TOS, total length, DF, TTL, protocol, addresses, ports, UDP length, ACK number, data offset, the
# other flags, window, options — must match.
_FREE_TCP = (10, 11, 36, 37)  # header and TCP checksums
_FREE_UDP = (10, 11, 26, 27)  # header and UDP checksums


@functools.lru_cache(maxsize=64)
def _merge_rule(hl: int, seg: int, proto: int) -> tuple[np.ndarray, np.ndarray]:
    """The rules above as (mask, step) over a row's headers read as big-endian 32-bit words: masked,
    each row must equal the row before plus ``step``, in unsigned 32-bit arithmetic. The ID is the
    upper half of word 1, so ``1 << 16`` counts it on with the kernel's 16-bit wrap while the
    fragment field (the lower half) must stay equal; word 6 is the TCP sequence number."""
    keep = np.full(hl, 0xFF, np.uint8)
    keep[list(_FREE_UDP if proto == PROTO_UDP else _FREE_TCP)] = 0
    step = np.zeros(hl >> 2, np.uint32)
    step[1] = 1 << 16
    if proto == PROTO_TCP:
        keep[33] = 0xFF & ~PSH
        step[6] = seg - hl
    return keep.view(">u4").astype(np.uint32), step


@functools.lru_cache(maxsize=64)
def _pseudo(seg: int, proto: int) -> np.ndarray:
    """[0, 256 × (protocol + L4 length)]: what a full row of ``seg`` bytes adds to its two sums."""
    return np.array([0, 256 * (proto + seg - 20)], dtype=np.uint64)


class Coalescer:
    """GRO over datagrams received back to back into ``buf``: UDP_GRO batches (datagrams of ``seg``
    bytes, the last maybe shorter, as one ``recvmsg_into`` returns them), each starting on a row
    boundary, so that several batches form one table of ``seg``-byte rows and one pass of array
    operations checks them all. Two steps, so the caller can apply its own per-packet checks to the
    first packet of each run between them:

    1. :meth:`plan` → runs ``(a, b)`` covering every row in order; ``b - a >= 2`` means rows a..b-1
       are consecutive segments of one TCP flow (or, with ``udp``, datagrams of one UDP flow) with
       valid IP and L4 checksums, safe to merge;
    2. :meth:`merge` → the iovec of one TUN write carrying rows a..b-1 as one GSO_TCPV4 (GSO_UDP_L4)
       super-packet.

    ``udp``: merge UDP flows too — only where the TUN takes GSO_UDP_L4 writes (USO, Linux >= 6.2).
    ``jit``: check the rows in one compiled loop (:func:`tun.gso_jit.check`; the default where numba
    is installed) instead of the array operations.
    """

    def __init__(self, buf: bytearray, *, udp: bool = False, jit: bool | None = None) -> None:
        self.buf = buf
        self.udp = udp
        self.jit = (COMPILED if jit is None else jit) and gso_jit.load()  # gso_jit's loops, not arrays
        self._mv, self._u8 = _views(buf)
        self._u32 = np.frombuffer(buf, np.uint32, len(buf) >> 2)
        self._views: dict[tuple[int, int, int, int], tuple[np.ndarray, np.ndarray]] = {}
        self._payloads: dict[tuple[int, int], list] = {}
        self._base, self._seg, self._hl, self._proto = 0, 1, 0, PROTO_TCP  # the table last planned
        self._short: dict[int, int] = {}  # its rows shorter than seg: row -> length

    def row(self, i: int) -> memoryview:
        """Row ``i`` of the table last planned, exactly as long as its datagram."""
        at = self._base + i * self._seg
        return self._mv[at:at + self._short.get(i, self._seg)]

    def plan(self, seg: int, sizes, *, base: int = 0, split_after=()) -> list[tuple[int, int]]:
        """Cut the table into mergeable runs and singles, in order.

        ``sizes``: the byte counts of consecutive batches from ``base``, each padded to whole rows;
        ``split_after``: indices of batches after which no run may continue (the next one comes from
        another peer, say). Reads only: it zero-pads short rows and restores the bytes it borrows.
        """
        buf = self.buf
        short: dict[int, int] = {}
        ends = []
        rows = 0
        for nbytes in sizes:
            rows += -(-nbytes // seg)
            if nbytes % seg:
                short[rows - 1] = nbytes % seg
            ends.append(rows - 1)
        self._base, self._seg, self._short = base, seg, short
        if rows < 2 or seg & 1 or seg < UDP_HEADERS + 2 or buf[base] != 0x45:
            return _singles(0, rows)
        proto = buf[base + 9]
        if proto == PROTO_TCP and seg >= 40:
            hl = 20 + ((buf[base + 32] >> 4) << 2)
            if hl < 40:
                return _singles(0, rows)
        elif proto == PROTO_UDP and self.udp:
            hl = UDP_HEADERS
        else:
            return _singles(0, rows)
        if hl >= seg:
            return _singles(0, rows)
        self._hl, self._proto = hl, proto
        fixed = sorted(set(short) | {ends[j] for j in split_after if j < len(ends)})  # runs end here
        udp = proto == PROTO_UDP
        checks = self._checks_compiled if self.jit else self._checks
        differ, bad, psh, short_bad = checks(base, rows, seg, hl, proto, short)
        inner = [r for r in fixed if r < rows - 1]
        if inner:  # pairs across a fixed end are cut anyway: their differences don't matter
            differ[inner] = False
        # The common case — consecutive segments of one flow, cut only after PSH — costs one count per
        # condition (count_nonzero is C; .all()/.any() go through Python wrappers); only other
        # failures pay for per-row links.
        if not short_bad and not (_count(differ) or _count(bad)):
            cuts = sorted(set(inner).union(np.flatnonzero(psh).tolist())) if psh is not None and _count(psh) else inner
        else:
            cut = _any_per_row(differ, axis=1)
            if psh is not None:
                cut |= psh != 0
            bad_row = _any_per_row(bad, axis=1)
            bad_row[short_bad] = True
            cut |= bad_row[:-1]
            cut |= bad_row[1:]
            cut[inner] = True
            cuts = np.flatnonzero(cut).tolist()
        most = (MAX_IP_PACKET - hl) // (seg - hl)  # rows in one merged packet of at most 64 KB
        if udp:
            most = min(most, UDP_MAX_SEGMENTS)  # the kernel refuses more from a virtio_net_hdr
        plan = []
        start = 0
        for end in (*cuts, rows - 1):  # each run ends after a cut, the last with the table
            for c in range(start, end + 1, most):  # no more than ``most`` rows in one write
                d = min(c + most, end + 1)
                if d - c > 1 and self._head_ok(c):
                    plan.append((c, d))
                else:
                    plan += _singles(c, d)
            start = end + 1
        return plan

    def _checks(self, base: int, rows: int, seg: int, hl: int, proto: int, short: dict[int, int]) -> tuple:
        """The header rules and checksums of every row, as array operations: ``differ`` (a row per pair
        of rows, true where the pair breaks a rule), ``bad`` (a row per row, true where a checksum
        fails), ``psh`` (per pair: the first has PSH; None for UDP) and the short rows whose lengths
        are wrong."""
        buf = self.buf
        udp = proto == PROTO_UDP
        dtype = _SUM_DTYPE[seg & 3]
        size = dtype.itemsize
        views = self._views.get((base, rows, seg, hl))
        if views is None:
            if len(self._views) > 64:
                self._views.clear()
            views = self._views[(base, rows, seg, hl)] = (
                self._u8[base:base + rows * seg].view(dtype),  # the table, for the sums
                np.ndarray((rows, hl >> 2), ">u4", buf, base, (seg, 4)))  # every row's headers
        flat, header_words = views

        # Short rows may only end a run. Each lends the comparison below its length bytes (checked
        # here, restored after): then the comparison covers every row's total length (and UDP
        # length) at no cost.
        short_bad = []
        borrowed = []
        for r, length in short.items():
            at = base + r * seg
            buf[at + length:at + seg] = _ZEROS[:seg - length]
            if _short_row_wrong(buf, at, length, hl, udp):
                short_bad.append(r)
            borrowed.append((at, bytes(buf[at + 2:at + 4]), bytes(buf[at + 24:at + 26]) if udp else None))
            _pack_u16(buf, at + 2, seg)
            if udp:
                _pack_u16(buf, at + 24, seg - 20)
        # 1. Pairs of rows that break a header rule (``_merge_rule``: one array comparison checks
        # the fields that must match, the IDs and sequence numbers that must count on); PSH apart
        mask, step = _merge_rule(hl, seg, proto)
        headers = header_words.astype(np.uint32)
        for at, total, udp_length in borrowed:
            buf[at + 2:at + 4] = total
            if udp_length is not None:
                buf[at + 24:at + 26] = udp_length
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
            bad[:, 1] += np.ndarray((rows,), ">u2", buf, base + 26, (seg,)) == 0
        return differ, bad, psh, short_bad

    def _checks_compiled(self, base: int, rows: int, seg: int, hl: int, proto: int, short: dict[int, int]) -> tuple:
        """:meth:`_checks` as one compiled loop over the rows (:func:`tun.gso_jit.check`)."""
        buf = self.buf
        lengths = np.full(rows, seg, np.int64)
        short_bad = []
        for r, length in short.items():
            at = base + r * seg
            lengths[r] = length
            if _short_row_wrong(buf, at, length, hl, proto == PROTO_UDP):
                short_bad.append(r)
        differ = np.zeros((rows - 1, 1), np.bool_)
        bad = np.zeros((rows, 1), np.bool_)
        psh = np.zeros(rows - 1, np.bool_)
        mask, step = _merge_rule(hl, seg, proto)
        gso_jit.check(self._u8, self._u32, base, rows, seg, hl, proto, lengths, mask, step, differ, bad, psh)
        return differ, bad, None if proto == PROTO_UDP else psh, short_bad

    def _head_ok(self, a: int) -> bool:
        """Rows in a run match the first one but for ID, sequence number and checksums; so only the
        first needs looking at: IHL 5, total length = row size, not a fragment; for TCP flags exactly
        ACK, for UDP the UDP length = row size − 20 (the checksums were checked with the rows)."""
        seg = self._seg
        at = self._base + a * seg
        p0, total, fragment, proto = _head_fields(self.buf, at)
        if p0 != 0x45 or proto != self._proto or total != seg or fragment & 0x3FFF:
            return False
        if proto == PROTO_UDP:
            return _udp_length(self.buf, at + 24)[0] == seg - 20
        return self.buf[at + 33] == ACK

    def merge(self, a: int, b: int) -> list:
        """One TUN write for rows a..b-1 of the table last planned: vnet header + the first row's
        headers (as they are now, e.g. after a TTL decrement) fixed up for the total length, + every
        row's payload as a view. The TCP checksum field gets the pseudo-header sum (NEEDS_CSUM)."""
        base, seg, hl = self._base, self._seg, self._hl
        mv = self._mv
        at = base + a * seg
        end = base + (b - 1) * seg
        tail = self._short.get(b - 1, seg)
        total = (b - a - 1) * (seg - hl) + tail
        h = bytearray(mv[at:at + hl])
        # The first row's header checksum is valid (plan checked it, inbound patched its TTL), so the
        # total length going from seg to total is an RFC 1624 update: HC' = ~(~HC + ~seg + total).
        x = ((h[10] << 8 | h[11]) ^ 0xFFFF) + (seg ^ 0xFFFF) + total
        x = (x & 0xFFFF) + (x >> 16)
        x = (x & 0xFFFF) + (x >> 16)
        _pack_u16(h, 2, total)
        _pack_u16(h, 10, x ^ 0xFFFF)
        pseudo = (_words(h[12:20]) + self._proto + total - 20) % 0xFFFF
        if self._proto == PROTO_UDP:
            _pack_two_u16(h, 24, total - 20, pseudo)  # UDP length; the pseudo-header sum
            iov = [vnet.udpv4_gso(seg - hl) + h]
        else:
            h[33] = self.buf[end + 33]  # PSH as on the last row
            _pack_u16(h, 36, pseudo)
            iov = [vnet.tcpv4_gso(hl, seg - hl, 20) + h]
        if base % seg == 0:  # payload views of the whole buffer, cached per row shape
            views = self._payloads.get((seg, hl))
            if views is None:
                if len(self._payloads) > 32:
                    self._payloads.clear()
                views = self._payloads[(seg, hl)] = [mv[o + hl:o + seg] for o in range(0, len(mv) - seg + 1, seg)]
            first = base // seg + a
            iov += views[first:first + b - 1 - a]
        else:  # (not per phase too: tables start on any 8-byte boundary, and a list is len(buf)/seg views)
            iov += [mv[o + hl:o + seg] for o in range(at, end, seg)]
        iov.append(mv[end + hl:end + tail])
        return iov


def _short_row_wrong(buf: bytearray, at: int, length: int, hl: int, udp: bool) -> bool:
    """A GRO batch's short last datagram (``length`` bytes at ``at``) whose total length (or UDP
    length) disagrees, or that has no payload: it may not end a run."""
    return ((buf[at + 2] << 8 | buf[at + 3]) != length or length <= hl
            or udp and (buf[at + 24] << 8 | buf[at + 25]) != length - 20)


def _singles(a: int, b: int) -> list[tuple[int, int]]:
    return [(i, i + 1) for i in range(a, b)]


# -- the same, one call per packet list: for tests and for reading, not for the hot path -----------------


def split(packet, hdr: vnet.VnetHdr) -> list[bytes] | Refused:
    """One packet as read from the TUN (without its vnet header) → the IPv4 packets for the wire."""
    n = len(packet)
    buf = packet_buffer()
    if n > MAX_IP_PACKET:
        return Refused.BAD_HEADER
    buf[:n] = packet
    if hdr.gso_type == vnet.GSO_NONE:
        if hdr.flags & vnet.NEEDS_CSUM and not complete_checksum(buf, n, hdr.csum_start, hdr.csum_offset):
            return Refused.BAD_HEADER
        return [bytes(buf[:n])]
    segmenter = Segmenter(BUFFER_SIZE)
    [result] = segmenter.cut(buf, [(0, n, hdr.gso_type, hdr.gso_size)])
    if isinstance(result, Refused):
        return result
    out = segmenter.out
    return [bytes(out[result.start + j * result.size:result.start + j * result.size
                      + (result.size if j < result.count - 1 else result.last)]) for j in range(result.count)]


def coalesce(packets, *, udp: bool = True) -> list[bytes]:
    """IPv4 packets in arrival order → TUN write units (vnet header + packet), merged where GRO may
    (UDP flows too if ``udp``: the TUN takes GSO_UDP_L4 writes).

    Packets are laid out as UDP GRO would hand them over: runs of equal sizes, the last of a run
    maybe shorter, at most 64 KB a batch; consecutive batches of one size share a table.
    """
    out: list[bytes] = []
    buf = packet_buffer()
    coalescer = Coalescer(buf, udp=udp)
    i = 0
    while i < len(packets):
        seg = len(packets[i])
        j, total = i + 1, seg
        while (j < len(packets) and len(packets[j - 1]) == seg and len(packets[j]) <= seg
               and total + len(packets[j]) <= MAX_IP_PACKET):
            total += len(packets[j])
            j += 1
        buf[:total] = b"".join(packets[i:j])
        for a, b in coalescer.plan(seg, [total]):
            if b - a > 1:
                out.append(b"".join(bytes(part) for part in coalescer.merge(a, b)))
            else:
                out.append(vnet.PLAIN + bytes(packets[i + a]))
        i = j
    return out


def warm_up() -> None:
    """Run the compiled loops once on a small TCP flow and a UDP flow, with the argument types of the
    hot path, so a daemon compiles them (or loads them from numba's cache) at start-up, not in the
    middle of its first transfer. A no-op without numba."""
    if not gso_jit.load():
        return
    for proto in (PROTO_TCP, PROTO_UDP):
        head = bytearray(b"\x45\0\0\0\0\x01\x40\0\x40" + bytes([proto]) + b"\0\0\x0a\x05\x01\x02\x0a\x05\x02\x02")
        head[2:4] = (20 + (20 if proto == PROTO_TCP else 8) + 3 * 100).to_bytes(2, "big")
        head[10:12] = (0xFFFF - _words(head) % 0xFFFF).to_bytes(2, "big")
        l4 = b"\x30\x39\x1f\x90" + (b"\0\0\0\x01\0\0\0\x01\x50\x10\xff\xff\0\0\0\0" if proto == PROTO_TCP else b"\x01\x34\0\0")
        hdr = vnet.VnetHdr(vnet.NEEDS_CSUM, vnet.GSO_TCPV4 if proto == PROTO_TCP else vnet.GSO_UDP_L4,
                           len(head) + len(l4), 100, 20, 16 if proto == PROTO_TCP else 6)
        segments = split(bytes(head) + l4 + bytes(300), hdr)
        if isinstance(segments, Refused) or len(coalesce(segments)) != 1:
            raise RuntimeError(f"the compiled GSO loops failed their warm-up ({proto=}): {segments!r}")
