"""TCP segments that a narrower path refused, cut again to fit it — sans-IO, for the fast path's refit
(``udpflannel/fastpath_out.py``: ``Outbound.refit``, after a send failed with EMSGSIZE).

A refused datagram that is a TCP segment is a byte range like any TSO super-packet, so the same cut
(``tun.gso.Segmenter``) makes it into smaller segments; anything else cannot be cut, and the caller
answers it as a router would.
"""

from __future__ import annotations

from tun import gso, vnet

_fit_segment_size = gso.fit_segment_size


def recut(datagrams: list[memoryview], limit: int, segmenter: gso.Segmenter) -> tuple[dict, memoryview]:
    """The TCP segments among ``datagrams`` that do not fit ``limit``, cut smaller in one pass with
    ``segmenter``: {datagram index: its Cut (or Refused)}, and a copy of the output the Cuts point
    into (a nested refit reuses the segmenter)."""
    items, parts, at, which = [], [], 0, []  # laid out for one cut, each with room after it to pad into
    for i, datagram in enumerate(datagrams):
        n = len(datagram)
        if n > limit:
            fitted = _fit_segment_size(datagram, 0, n, vnet.GSO_TCPV4, n, limit)
            if fitted != n:
                which.append(i)
                items.append((at, n, vnet.GSO_TCPV4, fitted))
                parts.append((at, datagram))
                at = at + n + fitted + 7 & ~7
    if not items:
        return {}, memoryview(b"")
    buf = bytearray(at + 64)
    for offset, datagram in parts:
        buf[offset:offset + len(datagram)] = datagram
    results = segmenter.cut(buf, items)
    ends = [r.start + (r.count - 1) * r.size + r.last for r in results if not isinstance(r, gso.Refused)]
    out = memoryview(bytes(segmenter.out_mv[:max(ends, default=0)]))
    return dict(zip(which, results, strict=True)), out
