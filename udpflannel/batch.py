"""Forwarding decisions for the fast path's batches — sans-IO, built on the per-packet ones.

The rule that keeps the fast path honest: every packet gets exactly the verdict, the TTL decrement and
the ICMP error ``udpflannel.forward`` would give it alone. Batching only changes how many packets one
syscall moves, never what happens to a packet.

- Outbound, a TSO/USO super-packet shares one IP header among its segments, so ``forward.outbound`` on
  that header decides for all of them (and decrements the TTL that every segment then copies). When it
  says no, the ICMP error quotes the first *segment*, as it would have had the kernel segmented.
- Inbound, a UDP GRO batch is cut into runs by :class:`tun.gso.Coalescer`: rows of a run match the
  first row in every header byte ``forward.inbound`` looks at, and each row's own length and
  checksums were checked, so the first row's verdict is every row's. Anything else — singles, and runs
  whose first row is refused — goes through ``forward.inbound`` one row at a time.
"""

from __future__ import annotations

from collections.abc import Iterator

from tun import vnet
from tun.gso import Coalescer, Segments, Splitter
from udpflannel.forward import inbound, outbound
from udpflannel.packet import Verdict
from udpflannel.routes import NextHop, RouteTable


def outbound_super(splitter: Splitter, n: int, gso_type: int, gso_size: int,
                   routes: RouteTable) -> tuple[Verdict, NextHop | None, Segments | bytes]:
    """Decide for a super-packet in ``splitter.pkt`` and cut it: (FORWARD, hop, segments) or
    (verdict, None, offender) where offender is what an ICMP error should quote (the first segment)
    or, if the packet cannot be cut at all, the packet itself."""
    pkt = splitter.pkt
    verdict, hop = outbound(pkt, n, routes)
    result = splitter.split(n, gso_type, gso_size)
    if isinstance(result, Verdict):
        return (verdict or result), None, bytes(pkt[:n])
    if verdict:
        return verdict, None, bytes(result.iov[0]) + bytes(result.iov[1])
    return Verdict.FORWARD, hop, result


def inbound_batch(coalescer: Coalescer, nbytes: int, seg: int, peer: NextHop, routes: RouteTable, *,
                  tun_mtu: int, check_source: bool) -> Iterator[tuple[Verdict, int, int, list | memoryview]]:
    """Verdicts for the ``nbytes``-byte GRO batch in ``coalescer.buf`` (datagrams of ``seg`` bytes)
    from ``peer``, in order: ``(FORWARD, a, b, iov)`` — one TUN write for rows a..b-1 — or
    ``(verdict, i, i + 1, row)`` for a refused row (for the caller to count and answer)."""
    buf = coalescer.buf
    mv = memoryview(buf)
    plain = vnet.PLAIN
    for a, b in coalescer.plan(nbytes, seg):
        if b - a > 1:
            head = mv[a * seg:(a + 1) * seg]
            if inbound(head, seg, peer, routes, tun_mtu=tun_mtu, check_source=check_source) == Verdict.FORWARD:
                yield Verdict.FORWARD, a, b, coalescer.merge(a, b)
                continue
        for i in range(a, b):
            start = i * seg
            row = mv[start:min(start + seg, nbytes)]
            verdict = inbound(row, len(row), peer, routes, tun_mtu=tun_mtu, check_source=check_source)
            yield verdict, i, i + 1, ([plain, row] if verdict == Verdict.FORWARD else row)
