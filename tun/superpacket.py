"""One parsed super-packet (:func:`tun.segment.parse`): all a kernel (``tun.gso_numpy``, ``tun.gso_c``)
needs to cut it. A module of its own so the kernels and the segmenter share it without importing each other."""

from __future__ import annotations

from typing import NamedTuple


class Packet(NamedTuple):
    """What the parse learns about one super-packet: all a kernel needs to cut it."""

    at: int  # offset of the packet in the input buffer
    proto: int
    ihl: int
    hl: int  # IP + transport header bytes
    mss: int
    count: int
    last: int  # payload bytes of the last segment
    template: bytes  # headers for a middle segment: total length set, ID/seq/checksums 0, FIN/PSH/CWR off
    ident: int
    seq: int
    flags: int  # TCP flags as read (0 for UDP)
