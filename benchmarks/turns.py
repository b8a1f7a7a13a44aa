"""Sparse round trips with the rows taking turns in one lab: the latency goals' measure.

Why: the main table runs every row on a fresh lab of its own, minutes apart. On this kind of machine
(2 vCPUs of a shared host) a lone packet's round trip drifts by up to 2× within minutes, with the
host, so a row measured at 14:05 and a row measured at 14:12 cannot be compared at p50, let alone
at p99. Here the rows share one lab and take turns, many times (the order rotates each round), so
drift falls on every row alike: udpflannel's two paths, flanneld and kernel VXLAN side by side.

Each turn starts the row, warms it with a few pings, then sends ``count`` pings at 200 Hz from pod 1
to pod 2 and keeps every round trip (µs), and per node the daemon's CPU and its time waiting on a
run queue (``/proc/<pid>/task/*/schedstat``, fields 1 and 2) and its voluntary context switches:
what each hop costs, and how long its wake-ups waited for a CPU. Pure summaries live in ``benchmarks.report``
(:func:`~benchmarks.report.summarize_turns`); this module only measures.
"""

from __future__ import annotations

import statistics
from pathlib import Path

from benchmarks.measure import ping_samples, proc_ctxsw, runqueue_ns, runtime_ns
from benchmarks.processes import NO_FAST_PATH, Flanneld, UdpflannelStatic
from benchmarks.rotation import take_turns_in_one_lab
from benchmarks.rows import KernelVxlan, Row
from benchmarks.rr import percentile
from benchmarks.topology import UNDERLAY_MTU, VXLAN_OVERHEAD, Topology, add_pods
from udpflannel.lab.netns import Lab

WARM_PINGS = 50  # not kept: the first packets of a turn fill ARP and route caches


class VxlanTurns(KernelVxlan):
    """Kernel VXLAN as a row that can take turns: ``start`` configures it, ``stop`` deletes ``flannel.1``
    (and with it the routes through it), so the next row finds the nodes as it would alone."""

    def __init__(self, name: str = "vxlan") -> None:
        super().__init__(name)
        self._on = False

    def setup(self, topo: Topology) -> None:
        Row.setup(self, topo)
        self.pod_mtu = UNDERLAY_MTU - VXLAN_OVERHEAD

    def start(self) -> None:
        assert self.topo is not None
        KernelVxlan.setup(self, self.topo)
        self._on = True

    def stop(self) -> None:
        if self._on and self.topo is not None:
            for node in self.topo.nodes.values():
                node.ip("link", "del", "flannel.1")
        self._on = False

    def teardown(self) -> None:
        self.stop()


def take_turns(rows: dict[str, Row], lab: Lab, rounds: int, count: int, *, workdir: Path, progress) -> dict:
    """``rounds`` turns of every row in ``lab`` (fresh; the caller tears the rows down and closes it).

    Returns ``{"rows": names, "turns": [{"row", "round", "samples_us", "lost", "cpu_us_per_rt",
    "wakeups_per_rt", "nodes": {"1": {"cpu_us", "runq_us", "wakeups"}, ...}}, ...]}`` (per round trip;
    ``None`` and ``{}`` for a kernel row), with ``"error"`` added if a turn failed (the turns before it
    are kept).
    """
    names = list(rows)
    out: dict = {"rows": names, "turns": [], "lab_tag": lab.tag, "count": count}

    def turn(rnd: int, name: str, dp: Row, topo: Topology) -> None:
        out["turns"].append({"row": name, "round": rnd, **_one_turn(dp, topo, count)})

    error = take_turns_in_one_lab(rows, lab, rounds, workdir=workdir, turn=turn,
                                  first_start=lambda topo, dp: add_pods(topo, dp.pod_mtu))
    if error is None:
        progress(f"sparse turns ({rounds} rounds): " + ", ".join(
            f"{n} p50 {_median_p50(out['turns'], n):.0f} µs" for n in names))
    else:
        out["error"] = f"{type(error).__name__}: {error}"
        progress(f"sparse turns failed: {error}")
    return out


def _one_turn(dp: Row, topo: Topology, count: int) -> dict:
    client, target = topo.pods[1], str(topo.pods[2].address)
    ping_samples(client, target, WARM_PINGS)
    nodes = {i: dp.node_pids(i) for i in topo.nodes}
    before = {i: _node_reading(pids) for i, pids in nodes.items()}
    samples = ping_samples(client, target, count)  # (MeasureError if none came back)
    turn: dict = {"samples_us": samples, "lost": count - len(samples), "cpu_us_per_rt": None, "wakeups_per_rt": None,
                  "nodes": {}}
    if any(nodes.values()):
        per_rt = {i: [(b - a) / len(samples) for a, b in zip(before[i], _node_reading(nodes[i]), strict=True)]
                  for i in nodes}
        turn["nodes"] = {str(i): {"cpu_us": round(cpu / 1e3, 1), "runq_us": round(runq / 1e3, 1),
                                  "wakeups": round(wakeups, 2)} for i, (cpu, runq, wakeups) in per_rt.items()}
        turn["cpu_us_per_rt"] = round(sum(n["cpu_us"] for n in turn["nodes"].values()), 1)
        turn["wakeups_per_rt"] = round(sum(n["wakeups"] for n in turn["nodes"].values()), 2)
    return turn


def _node_reading(pids: list[int]) -> tuple[int, int, int]:
    """A node's daemon: (ns run, ns waited for a CPU, voluntary switches)."""
    return runtime_ns(pids), runqueue_ns(pids), sum(proc_ctxsw(pid)[0] for pid in pids)


def _median_p50(turns: list[dict], name: str) -> float:
    p50s = [percentile(sorted(t["samples_us"]), 0.5) for t in turns if t["row"] == name]
    return statistics.median(p50s) if p50s else float("nan")


def turn_rows(dataplanes: dict[str, Row]) -> dict[str, Row] | None:
    """Fresh rows for the turns: udpflannel's two paths, flanneld where this run has it, and kernel VXLAN.

    The daemon-on-etcd row is left out: it is the fast path's dataplane with an etcd client beside it,
    and flanneld's row already runs the one etcd the lab can hold.
    """
    fast, per_packet = dataplanes.get("udpflannel"), dataplanes.get(f"udpflannel {NO_FAST_PATH}")
    if not isinstance(fast, UdpflannelStatic) or not isinstance(per_packet, UdpflannelStatic):
        return None
    rows: dict[str, Row] = {
        name: UdpflannelStatic(f"{name} turns", dp.extra_args, code=dp.code, description=dp.description)
        for name, dp in (("udpflannel", fast), (f"udpflannel {NO_FAST_PATH}", per_packet))}
    flanneld = dataplanes.get("flanneld")
    if isinstance(flanneld, Flanneld):
        rows["flanneld"] = Flanneld(flanneld.binary, name="flanneld turns")
    rows["vxlan"] = VxlanTurns("vxlan turns")
    return rows
