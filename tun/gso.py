"""GSO split and GRO coalesce for IPv4 TCP (and UDP), as plain functions over buffers — sans-IO.

The shape is wireguard-go's ``tun/offload_linux.go``: the device hands us one *super-packet* (a TSO/USO
skb: headers once, up to 64 KB of payload, a virtio_net_hdr saying how to cut it) and we cut it into
ordinary MTU-sized IPv4 packets; on the way back consecutive segments of one TCP flow are glued into one
super-packet the TUN takes in a single write. Nothing on the wire changes: every segment we produce is
a complete IPv4 packet with correct IP and L4 checksums, exactly what the kernel's own GSO would emit.

Why numpy: a plain Python loop costs ~2 µs per segment, which eats the gain. All per-segment work here
is a fixed number of array operations per super-packet (~20, each ~1 µs), whatever the segment count.
Checksums use ``% 0xFFFF`` (2**16 ≡ 1 mod 0xFFFF, so a sum of 16- or 32-bit words folds to the one's
complement sum, and ``-s % 0xFFFF`` is the checksum of a sum ``s``: exactly what the kernel stores).
Payload words are read *little-endian* straight from the buffer: for any bytes ``sum_LE ≡ 256 · sum_BE
(mod 0xFFFF)``, so the other terms are scaled by 256 instead of byte-swapping 64 KB, and a checksum
computed in that domain is stored through a little-endian view, which lands it in network order.
UDP checksums are never 0 (0 means "none"): 0xFFFF stands in, as in the kernel's ``CSUM_MANGLED_0``.

Never raises for bad packets: :meth:`Splitter.split` returns a :class:`~udpflannel.packet.Verdict`.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np

from tun import vnet
from udpflannel.packet import Verdict

FIN, SYN, RST, PSH, ACK, URG, ECE, CWR = 0x01, 0x02, 0x04, 0x08, 0x10, 0x20, 0x40, 0x80
PROTO_TCP, PROTO_UDP = 6, 17
MAX_IP_PACKET = 0xFFFF
# Read buffers must have this much room beyond the largest packet: split() zero-pads the last segment's
# payload to a whole segment so one reshape sums every segment (the zeros don't change a checksum).
SPLIT_SLACK = MAX_IP_PACKET + 8

_ZEROS = memoryview(bytes(MAX_IP_PACKET + 8))
_IDS = (np.arange(2 << 16) & 0xFFFF).astype(np.uint16)  # IP IDs from any start, wrapping
_RAMP = ((0xFFFF - np.arange(0xFFFF + (1 << 16)) % 0xFFFF) % 0xFFFF).astype(np.uint16)  # checksums of s, s+1, ...
_BIG = 0xFFFF << 42  # a multiple of 0xFFFF above every sum here
_STEPS: dict[int, tuple[np.ndarray, np.ndarray]] = {}


def _steps(mss: int) -> tuple[np.ndarray, np.ndarray]:
    """``i * mss`` for every segment index: as uint32 (sequence offsets) and × 256 (checksum terms)."""
    found = _STEPS.get(mss)
    if found is None:
        if len(_STEPS) > 64:
            _STEPS.clear()
        steps = np.arange(MAX_IP_PACKET // mss + 2, dtype=np.uint64) * mss
        found = _STEPS[mss] = (steps.astype(np.uint32), steps * 256)
    return found
_SUM_DTYPE = {0: np.dtype("<u4"), 2: np.dtype("<u2")}  # by (segment size % 4): widest word that tiles it


BUFFER_SIZE = MAX_IP_PACKET + SPLIT_SLACK  # what a Splitter's or Coalescer's buffer must hold


def packet_buffer() -> bytearray:
    return bytearray(BUFFER_SIZE)


def _views(buf: bytearray) -> tuple[memoryview, np.ndarray]:
    if len(buf) < BUFFER_SIZE:
        raise ValueError(f"packet buffers need {BUFFER_SIZE} bytes (see SPLIT_SLACK), got {len(buf)}")
    return memoryview(buf), np.frombuffer(buf, np.uint8)


class Segments(NamedTuple):
    """The result of a split, ready for one UDP_SEGMENT ``sendmsg`` (scatter-gather, nothing copied).

    ``iov`` alternates header and payload buffers: segment ``i`` is ``iov[2i] + iov[2i+1]``. Every
    segment is ``seg_size`` bytes except the last, which is ``last_size`` (≤ ``seg_size``). The
    buffers are views of the splitter's arena and of the packet buffer: valid until the next split.
    """

    count: int
    seg_size: int
    last_size: int
    iov: list


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


class Splitter:
    """Cuts TSO/USO super-packets held in ``pkt`` (packet at offset 0, vnet header read separately).

    Owns a header arena: segment headers are built there as one ``(count, hdr_len)`` array, while
    payloads stay where the read put them. ``pkt`` needs :data:`SPLIT_SLACK` bytes beyond the largest
    packet. Results are views, valid until the next :meth:`split` on this splitter.
    """

    def __init__(self, pkt: bytearray) -> None:
        self.pkt = pkt
        self._pkt_mv, self._pkt_u8 = _views(pkt)
        self._arena = bytearray(0)
        self._grow(64 * 120)
        self._iov_cache: dict[tuple[int, int], list] = {}

    def _grow(self, size: int) -> None:
        self._arena = bytearray(size)
        self._arena_mv = memoryview(self._arena)
        self._arena_u8 = np.frombuffer(self._arena, np.uint8)
        self._iov_cache = {}

    def _iov(self, hl: int, mss: int, count: int) -> list:
        """Alternating header-row / payload views for ``count`` full segments, cached per shape."""
        key = (hl, mss)
        cached = self._iov_cache.get(key)
        if cached is None or len(cached) < 2 * count:
            if len(self._iov_cache) > 32:
                self._iov_cache.clear()
            rows = max(count, (MAX_IP_PACKET - hl) // mss + 1)
            arena, pkt = self._arena_mv, self._pkt_mv
            cached = []
            for i in range(rows):
                cached.append(arena[i * hl:(i + 1) * hl])
                cached.append(pkt[hl + i * mss:hl + (i + 1) * mss])
            self._iov_cache[key] = cached
        return cached

    def split(self, n: int, gso_type: int, gso_size: int) -> Segments | Verdict:
        """Cut the ``n``-byte IPv4 super-packet in ``pkt`` into ``gso_size``-payload segments.

        Per segment, as the kernel's ``tcp_gso_segment``/``__udp_gso_segment`` do: IP total length,
        ID + i, header checksum; TCP seq + i·gso_size, FIN/PSH only on the last and CWR only on the
        first segment, full checksum; UDP length and full checksum. ``hdr_len`` from the vnet header is
        not used: the header length comes from the IHL and TCP data offset fields.
        """
        p = self.pkt
        if n < 20:
            return Verdict.TOO_SHORT
        if p[0] >> 4 != 4:
            return Verdict.NOT_IPV4
        kind = gso_type & ~vnet.GSO_ECN
        if kind == vnet.GSO_TCPV4:
            proto = PROTO_TCP
        elif kind == vnet.GSO_UDP_L4:
            proto = PROTO_UDP
        else:
            return Verdict.NOT_IPV4 if kind == vnet.GSO_TCPV6 else Verdict.BAD_HEADER
        ihl = (p[0] & 0x0F) << 2
        if ihl < 20 or (p[2] << 8 | p[3]) != n or p[9] != proto or (p[6] & 0x3F) | p[7] or gso_size <= 0:
            return Verdict.BAD_HEADER
        if proto == PROTO_TCP:
            if n < ihl + 20 or (p[ihl + 12] >> 4) < 5:
                return Verdict.BAD_HEADER
            l4 = (p[ihl + 12] >> 4) << 2
        else:
            l4 = 8
        hl = ihl + l4
        if hl > n:
            return Verdict.BAD_HEADER
        mss = gso_size
        paylen = n - hl
        count = max(1, -(-paylen // mss))
        last = paylen - (count - 1) * mss
        if count * hl > len(self._arena):
            self._grow(count * hl)

        # The template header: fields that differ per segment zeroed, so their sums add in separately.
        t = bytearray(p[:hl])
        id0 = t[4] << 8 | t[5]
        t[2:6] = b"\0\0\0\0"
        t[10:12] = b"\0\0"
        ip_base = _words(t[:ihl]) % 0xFFFF
        pseudo = _words(t[12:20]) + proto
        if proto == PROTO_TCP:
            seq0 = int.from_bytes(t[ihl + 4:ihl + 8], "big")
            flags = t[ihl + 13]
            mid = flags & ~(FIN | PSH | CWR)
            t[ihl + 4:ihl + 8] = b"\0\0\0\0"
            t[ihl + 16:ihl + 18] = b"\0\0"
            t[ihl + 13] = mid
            l4_base = (_words(t[ihl:hl]) + pseudo + l4 + mss) % 0xFFFF
        else:
            t[ihl + 4:ihl + 8] = b"\0\0\0\0"
            l4_base = (_words(t[ihl:hl]) + pseudo + 2 * (8 + mss)) % 0xFFFF

        rows = self._arena_u8[:count * hl].reshape(count, hl)
        rows[:] = np.frombuffer(t, np.uint8)
        w16 = rows.view(">u2")
        w16[:, 1] = hl + mss
        w16[:, 2] = _IDS[id0:id0 + count]  # wraps at 2**16 like the kernel's
        ip_sum = (ip_base + hl + mss + id0) % 0xFFFF
        if id0 + count <= 0x10000:  # consecutive sums: the checksums are a slice of a ramp
            w16[:, 5] = _RAMP[ip_sum:ip_sum + count]
        else:
            w16[:, 5] = (_BIG - _IDS[id0:id0 + count].astype(np.uint64) - (ip_sum - id0 + 0xFFFF)) % 0xFFFF
        if last != mss:
            w16[count - 1, 1] = hl + last
            w16[count - 1, 5] = -(int(w16[count - 1, 2]) + ip_sum - id0 - (mss - last)) % 0xFFFF

        # Every segment's payload sum in one reshape (little-endian words: see the module docstring);
        # the last segment's payload is zero-padded to a whole one first.
        end = hl + count * mss
        if end > n:
            p[n:end] = _ZEROS[:end - n]
        dtype = _SUM_DTYPE.get(mss & 3)
        if dtype is not None:
            payload = self._pkt_u8[hl:end].view(dtype).reshape(count, -1).sum(axis=1)
        else:  # odd segment size: words straddle segments, so sum each one on its own (rare, slow)
            payload = np.array([(_words(p[hl + i * mss:hl + (i + 1) * mss]) << 16) % 0xFFFF
                                for i in range(count)], dtype=np.uint64)
        le16 = rows.view("<u2")  # a checksum c stored through this view lands as swap16(c): see above

        if proto == PROTO_TCP:
            steps32, steps_le = _steps(mss)
            rows.view(">u4")[:, (ihl + 4) >> 2] = steps32[:count] + seq0  # wraps at 2**32
            # (BIG - s) % 0xFFFF is the checksum of s, computed without a sign and without a fold
            x = (_BIG - 256 * (seq0 + l4_base) % 0xFFFF) - payload
            x -= steps_le[:count]
            wrapped = -(-(0x100000000 - seq0) // mss)  # first segment whose sequence number wrapped
            if wrapped < count:
                x[wrapped:] += 256
            last_flags = flags if count == 1 else flags & ~CWR
            x[-1] = int(x[-1]) - 256 * (last_flags - mid - (mss - last))
            if count > 1:
                rows[0, ihl + 13] = flags & ~(FIN | PSH)
                x[0] -= 256 * (flags & CWR)
            rows[count - 1, ihl + 13] = last_flags
            le16[:, (ihl + 16) >> 1] = x % 0xFFFF
        else:
            w16[:, (ihl + 4) >> 1] = 8 + mss
            s = payload + 256 * l4_base % 0xFFFF
            if last != mss:
                w16[count - 1, (ihl + 4) >> 1] = 8 + last
                s[-1] = int(s[-1]) + 512 * 0xFFFF - 512 * (mss - last)
            le16[:, (ihl + 6) >> 1] = 0xFFFF - s % 0xFFFF  # never 0: UDP's "no checksum"

        iov = self._iov(hl, mss, count)[:2 * count - 1]
        iov.append(self._pkt_mv[hl + (count - 1) * mss:n])
        return Segments(count, hl + mss, hl + last, iov)


# Bytes of an IPv4 (IHL 5) + TCP header that may differ between consecutive segments of one flow:
# ID and header checksum; sequence number and checksum; PSH. Everything else — version, TOS, total
# length, DF, TTL, protocol, addresses, ports, ACK number, data offset, the other flags, window, options
# — must match to merge (the kernel's tcp_gro_receive rules; the last segment's length is handled apart).
_VARYING = (4, 5, 10, 11, 24, 25, 26, 27, 36, 37)


def _merge_mask(hl: int) -> np.ndarray:
    mask = np.full(hl, 0xFF, np.uint8)
    mask[list(_VARYING)] = 0
    mask[33] = 0xFF & ~PSH
    return mask


class Coalescer:
    """GRO for one receive batch in ``buf``: datagrams of ``seg`` bytes back to back, the last maybe
    shorter (what one UDP_GRO ``recvmsg_into`` returns). Two steps, so the caller can apply its own
    per-packet checks to the first packet of each run between them:

    1. :meth:`plan` → runs ``(a, b)`` covering every row in order; ``b - a >= 2`` means rows a..b-1
       are consecutive segments of one TCP flow with valid IP and TCP checksums, safe to merge;
    2. :meth:`merge` → the iovec of one TUN write carrying rows a..b-1 as one GSO_TCPV4 super-packet.
    """

    def __init__(self, buf: bytearray) -> None:
        self.buf = buf
        self._mv, self._u8 = _views(buf)
        self._masks: dict[int, np.ndarray] = {}
        self._payloads: dict[tuple[int, int], list] = {}
        self._shape = (0, 0, 0, 0)  # seg, rows, last, hl of the batch last planned

    def plan(self, nbytes: int, seg: int) -> list[tuple[int, int]]:
        """Split the batch into mergeable runs and singles, in order. Reads only (it restores the two
        bytes it borrows and zero-pads after ``nbytes``)."""
        rows = -(-nbytes // seg) if seg > 0 else 0
        buf = self.buf
        if rows < 2 or seg & 1 or seg < 40 or buf[0] != 0x45 or buf[9] != PROTO_TCP:
            return [(i, i + 1) for i in range(rows)]
        hl = 20 + ((buf[32] >> 4) << 2)
        last = nbytes - (rows - 1) * seg
        if hl < 40 or hl >= seg:
            return [(i, i + 1) for i in range(rows)]
        self._shape = (seg, rows, last, hl)
        padded = rows * seg
        if padded > nbytes:
            buf[nbytes:padded] = _ZEROS[:padded - nbytes]
        table = self._u8[:padded].reshape(rows, seg)

        # The header comparison covers the total length too, so the last row lends its two length
        # bytes (checked here, restored below): that saves three array operations.
        at = padded - seg
        saved_len = buf[at + 2:at + 4]
        last_ok = (saved_len[0] << 8 | saved_len[1]) == last and last > hl
        buf[at + 2] = seg >> 8
        buf[at + 3] = seg & 0xFF
        mask = self._masks.get(hl)
        if mask is None:
            mask = self._masks[hl] = _merge_mask(hl)
        headers = table[:, :hl] & mask
        link = (headers[1:] == headers[:-1]).all(axis=1)
        buf[at + 2:at + 4] = saved_len
        link &= (table[:-1, 33] & PSH) == 0  # PSH ends a run

        words = self._u8[:padded].view(_SUM_DTYPE[seg & 3]).reshape(rows, -1)
        per_word = words.itemsize // 2  # 16-bit words per column
        ip_bad = words[:, :10 // per_word].sum(axis=1) % 0xFFFF
        # TCP: pseudo-header (the addresses are bytes 12..19) + segment, in the LE domain (× 256)
        l4 = words[:, 12 // words.itemsize:].sum(axis=1) + 256 * (PROTO_TCP + seg - 20)
        l4[-1] = int(l4[-1]) + 0xFFFF * 256 - 256 * (seg - last)
        valid = (ip_bad | (l4 % 0xFFFF)) == 0
        if not last_ok:
            valid[-1] = False
        seqs = np.ndarray((rows,), ">u4", buf, 24, (seg,))
        link &= (seqs[1:] - seqs[:-1]) == seg - hl  # uint32: wraps like sequence numbers
        link &= valid[:-1]
        link &= valid[1:]
        if link.all():
            runs = [(0, rows)]
        else:
            runs = []
            start = 0
            for i in np.flatnonzero(~link).tolist():
                runs.append((start, i + 1))
                start = i + 1
            runs.append((start, rows))
        if nbytes > MAX_IP_PACKET:  # never from UDP GRO (≤ 64 KB), but a merged packet must fit
            runs = [r for a, b in runs for r in _cap(a, b, MAX_IP_PACKET // seg)]
        return [r for a, b in runs for r in (self._check_head(a, b) or [(i, i + 1) for i in range(a, b)])]

    def _check_head(self, a: int, b: int) -> list[tuple[int, int]] | None:
        """Rows in a run match the first one but for ID, sequence number and checksums; so only the
        first needs looking at: IHL 5, total length = row size, not a fragment, flags exactly ACK."""
        if b - a < 2:
            return None
        seg = self._shape[0]
        at = a * seg
        buf = self.buf
        if (buf[at] != 0x45 or buf[at + 9] != PROTO_TCP or (buf[at + 2] << 8 | buf[at + 3]) != seg
                or (buf[at + 6] & 0x3F) | buf[at + 7] or buf[at + 33] != ACK):
            return None
        return [(a, b)]

    def merge(self, a: int, b: int) -> list:
        """One TUN write for rows a..b-1 of the batch last planned: vnet header + the first row's
        headers (as they are now, e.g. after a TTL decrement) fixed up for the total length, + every
        row's payload as a view. The TCP checksum field gets the pseudo-header sum (NEEDS_CSUM)."""
        seg, rows, last, hl = self._shape
        mv = self._mv
        at = a * seg
        tail = last if b == rows else seg
        total = hl + (b - a - 1) * (seg - hl) + tail - hl
        h = bytearray(mv[at:at + hl])
        h[2] = total >> 8
        h[3] = total & 0xFF
        h[10] = h[11] = 0
        check = -_words(h[:20]) % 0xFFFF
        h[10] = check >> 8
        h[11] = check & 0xFF
        h[33] = self.buf[(b - 1) * seg + 33]
        partial = (_words(h[12:20]) + PROTO_TCP + total - 20) % 0xFFFF
        h[36] = partial >> 8
        h[37] = partial & 0xFF
        key = (seg, hl)
        views = self._payloads.get(key)
        if views is None:
            if len(self._payloads) > 32:
                self._payloads.clear()
            views = self._payloads[key] = [mv[i * seg + hl:(i + 1) * seg] for i in range(MAX_IP_PACKET // seg + 1)]
        iov = [vnet.tcpv4_gso(hl, seg - hl, 20) + h]
        iov += views[a:b - 1]
        end = (b - 1) * seg
        iov.append(views[b - 1] if tail == seg else mv[end + hl:end + tail])
        return iov


def _cap(a: int, b: int, most: int) -> list[tuple[int, int]]:
    return [(i, min(i + most, b)) for i in range(a, b, most)]


# -- the same, one call per packet list: for tests and for reading, not for the hot path -----------------


def split(packet, hdr: vnet.VnetHdr) -> list[bytes] | Verdict:
    """One packet as read from the TUN (without its vnet header) → the IPv4 packets for the wire."""
    n = len(packet)
    buf = packet_buffer()
    if n > MAX_IP_PACKET:
        return Verdict.BAD_HEADER
    buf[:n] = packet
    if hdr.gso_type == vnet.GSO_NONE:
        if hdr.flags & vnet.NEEDS_CSUM and not complete_checksum(buf, n, hdr.csum_start, hdr.csum_offset):
            return Verdict.BAD_HEADER
        return [bytes(buf[:n])]
    result = Splitter(buf).split(n, hdr.gso_type, hdr.gso_size)
    if isinstance(result, Verdict):
        return result
    iov = result.iov
    return [bytes(iov[2 * i]) + bytes(iov[2 * i + 1]) for i in range(result.count)]


def coalesce(packets) -> list[bytes]:
    """IPv4 packets in arrival order → TUN write units (vnet header + packet), merged where GRO may.

    Packets are batched as UDP GRO would hand them over: equal sizes, the last of a batch maybe
    shorter, at most 64 KB a batch.
    """
    out: list[bytes] = []
    buf = packet_buffer()
    coalescer = Coalescer(buf)
    i = 0
    while i < len(packets):
        seg = len(packets[i])
        j, total = i + 1, seg
        while (j < len(packets) and len(packets[j - 1]) == seg and len(packets[j]) <= seg
               and total + len(packets[j]) <= MAX_IP_PACKET):
            total += len(packets[j])
            j += 1
        buf[:total] = b"".join(packets[i:j])
        for a, b in coalescer.plan(total, seg):
            if b - a > 1:
                out.append(b"".join(bytes(part) for part in coalescer.merge(a, b)))
            else:
                out.append(vnet.PLAIN + bytes(packets[i + a]))
        i = j
    return out
