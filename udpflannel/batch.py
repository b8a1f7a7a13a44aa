"""Forwarding decisions for the fast path's batches — sans-IO, built on the per-packet ones.

The rule that keeps the fast path honest: every packet gets exactly the verdict, the TTL decrement and
the ICMP error ``udpflannel.forward`` would give it alone. Batching only changes how many packets one
syscall moves, never what happens to a packet.

- Outbound (in ``udpflannel.fastpath_out``, it is one call): a TSO/USO super-packet shares one IP
  header among its segments, so ``forward.outbound`` on that header decides for all of them (and
  decrements the TTL that every segment then copies). When it says no, the ICMP error quotes the
  first *segment*, as it would have had the kernel segmented (:func:`first_segment`).
- Inbound, received datagrams are grouped by flow and cut into runs by :class:`tun.gso.Coalescer`
  (each flow's rows in the order they came): rows of a run match the
  first row in every header byte ``forward.inbound`` looks at, and each row's own length and
  checksums (IP and TCP/UDP) were checked, so the first row's verdict is every row's, and its
  transport checksum is not summed again. Anything else — singles, and runs
  whose first row is refused — goes through ``forward.inbound`` one row at a time.
- :class:`SendBatch`: what the way out queues for one peer until one sendmsg (UDP_SEGMENT) takes it.
"""

from __future__ import annotations

from bisect import bisect_right
from collections.abc import Iterator
from itertools import accumulate
from typing import TYPE_CHECKING

from tun import vnet
from tun.coalesce import Coalescer
from tun.segment import Refused, Segmenter
from udpflannel.forward import inbound
from udpflannel.packet import FORWARD, Verdict
from udpflannel.routes import NextHop, RouteTable
from udpflannel.sockets import UDP_MAX_PAYLOAD

if TYPE_CHECKING:
    from udpflannel.counters import Counters


def inbound_batches(coalescer: Coalescer, base: int, seg: int, sizes: list[int], peers: list[NextHop],
                    routes: RouteTable, *, tun_mtu: int, check_source: bool,
                    counters: Counters | None = None) -> Iterator[tuple[Verdict, NextHop, int, list | memoryview]]:
    """Verdicts for consecutive GRO batches laid out as one table in ``coalescer.buf`` from ``base``
    (datagrams of ``seg`` bytes; ``sizes[j]`` bytes from ``peers[j]``), flow by flow (each flow's
    rows in the order they came; across flows the order may change, as with Linux GRO):
    ``(FORWARD, peer, count, iov)`` — one TUN write carrying ``count`` datagrams — or ``(verdict,
    peer, 1, row)`` for a refused datagram (for the caller to count and answer). Runs never mix
    peers. ``counters``: the engine's, for the coalescer's flow figures (``gro_*``)."""
    index: dict[NextHop, int] = {}
    senders = [index.setdefault(peer, len(index)) for peer in peers]
    bounds = list(accumulate(-(-n // seg) for n in sizes))  # rows before the end of each batch
    plain = vnet.PLAIN
    plan = coalescer.plan(seg, sizes, base=base, senders=senders if len(index) > 1 else None)
    if counters is not None:
        counters.gro_tables += 1
        counters.gro_flows += plan.flows
        counters.gro_breaks += plan.breaks
        counters.gro_refused += plan.refused
    one_peer = peers[0] if len(index) == 1 else None
    for a, b in plan.runs:
        peer = one_peer or peers[bisect_right(bounds, plan.physical(a))]
        if b - a > 1:
            head = plan.row(a)
            if inbound(head, seg, peer, routes, tun_mtu=tun_mtu, check_source=check_source,
                       transport_checked=True) == FORWARD:  # plan() checked every row's TCP/UDP checksum
                yield FORWARD, peer, b - a, plan.merge(a, b)
                continue
        for i in range(a, b):
            row = plan.row(i)
            verdict = inbound(row, len(row), peer, routes, tun_mtu=tun_mtu, check_source=check_source)
            yield verdict, peer, 1, ([plain, row] if verdict == FORWARD else row)


def first_segment(segmenter: Segmenter, buf: bytearray, p: int, n: int, gso_type: int, gso_size: int) -> bytes:
    """What an ICMP error about a refused super-packet (``n`` bytes at ``p`` in ``buf``) quotes: its
    first segment, or itself if it cannot be cut. Uses ``segmenter``'s output."""
    [cut] = segmenter.cut(buf, [(p, n, gso_type, gso_size)])
    if isinstance(cut, Refused):
        return bytes(buf[p:p + n])
    return bytes(segmenter.out_mv[cut.start:cut.start + (cut.size if cut.count > 1 else cut.last)])


class SendBatch:
    """Datagrams queued for one peer by the fast path's way out (``udpflannel/fastpath_out.py``): every
    one ``size`` bytes but a shorter last, which closes it. ``iov`` holds runs of whole datagrams
    (views of the segmenter's output, or copies)."""

    __slots__ = ("iov", "count", "size", "nbytes", "closed", "most")

    def __init__(self, size: int, max_segments: int) -> None:
        self.iov: list = []
        self.count = 0
        self.size = size
        self.nbytes = 0
        self.closed = False
        self.most = max(1, min(max_segments, UDP_MAX_PAYLOAD // size))  # datagrams one sendmsg may carry
