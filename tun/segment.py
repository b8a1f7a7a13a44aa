"""GSO split: TSO/USO super-packets read from the TUN, cut into ordinary IPv4 packets — sans-IO.

The shape is wireguard-go's ``tun/offload_linux.go``: the device hands us one *super-packet* (a TSO/USO
skb: headers once, up to 64 KB of payload, a virtio_net_hdr saying how to cut it) and we cut it into
MTU-sized IPv4 packets. Nothing on the wire changes: every segment is a complete IPv4 packet with
correct IP and L4 checksums, exactly what the kernel's own GSO would emit. Headers are parsed here,
in Python, once per super-packet; the per-segment work runs in a kernel (:mod:`tun.kernels`).

Never raises for bad packets: :meth:`Segmenter.cut` returns a :class:`Refused` reason for them.
"""

from __future__ import annotations

import struct
from enum import IntEnum
from typing import NamedTuple

import numpy as np

from tun import kernels, vnet
from tun.layout import (
    CWR,
    FIN,
    IP_CHECKSUM,
    IP_TOTAL_LENGTH,
    IPV4_MIN_HEADER,
    MAX_IP_PACKET,
    PROTO_TCP,
    PROTO_UDP,
    PSH,
    TCP_CHECKSUM,
    TCP_DATA_OFFSET,
    TCP_FLAGS,
    TCP_MIN_HEADER,
    TCP_SEQ,
    UDP_HEADER,
    UDP_LENGTH,
)
from tun.superpacket import Packet

# Read buffers must have this much room beyond the largest packet: a cut zero-pads the last segment's
# payload to a whole segment so one reshape sums every segment (the zeros don't change a checksum).
SPLIT_SLACK = MAX_IP_PACKET + 8
BUFFER_SIZE = (MAX_IP_PACKET + SPLIT_SLACK + 7) & ~7  # a packet buffer for a cut or a Coalescer (whole words)


def packet_buffer() -> bytearray:
    return bytearray(BUFFER_SIZE)


class Refused(IntEnum):
    """Why a super-packet cannot be cut. ``udpflannel`` counts it as the packet verdict of the same name."""

    TOO_SHORT = 1  # fewer than 20 bytes
    NOT_IPV4 = 2  # not version 4, or an IPv6 GSO type
    BAD_HEADER = 3  # lengths, protocol or GSO type that do not fit together, a fragment


class Cut(NamedTuple):
    """One super-packet cut into datagrams, ready for one UDP_SEGMENT ``sendmsg`` each batch: datagram
    ``j`` is ``size`` bytes at ``start + j * size`` in :attr:`Segmenter.out`, except the last, which is
    ``last`` bytes long. Valid until the next :meth:`Segmenter.cut`."""

    start: int
    count: int
    size: int
    last: int


class Segmenter:
    """Cuts many TSO/USO super-packets at once into ready datagrams, laid out back to back in
    :attr:`out` so each batch to a peer is one buffer (no scatter-gather list to build).

    Like packets (same protocol, header lengths and segment size, in a row) are cut by one kernel
    call, whatever the packet and segment counts. ``jit``: the compiled kernels (True), the numpy
    ones (False), or the default of :func:`tun.kernels.choose` (None).
    """

    def __init__(self, capacity: int = 20 * BUFFER_SIZE, *, jit: bool | None = None) -> None:
        self.kernels = kernels.choose(jit)
        self._cut_many = self.kernels.cut_many
        self._grow(capacity)
        self._in: bytearray | None = None
        self._in_u8 = self._in_u32 = self._out_u8

    @property
    def jit(self) -> bool:
        return self.kernels.compiled

    def cut(self, buf: bytearray, items) -> list[Cut | Refused]:
        """Cut the packets ``(offset, length, gso_type, gso_size)`` of ``buf``, in order. Each needs
        room for ``gso_size`` more bytes after it in ``buf`` (its last segment is zero-padded there).
        """
        if self._cut_many is not None:  # all of the below in one compiled call
            results = self._cut_many(buf, items, self.out, Cut, _REFUSED)
            if results is None:  # out is too small (it wrote nothing): grow, and cut again
                self._grow(_room_for(items))
                results = self._cut_many(buf, items, self.out, Cut, _REFUSED)
            return results
        results: list = []
        group: list[Packet] = []
        at = 0
        need = _room_for(items)
        if need > len(self.out):  # grow now, never halfway (earlier cuts point into out)
            self._grow(need)
        for off, n, gso_type, gso_size in items:
            packet = parse(buf, off, n, gso_type, gso_size)
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

    def _flush(self, buf: bytearray, group: list[Packet], results: list, at: int) -> int:
        """Cut ``group`` into ``out`` from ``at``; append its Cuts; return the next free offset."""
        if not group:
            return at
        if buf is not self._in:  # the fast path cuts from one buffer: its arrays are kept
            self._in, self._in_u8 = buf, np.frombuffer(buf, np.uint8)
            self._in_u32 = np.frombuffer(buf, np.uint32, len(buf) >> 2)
        self._cutter(buf, self._in_u8, self._in_u32, self.out, self._out_u8, at, group)
        first = group[0]
        size = first.hl + first.mss
        row = 0
        for p in group:
            results.append(_new(Cut, (at + row * size, p.count, size, first.hl + p.last)))
            row += p.count
        return at + row * size + 8 & ~7

    def _grow(self, size: int) -> None:
        self.out = bytearray(size)
        self.out_mv = memoryview(self.out)
        self._out_u8 = np.frombuffer(self.out, np.uint8)
        self._cutter = self.kernels.new_cutter()  # the numpy one keeps views of the old buffer


_new = tuple.__new__  # builds a Packet or a Cut without NamedTuple's Python-level __new__
_REFUSED = (None, *Refused)  # by value, for the compiled whole cut


def _room_for(items) -> int:
    """Bytes of output that surely hold the cut of ``items`` (≥ rows × row size, with the groups' gaps)."""
    return sum(n + (n // size + 2) * 128 + size for _, n, _, size in items if size > 0)


# One unpack per header instead of a byte at a time (the parse runs once per super-packet, on the hot path)
_ip_fields = struct.Struct("!BxHHHxB").unpack_from  # version/IHL, total length, ID, flags/fragment, protocol
_tcp_fields = struct.Struct("!4xI4xBB").unpack_from  # sequence number, data offset, flags
_pack_two_u16 = struct.Struct("!HH").pack_into
_PROTO_OF_GSO = {vnet.GSO_TCPV4: PROTO_TCP, vnet.GSO_UDP_L4: PROTO_UDP}
_NOT_ECN = ~vnet.GSO_ECN
_TOO_SHORT, _NOT_IPV4, _BAD_HEADER = Refused


def parse(buf, off: int, n: int, gso_type: int, gso_size: int) -> Packet | Refused:
    """Validate one super-packet's headers and derive its segments' template. ``hdr_len`` from the
    vnet header is never used: header lengths come from the IHL and the TCP data offset."""
    if n < IPV4_MIN_HEADER:
        return _TOO_SHORT
    p0, total, ident, fragment, proto = _ip_fields(buf, off)
    if p0 >> 4 != 4:
        return _NOT_IPV4
    want = _PROTO_OF_GSO.get(gso_type & _NOT_ECN)
    if want is None:
        return _NOT_IPV4 if gso_type & _NOT_ECN == vnet.GSO_TCPV6 else _BAD_HEADER
    ihl = (p0 & 0x0F) << 2
    if ihl < IPV4_MIN_HEADER or total != n or proto != want or fragment & 0x3FFF or gso_size <= 0:  # MF or an offset
        return _BAD_HEADER
    if proto == PROTO_TCP:
        if n < ihl + TCP_MIN_HEADER:
            return _BAD_HEADER
        seq, offset, flags = _tcp_fields(buf, off + ihl)
        if offset < 0x50:
            return _BAD_HEADER
        hl = ihl + (offset >> 4 << 2)
    else:
        seq = flags = 0
        hl = ihl + UDP_HEADER
    if hl > n:
        return _BAD_HEADER
    count = -(-(n - hl) // gso_size) or 1
    last = n - hl - (count - 1) * gso_size
    t = bytearray(buf[off:off + hl])
    _pack_two_u16(t, IP_TOTAL_LENGTH, hl + gso_size, 0)  # total length of a full segment; ID 0
    t[IP_CHECKSUM] = t[IP_CHECKSUM + 1] = 0
    if proto == PROTO_TCP:
        t[ihl + TCP_SEQ:ihl + TCP_SEQ + 4] = b"\0\0\0\0"
        t[ihl + TCP_FLAGS] = flags & ~(FIN | PSH | CWR)
        t[ihl + TCP_CHECKSUM] = t[ihl + TCP_CHECKSUM + 1] = 0
    else:
        _pack_two_u16(t, ihl + UDP_LENGTH, UDP_HEADER + gso_size, 0)  # UDP length of a full segment; checksum 0
    return _new(Packet, (off, proto, ihl, hl, gso_size, count, last, bytes(t), ident, seq, flags))


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
    if p0 >> 4 != 4 or ihl < IPV4_MIN_HEADER or proto != PROTO_TCP or fragment & 0x3FFF or n < ihl + TCP_MIN_HEADER:
        return gso_size
    hl = ihl + (buf[off + ihl + TCP_DATA_OFFSET] >> 4 << 2)
    room = (largest & ~3) - hl
    if hl + min(gso_size, n - hl) <= largest or room < SMALLEST_CUT:  # the largest segment fits
        return gso_size
    return room
