"""One call per packet list, over tun's GSO split and GRO coalesce: for tests and for reading, not the
hot path (the engine batches many packets per call)."""

from __future__ import annotations

from tun import vnet
from tun.coalesce import Coalescer
from tun.layout import MAX_IP_PACKET
from tun.segment import BUFFER_SIZE, Refused, Segmenter, packet_buffer


def split(packet, hdr: vnet.VnetHdr) -> list[bytes] | Refused:
    """One packet as read from the TUN (without its vnet header) → the IPv4 packets for the wire."""
    n = len(packet)
    buf = packet_buffer()
    if n > MAX_IP_PACKET:
        return Refused.BAD_HEADER
    buf[:n] = packet
    if hdr.gso_type == vnet.GSO_NONE:
        if hdr.flags & vnet.NEEDS_CSUM and not vnet.complete_checksum(buf, n, hdr.csum_start, hdr.csum_offset):
            return Refused.BAD_HEADER
        return [bytes(buf[:n])]
    segmenter = Segmenter(BUFFER_SIZE)
    [result] = segmenter.cut(buf, [(0, n, hdr.gso_type, hdr.gso_size)])
    if isinstance(result, Refused):
        return result
    out = segmenter.out
    return [bytes(out[result.start + j * result.size:result.start + j * result.size
                      + (result.size if j < result.count - 1 else result.last)]) for j in range(result.count)]


def by_flow(packets) -> dict[bytes, list[bytes]]:
    """Packets per flow (protocol, addresses, ports: the bytes the coalescer groups by, read at IHL 5
    offsets whatever the packet), each flow's in order: what the coalescer must keep. The order
    across flows may change, as Linux GRO's does."""
    out: dict[bytes, list[bytes]] = {}
    for p in packets:
        out.setdefault(bytes(p[9:10]) + bytes(p[12:24]), []).append(bytes(p))
    return out


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
        plan = coalescer.plan(seg, [total])
        for a, b in plan.runs:
            if b - a > 1:
                out.append(b"".join(bytes(part) for part in plan.merge(a, b)))
            else:
                out.append(vnet.PLAIN + bytes(plan.row(a)))  # logical row a: the plan groups rows by flow
        i = j
    return out
