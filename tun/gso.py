"""GSO split and GRO coalesce for IPv4 TCP (and UDP): what the fast path imports, by concern.

- :mod:`tun.layout`: the header offsets and numbers;
- :mod:`tun.segment`: TSO/USO super-packets from the TUN cut into ordinary IPv4 packets (:class:`Segmenter`);
- :mod:`tun.coalesce`: received datagrams merged into super-packets for the TUN (:class:`Coalescer`, :class:`Plan`);
- :mod:`tun.kernels`: the per-segment work, C (:mod:`tun.gso_c`) or numpy (:mod:`tun.gso_numpy`).

:func:`warm_up` runs the compiled kernels once at start-up.
"""

from __future__ import annotations

from tun import kernels, vnet
from tun.coalesce import Coalescer, Plan
from tun.layout import PROTO_TCP, PROTO_UDP
from tun.segment import (
    BUFFER_SIZE,
    SMALLEST_CUT,
    SPLIT_SLACK,
    Cut,
    Refused,
    Segmenter,
    fit_segment_size,
    packet_buffer,
)

__all__ = ["BUFFER_SIZE", "SMALLEST_CUT", "SPLIT_SLACK", "Coalescer", "Cut", "Plan", "Refused", "Segmenter",
           "fit_segment_size", "packet_buffer", "warm_up"]


def warm_up() -> str:
    """Run the compiled kernels once on a small TCP flow and a UDP flow, with the argument types of the
    hot path: a broken build fails at start-up, not in the middle of the first transfer. Returns which
    kernels run, for the start-up log ("compiled (C)", or "numpy (why not compiled)")."""
    chosen = kernels.choose()
    if not chosen.compiled:
        return chosen.description
    for proto, gso_type in ((PROTO_TCP, vnet.GSO_TCPV4), (PROTO_UDP, vnet.GSO_UDP_L4)):
        packet = _sample(proto)
        buf = packet_buffer()
        buf[:len(packet)] = packet
        segmenter = Segmenter(BUFFER_SIZE, jit=True)
        [cut] = segmenter.cut(buf, [(0, len(packet), gso_type, 100)])
        rx = packet_buffer()
        if not isinstance(cut, Refused):
            nbytes = (cut.count - 1) * cut.size + cut.last
            rx[:nbytes] = segmenter.out[cut.start:cut.start + nbytes]
            plan = Coalescer(rx, udp=True, jit=True).plan(cut.size, [nbytes])
            if plan.runs == [(0, cut.count)]:
                plan.merge(0, cut.count)
                continue
        raise RuntimeError(f"the compiled GSO loops failed their warm-up ({proto=}): {cut!r}")
    return chosen.description


def _sample(proto: int) -> bytes:
    """A super-packet of 3 × 100 payload bytes, from 10.5.1.2 to 10.5.2.2, its IP checksum valid."""
    head = bytearray(b"\x45\0\0\0\0\x01\x40\0\x40" + bytes([proto]) + b"\0\0\x0a\x05\x01\x02\x0a\x05\x02\x02")
    head[2:4] = (20 + (20 if proto == PROTO_TCP else 8) + 3 * 100).to_bytes(2, "big")
    head[10:12] = (0xFFFF - int.from_bytes(head, "big") % 0xFFFF).to_bytes(2, "big")
    l4 = b"\x30\x39\x1f\x90" + (b"\0\0\0\x01\0\0\0\x01\x50\x10\xff\xff\0\0\0\0" if proto == PROTO_TCP else b"\x01\x34\0\0")
    return bytes(head) + l4 + bytes(300)
