"""Rows taking turns in one lab: the loop that the paired RTT (``benchmarks.pairs``) and the sparse
turns (``benchmarks.turns``) share.

Why one lab: on a shared 2-vCPU VM a lab's placement and the host's drift move a row's latency more
than the rows differ, so rows compared closely must take turns in the same lab, many times, the order
rotating each round (for two rows: A B, B A, ...), so that drift falls on every row alike.
"""

from __future__ import annotations

import subprocess
from collections.abc import Callable
from pathlib import Path

from benchmarks.measure import MeasureError
from benchmarks.rows import Row
from benchmarks.topology import DataplaneError, Topology, build_nodes, wait_reachable
from udpflannel.lab.netns import Lab

# What ends the turns early (the turns measured before it are kept, and the error recorded)
TURN_ERRORS = (DataplaneError, MeasureError, RuntimeError, OSError, subprocess.TimeoutExpired)


def take_turns_in_one_lab(rows: dict[str, Row], lab: Lab, rounds: int, *, workdir: Path,
                          first_start: Callable[[Topology, Row], None],
                          turn: Callable[[int, str, Row, Topology], None]) -> Exception | None:
    """Build the nodes in ``lab`` (fresh; the caller tears the rows down and closes it), then
    ``rounds`` times start each row in turn, the order rotating, and call ``turn(round, name, row,
    topo)`` once its pods reach each other; the row is stopped after its turn, whatever happened.
    ``first_start(topo, row)`` runs once, after the first row started (the pods take its MTU).

    Returns None, or the error (one of :data:`TURN_ERRORS`) that ended the turns.
    """
    names = list(rows)
    try:
        topo = build_nodes(lab, workdir)
        for dp in rows.values():
            dp.setup(topo)
        started = False
        for rnd in range(rounds):
            shift = rnd % len(names)
            for name in names[shift:] + names[:shift]:
                dp = rows[name]
                dp.start()
                try:
                    if not started:
                        first_start(topo, dp)
                        started = True
                    wait_reachable(topo)
                    turn(rnd, name, dp, topo)
                finally:
                    dp.stop()
    except TURN_ERRORS as exc:
        return exc
    return None
