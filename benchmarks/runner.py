"""The run loop: for each repeat, each dataplane on a fresh lab, each traffic group between two snapshots.

Rows are interleaved (the order rotates every repeat), so slow drift of the machine — other work,
thermal, page cache — spreads over all rows instead of biasing the last one. Every lab is closed in
``finally``; :data:`OPEN_LABS` lets the signal handler in ``__main__`` close whatever is still open.
"""

from __future__ import annotations

import contextlib
import secrets
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from benchmarks.measure import (
    ALT_CONGESTION,
    CONGESTION,
    MeasureError,
    daemon_peak_rss_kb,
    generator_ceiling,
    machine_busy_fraction,
    read_now,
    request_response,
    restart_iperf_server,
    sparse_ping,
    sparse_udp_rr,
    start_iperf_servers,
    start_servers,
    tcp_throughput,
    tcp_to_peers,
    udp_flood,
    window,
)
from benchmarks.pairs import pair_rows, paired_rtt
from benchmarks.rows import Row
from benchmarks.strace import strace_check
from benchmarks.topology import (
    PEERS_LAB_NODES,
    DataplaneError,
    Topology,
    add_pods,
    build_nodes,
    wait_reachable,
)
from benchmarks.turns import take_turns, turn_rows
from udpflannel.lab.netns import Lab

OPEN_LABS: set[Lab] = set()
# Namespaces are named <tag>-<host>. Other labs use "uf" + 6 hex digits, so "ufbench" (not hex) never collides.
LAB_PREFIX = "ufbench"
QUIET = 0.15  # fraction of the machine's CPU that other work may use before a lab without a warning
# tcp1_bbr: the 1-stream test again, with BBR; ping200/udprr200: sparse round trips, one packet every 5 ms
# idle: no traffic at all for a while, the daemons' own CPU (timers, polling) measured alone
GROUPS = ("tcp1", "tcp1_bbr", "tcp4", "tcp8", "rr", "ping200", "udprr200", "udp64", "udp1400", "idle")
# On the many-peers lab (a lab of its own, PEERS_LAB_NODES nodes): 4 TCP streams from pod 1 to each other pod
PEERS_GROUPS = ("tcp4x3",)


@dataclass(frozen=True)
class Settings:
    repeat: int
    tcp_seconds: int
    omit: int
    udp_seconds: int
    rr_count: int
    rr_max_seconds: float
    strace_seconds: int
    sparse_count: int  # round trips of each sparse (200 Hz) measure
    idle_seconds: float = 10.0  # the idle group: seconds without traffic
    rtt_pairs: int = 0  # per repeat: turns of the fast-path and per-packet rows in one lab (benchmarks.pairs)
    rtt_pair_count: int = 2000  # round trips per turn
    sparse_rounds: int = 0  # per repeat: rounds of sparse-ping turns of the latency rows in one lab (benchmarks.turns)
    sparse_turn_count: int = 1000  # pings per turn
    wait_idle: float = 0.0  # seconds to wait, before each lab, for the machine to be < QUIET busy
    peers_lab: bool = True  # also run PEERS_GROUPS, on a many-peers lab per row that can (Row.many_peers)

    def describe(self) -> str:
        return (f"{self.repeat} repeat(s); iperf3 TCP {self.tcp_seconds} s (+{self.omit} s omitted), UDP {self.udp_seconds} s; "
                f"up to {self.rr_count} request/response round trips (≤ {self.rr_max_seconds:g} s); "
                f"sparse round trips at 200 Hz: {self.sparse_count} pings and {self.sparse_count} UDP requests; "
                f"{self.idle_seconds:g} s without traffic; TCP congestion "
                f"control {CONGESTION} (and {ALT_CONGESTION} for one more 1-stream test)"
                + (f"; paired RTT: {self.rtt_pairs} pair(s) of turns per repeat, {self.rtt_pair_count} round trips each"
                   if self.rtt_pairs else "")
                + (f"; sparse turns: {self.sparse_rounds} round(s) per repeat, {self.sparse_turn_count} pings each"
                   if self.sparse_rounds else "")
                + (f"; many peers: TCP 4 streams to each of {PEERS_LAB_NODES - 1} peers on a {PEERS_LAB_NODES}-node lab"
                   if self.peers_lab else "; no many-peers lab"))


FULL = Settings(repeat=3, tcp_seconds=5, omit=1, udp_seconds=4, rr_count=5000, rr_max_seconds=6, strace_seconds=3, sparse_count=600,
                idle_seconds=10,
                rtt_pairs=10, rtt_pair_count=2000, sparse_rounds=4, sparse_turn_count=1000)
QUICK = Settings(repeat=1, tcp_seconds=1, omit=0, udp_seconds=1, rr_count=400, rr_max_seconds=1.5, strace_seconds=1, sparse_count=100,
                 idle_seconds=2,
                 rtt_pairs=1, rtt_pair_count=400, sparse_rounds=1, sparse_turn_count=200, peers_lab=False)
NOT_IN_THIS_RUN = "not measured in this run (the many-peers lab is off: --quick without --many-peers)"
NOT_FOR_THIS_ROW = f"this dataplane runs on the two-node lab only (no routes to {PEERS_LAB_NODES - 1} peers)"


class Progress:
    """One line per step on stderr, with the time since the run started."""

    def __init__(self, stream=sys.stderr) -> None:
        self.t0 = time.monotonic()
        self.stream = stream

    def elapsed(self) -> float:
        return time.monotonic() - self.t0

    def __call__(self, message: str) -> None:
        print(f"[{self.elapsed():6.1f}s] {message}", file=self.stream, flush=True)


def run_group(name: str, topo: Topology, s: Settings) -> dict:
    if name == "tcp1":
        return tcp_throughput(topo, streams=1, duration=s.tcp_seconds, omit=s.omit, congestion=CONGESTION)
    if name == "tcp1_bbr":
        return tcp_throughput(topo, streams=1, duration=s.tcp_seconds, omit=s.omit, congestion=ALT_CONGESTION)
    if name in ("tcp4", "tcp8"):
        return tcp_throughput(topo, streams=int(name[3:]), duration=s.tcp_seconds, omit=s.omit, congestion=CONGESTION)
    if name == "tcp4x3":
        return tcp_to_peers(topo, streams=4, duration=s.tcp_seconds, omit=s.omit, congestion=CONGESTION)
    if name == "rr":
        return request_response(topo.pods[1], str(topo.pods[2].address), s.rr_count, s.rr_max_seconds)
    if name == "ping200":
        return sparse_ping(topo.pods[1], str(topo.pods[2].address), s.sparse_count)
    if name == "udprr200":
        return sparse_udp_rr(topo.pods[1], str(topo.pods[2].address), s.sparse_count)
    if name.startswith("udp"):
        return udp_flood(topo, int(name[3:]), s.udp_seconds)
    if name == "idle":
        time.sleep(s.idle_seconds)  # the window around it reads the daemons' CPU (schedstat)
        return {"idle_s": s.idle_seconds}
    raise ValueError(name)


def summary(name: str, result: dict) -> str:
    if "error" in result:
        return f"FAILED: {result['error']}"
    if name.startswith("tcp"):
        return f"{result['gbps']:.2f} Gb/s"
    if name == "rr":
        return f"p50 {result['p50_us']:.0f} µs, p99 {result['p99_us']:.0f} µs ({result['n']} round trips)"
    if name in ("ping200", "udprr200"):
        return (f"p50 {result['p50_us']:.0f} µs, p99 {result['p99_us']:.0f} µs ({result['n']} round trips at 200 Hz,"
                f" {result['lost']} lost)")
    if name == "idle":
        run_us = result["window"].get("dataplane_run_us")
        if run_us is None:
            return "no process of its own"
        return f"both daemons together {run_us / 1e4 / result['window']['seconds']:.3f} % of one CPU over {result['window']['seconds']:.1f} s"
    limited = ", generator-limited" if result["generator_limited"] else ""
    return (f"{result['delivered_pps'] / 1e3:.0f} kpps delivered of {result['offered_pps'] / 1e3:.0f} kpps offered"
            f" (generator CPU {result['generator_cpu_pct'] or 0:.0f}%{limited})")


def run_dataplane(dp: Row, s: Settings, workdir: Path, progress: Progress, *, label: str,
                  strace: bool = False, calibrate: bool = False) -> tuple[dict, dict | None, dict | None]:
    """One repeat of one row on a fresh lab. Returns (run, strace result, tool calibration)."""
    busy, waited = wait_for_quiet(s.wait_idle)
    run: dict = {"groups": {}, "background_busy_pct": round(busy * 100, 1), "waited_for_quiet_s": waited}
    if waited:
        progress(f"waited {waited:.0f}s for other work to calm down (now {busy * 100:.0f}% busy)")
    strace_result = calibration = None
    with fresh_lab([dp], progress) as lab:
        run["lab_tag"] = lab.tag
        try:
            topo = build_nodes(lab, workdir / f"{dp.slug}-{label}")
            dp.setup(topo)
            dp.take_startups()  # (drop any from another lab: the paired-RTT one starts these rows too)
            dp.start()
            add_pods(topo, dp.pod_mtu)
            wait_reachable(topo)
            servers = start_servers(topo)
        except (DataplaneError, MeasureError, RuntimeError, OSError) as exc:
            run["setup_error"] = f"{type(exc).__name__}: {exc}"
            progress(f"{dp.name} {label}: set-up failed: {exc}")
            return run, None, None
        run["pod_mtu"] = dp.pod_mtu
        for name in GROUPS:
            run["groups"][name] = _measure_group(name, dp, topo, s, servers)
            progress(f"{dp.name} {label} {name}: {summary(name, run['groups'][name])}")
        run["startup_s"] = dp.take_startups()  # each start's start-to-ready, slowest node
        if calibrate:
            calibration = _calibrate(topo, s, progress)
        if strace and dp.has_counters:
            strace_result = _strace(dp, topo, s, progress)
    if s.peers_lab and dp.many_peers:
        run["groups"].update(_many_peers(dp, s, workdir, progress, label=label))
    else:
        run["not_measured"] = dict.fromkeys(PEERS_GROUPS, NOT_FOR_THIS_ROW if s.peers_lab else NOT_IN_THIS_RUN)
    return run, strace_result, calibration


def _many_peers(dp: Row, s: Settings, workdir: Path, progress: Progress, *, label: str) -> dict:
    """PEERS_GROUPS on a lab of their own: PEERS_LAB_NODES nodes, a pod on each, pod 1 sending to all."""
    wait_for_quiet(s.wait_idle)
    out: dict = {}
    with fresh_lab([dp], progress) as lab:
        try:
            topo = build_nodes(lab, workdir / f"{dp.slug}-{label}-peers", count=PEERS_LAB_NODES)
            dp.setup(topo)
            dp.start()
            add_pods(topo, dp.pod_mtu)
            wait_reachable(topo)
            servers = start_iperf_servers(topo)
        except (DataplaneError, MeasureError, RuntimeError, OSError) as exc:
            progress(f"{dp.name} {label}: many-peers set-up failed: {exc}")
            return {name: {"error": f"many-peers lab set-up: {type(exc).__name__}: {exc}"} for name in PEERS_GROUPS}
        for name in PEERS_GROUPS:
            out[name] = _measure_group(name, dp, topo, s, servers)
            out[name]["lab_tag"] = lab.tag
            progress(f"{dp.name} {label} {name}: {summary(name, out[name])}")
    return out


def wait_for_quiet(max_seconds: float, threshold: float = QUIET) -> tuple[float, float]:
    """Sample how busy the machine is; with ``max_seconds`` > 0 wait (bounded) until it is below ``threshold``.

    Returns (busy fraction of the last sample, seconds waited). Other people's work on a shared machine
    skews every figure; the harness cannot stop it, only wait for a lull and record what it saw.
    """
    t0 = time.monotonic()
    busy, waited = machine_busy_fraction(0.3), 0.0
    for _ in range(int(max_seconds) + 1):  # each sample takes 1 s
        if busy < threshold or waited >= max_seconds:
            break
        busy = machine_busy_fraction(1.0)
        waited = time.monotonic() - t0
    return busy, round(waited, 1)


@contextlib.contextmanager
def signals_deferred():
    """Hold Ctrl-C/SIGTERM while a lab is torn down; a signal that came in is delivered right after."""
    held = {signal.SIGINT, signal.SIGTERM, signal.SIGHUP}
    old = signal.pthread_sigmask(signal.SIG_BLOCK, held)
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, old)


@contextlib.contextmanager
def fresh_lab(dataplanes: list[Row], progress: Progress) -> Iterator[Lab]:
    """A new lab for ``dataplanes``, listed in :data:`OPEN_LABS` while open. On the way out, whatever
    happened, each dataplane is torn down (a failure is reported, the rest go on) and the lab closed,
    with Ctrl-C held meanwhile."""
    lab = Lab(tag=f"{LAB_PREFIX}{secrets.token_hex(3)}")
    OPEN_LABS.add(lab)
    try:
        yield lab
    finally:
        with signals_deferred():
            try:
                for dp in dataplanes:
                    try:
                        dp.teardown()
                    except DataplaneError as exc:
                        progress(f"{dp.name}: teardown: {exc}")
            finally:
                lab.close()
                OPEN_LABS.discard(lab)


def _calibrate(topo: Topology, s: Settings, progress: Progress) -> dict:
    """The tools' own limits, inside a pod over loopback: the request/response floor, the UDP generator ceiling."""
    out: dict = {}
    try:
        out["rr"] = request_response(topo.pods[2], "127.0.0.1", s.rr_count, s.rr_max_seconds)
        for size in (64, 1400):
            out[f"udp{size}"] = generator_ceiling(topo.pods[1], size, s.udp_seconds)
    except (MeasureError, RuntimeError, subprocess.TimeoutExpired) as exc:
        out["error"] = str(exc)
        progress(f"calibration failed: {exc}")
        return out
    progress(f"tool limits over loopback in a pod: request/response p50 {out['rr']['p50_us']:.0f} µs; UDP generator "
             f"{out['udp64']['offered_pps'] / 1e3:.0f} kpps (64 B), {out['udp1400']['offered_pps'] / 1e3:.0f} kpps (1400 B)")
    return out


def _measure_group(name: str, dp: Row, topo: Topology, s: Settings, servers: dict) -> dict:
    try:
        if not dp.running:
            dp.start()
            wait_reachable(topo)
    except DataplaneError as exc:
        return {"error": f"restart failed: {exc}"}
    pids = dp.pids()
    rss_before = daemon_peak_rss_kb(dp, topo)  # at rest: the daemons have started and the pods pinged
    before = read_now(dp, topo, pids, _server_pids(servers))
    try:
        result = run_group(name, topo, s)
    except (MeasureError, RuntimeError, KeyError, ValueError, subprocess.TimeoutExpired) as exc:
        result = {"error": f"{type(exc).__name__}: {exc}"}
        restart_iperf_server(topo, servers)
    result["window"] = window(before, read_now(dp, topo, pids, _server_pids(servers)))
    if rss_before is not None:  # peaks (VmHWM) per node, KiB: before this traffic, and after it (its peak included)
        result["peak_rss_kb"] = {"before": rss_before, "after": daemon_peak_rss_kb(dp, topo)}
    if dp.has_counters:
        try:
            counters = dp.stop()
            result["counters"] = counters["total"] if counters else None
            result["node_counters"] = {str(i): c for i, c in counters["nodes"].items()} if counters else None
        except DataplaneError as exc:
            result.setdefault("error", str(exc))
    if dp.kind != "kernel" and not pids:
        result.setdefault("error", "the dataplane had no live process to account for")
    return result


def _server_pids(servers: dict) -> list[int]:
    return [p.pid for p in servers.values() if p.poll() is None]


def _strace(dp: Row, topo: Topology, s: Settings, progress: Progress) -> dict:
    try:
        dp.start()
        wait_reachable(topo)
        result = strace_check(dp, topo, s.strace_seconds)
    except (MeasureError, DataplaneError, OSError) as exc:
        progress(f"strace cross-check failed: {exc}")
        return {"error": str(exc)}
    progress(f"strace cross-check: counters {result['counters_per_packet']} syscalls/pkt, strace "
             f"{result['strace_data_per_packet']} data + all {result['strace_all_per_packet']} per pkt")
    return result


def run_all(dataplanes: dict[str, Row], s: Settings, workdir: Path, progress: Progress) -> dict:
    raw: dict = {"rows": {name: {"kind": dp.kind, "description": dp.description, "has_counters": dp.has_counters,
                                 "runs": []} for name, dp in dataplanes.items()},
                 "strace": None, "calibration": None, "rtt_pairs": [],
                 "sparse_turns": []}
    names = list(dataplanes)
    paired = pair_rows(dataplanes) if s.rtt_pairs else None
    turning = turn_rows(dataplanes) if s.sparse_rounds else None
    for rep in range(s.repeat):
        order = names[rep % len(names):] + names[:rep % len(names)]
        for name in order:
            dp = dataplanes[name]
            progress(f"repeat {rep + 1}/{s.repeat}: {name} — {dp.description}")
            want_strace = raw["strace"] is None and dp.has_counters
            want_calibration = raw["calibration"] is None
            run, strace, calibration = run_dataplane(dp, s, workdir, progress, label=f"r{rep + 1}",
                                                     strace=want_strace, calibrate=want_calibration)
            raw["rows"][name]["runs"].append(run)
            if strace is not None:
                raw["strace"] = strace
            if calibration is not None:
                raw["calibration"] = calibration
        if paired:
            progress(f"repeat {rep + 1}/{s.repeat}: paired RTT, {' vs '.join(paired)}")
            wait_for_quiet(s.wait_idle)
            with fresh_lab(list(paired.values()), progress) as lab:
                raw["rtt_pairs"].append(paired_rtt(paired, lab, s.rtt_pairs, s.rtt_pair_count, s.rr_max_seconds,
                                                   workdir=workdir / f"paired-r{rep + 1}", progress=progress))
        if turning:
            progress(f"repeat {rep + 1}/{s.repeat}: sparse turns, {', '.join(turning)}")
            wait_for_quiet(s.wait_idle)
            with fresh_lab(list(turning.values()), progress) as lab:
                raw["sparse_turns"].append(take_turns(turning, lab, s.sparse_rounds, s.sparse_turn_count,
                                                      workdir=workdir / f"turns-r{rep + 1}", progress=progress))
    return raw
