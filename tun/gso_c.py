"""The GSO cut and the GRO checks as C loops (:file:`tun/_gso_c.c`, built at install): the kernels the
fast path runs, with the signatures of :mod:`tun.gso_numpy`'s (:mod:`tun.kernels` picks one).

Why loops: numpy does a cut or a check in ~20 array calls, each a pass over 200 KB or a strided column
of headers, and in place (caches shared with the pods and the peer daemon) every pass costs 2–5× what
it costs in a loop that touches each row once, while it is in L1. Why C with the plain CPython API
(not numba, Cython or cffi): two loops need no code generator; the extension costs ~0 MB and ~0 ms at
start-up (numba: ~110 MB and ~0.5 s), builds with nothing but a C compiler and Python's headers, and
has no architecture-specific code. The numpy kernels stay the reference and the fallback; the tests
require the same bytes from both.

The cut is the C function itself (:func:`cut`), as are the send side's whole cut (:func:`cut_many`:
parse, group, cut, for :class:`tun.segment.Segmenter`) and the receive side's whole plan and merge
(:func:`plan`, :func:`merge`: :class:`tun.coalesce.Coalescer` calls them where they load). The checks
come back from C as one bytearray of 0/1 flags, which :func:`check` shows as the numpy arrays the
Python plan reads.
"""

from __future__ import annotations

import numpy as np

from tun import _gso_c
from tun.layout import PROTO_UDP

cut = _gso_c.cut
cut_many = _gso_c.cut_many  # tun.segment.Segmenter.cut's work in one call (tun.kernels: a whole cutter)
plan = _gso_c.plan  # tun.coalesce.Coalescer.plan's work in one call (tun.kernels: a planner)
merge = _gso_c.merge  # tun.coalesce.Plan.merge's, likewise (a merger)


def check(buf: bytearray, u8: np.ndarray, u32: np.ndarray, base: int, rows: int, seg: int, hl: int, proto: int,
          short: dict[int, int], mask: np.ndarray, step: np.ndarray, order: np.ndarray | None = None) -> tuple:
    """:class:`tun.gso_numpy.Checker`'s work as one C loop over the rows: ``(differ, bad, psh)`` as
    ``(rows - 1, 1)``, ``(rows, 1)`` and ``(rows - 1,)`` bool arrays (psh None for UDP). ``order``: the
    physical row of each logical row (``short`` keeps physical rows). ValueError for a table, row or
    order outside ``buf``."""
    flags = np.frombuffer(_gso_c.check(buf, base, rows, seg, hl, proto, short, mask, step, order), np.bool_)
    differ = flags[:rows - 1].reshape(rows - 1, 1)
    bad = flags[rows - 1:2 * rows - 1].reshape(rows, 1)
    return differ, bad, None if proto == PROTO_UDP else flags[2 * rows - 1:]
