"""Which kernels cut and check: the C loops (:mod:`tun.gso_c`) where the extension was built at install,
else numpy's array operations (:mod:`tun.gso_numpy`). Both behind one signature:

- a *cutter* ``cutter(src, src8, src32, out, out8, at, group)`` writes a group of like super-packets'
  segments as rows from ``out[at]`` (headers, payload, checksums);
- a *whole cutter* (compiled only) ``cut_many(src, items, out, cut_type, refused) -> list | None``
  does all of :meth:`tun.segment.Segmenter.cut`'s work in one call: parse, group, cut (None: ``out``
  is too small). Without one (numpy), the segmenter parses and groups in Python around the cutter;
- a *checker* ``checker(buf, u8, u32, base, rows, seg, hl, proto, short, mask, step, order=None) ->
  (differ, bad, psh)`` runs the GRO checks of a table of received rows; with ``order`` (intp, ``rows``
  long) logical row i is physical row ``order[i]`` (``short`` keys stay physical): one flow's rows,
  scattered over the table among other flows', are checked as consecutive.
- a *planner* (compiled only) ``planner(buf, base, seg, hl, proto, short, counts, senders, mask, step,
  most) -> (runs, order, flows, breaks, refused)`` does all of :meth:`tun.coalesce.Coalescer.plan`'s
  work after the table's kind is known, in one call: grouping by flow, the checks, the cuts, the
  runs. Without one (numpy), the coalescer plans in Python around the checker;
- a *merger* (compiled only) ``merger(buf, views, zero, order, a, b, seg, hl, proto, tail) -> iov``
  builds :meth:`tun.coalesce.Plan.merge`'s TUN write in one call.

Chosen once per :class:`~tun.segment.Segmenter` or :class:`~tun.coalesce.Coalescer`. Lazy, though the
extension costs little (a few hundred KB): a ``--no-fast-path`` daemon imports neither it nor numpy's
kernels. ``UDPFLANNEL_JIT=0`` keeps its name from the numba days (deployments set it): it still means
"run the numpy kernels".
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import NamedTuple

from tun import gso_numpy

ENV = "UDPFLANNEL_JIT"  # "0": run the numpy kernels (for comparison, or to rule the C loops out)
# Segmenters and Coalescers built without ``jit=`` use the compiled kernels where they load, unless
# this is False (the tests run both and compare).
COMPILED = True


class Kernels(NamedTuple):
    compiled: bool
    description: str  # for the start-up log: "compiled (C)" or "numpy (why not compiled)"
    new_cutter: Callable[[], Callable]  # a cutter per Segmenter output buffer (the numpy one keeps views of it)
    new_checker: Callable[[], Callable]
    cut_many: Callable | None = None
    planner: Callable | None = None
    merger: Callable | None = None


NUMPY = Kernels(False, "numpy", gso_numpy.Cutter, gso_numpy.Checker)
_compiled: Kernels | None = None
why_not = ""  # why the compiled kernels are not used, once load() has tried


def load() -> Kernels | None:
    """The compiled kernels, or None with :data:`why_not` saying why: the extension was not built at
    install (no C compiler or Python headers then) or is turned off by ``UDPFLANNEL_JIT=0``."""
    global _compiled, why_not
    if _compiled is not None or why_not:
        return _compiled
    if os.environ.get(ENV, "1") == "0":
        why_not = f"turned off by {ENV}=0"
        return None
    try:
        from tun import gso_c
    except ImportError as exc:  # built without a compiler: the numpy kernels run
        why_not = (f"the C extension tun._gso_c is not built ({exc}): install a C compiler and python3-dev, "
                   "then reinstall udpflannel")
        return None
    _compiled = Kernels(True, "compiled (C)", lambda: gso_c.cut, lambda: gso_c.check, gso_c.cut_many, gso_c.plan,
                        gso_c.merge)
    return _compiled


def choose(jit: bool | None = None) -> Kernels:
    """``jit``: True/False asks for one kind (compiled falls back to numpy where it cannot load);
    None: compiled if :data:`COMPILED` and it loads."""
    if not (COMPILED if jit is None else jit):
        return NUMPY
    compiled = load()
    return compiled if compiled is not None else NUMPY._replace(description=f"numpy ({why_not})")
