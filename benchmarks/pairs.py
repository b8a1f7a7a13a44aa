"""Request/response latency of two udpflannel rows, paired: one lab, the rows' daemons taking turns.

Why: on 2 vCPUs one row's RTT p50 moves by ±10 % from lab to lab with where the scheduler puts the
four processes of a round trip (client, two daemons, server), so the main table cannot tell apart
two rows closer than that — and the fast path's "no worse than the per-packet path" is such a
comparison. Here both rows run in the same lab, one after the other, many times (restarting the
daemons re-draws their placement; the order alternates A B, B A, ...), so the lab and the machine's
drift cancel in each pair. Each turn also reads the daemons' own CPU time from
``/proc/<pid>/task/*/schedstat`` (nanoseconds), divided by the round trips: a per-packet cost
with far less noise than the latency itself.

Pure summaries (:func:`summarize_pairs`) live in ``benchmarks.report``; this module only measures.
"""

from __future__ import annotations

from pathlib import Path

from benchmarks.measure import request_response, runtime_ns, start_servers
from benchmarks.processes import NO_FAST_PATH, UdpflannelStatic
from benchmarks.rotation import take_turns_in_one_lab
from benchmarks.topology import Topology, add_pods
from udpflannel.lab.netns import Lab


def paired_rtt(rows: dict[str, UdpflannelStatic], lab: Lab, pairs: int, count: int, max_seconds: float, *,
               workdir: Path, progress) -> dict:
    """``pairs`` turns of each row (two rows) in ``lab``, fresh (the caller tears the rows down and
    closes it); ``count`` round trips per turn.

    Returns ``{"rows": [a, b], "turns": [{"row", "pair", "p50_us", "p99_us", "n", "daemon_cpu_us_per_rt"}, ...]}``
    with ``"error": reason`` added if a turn failed (the turns before it are kept).
    """
    names = list(rows)
    assert len(names) == 2, names
    out: dict = {"rows": names, "turns": [], "lab_tag": lab.tag}

    def first_start(topo: Topology, dp: UdpflannelStatic) -> None:
        add_pods(topo, dp.pod_mtu)
        start_servers(topo)

    def turn(pair: int, name: str, dp: UdpflannelStatic, topo: Topology) -> None:
        pids = dp.pids()
        before = runtime_ns(pids)
        rr = request_response(topo.pods[1], str(topo.pods[2].address), count, max_seconds)
        spent = runtime_ns(pids) - before
        round_trips = rr["n"] + rr["warmup"] * rr["runs"]  # the daemons forwarded the untimed ones too
        out["turns"].append({"row": name, "pair": pair, "p50_us": round(rr["p50_us"], 1),
                             "p99_us": round(rr["p99_us"], 1), "n": rr["n"],
                             "daemon_cpu_us_per_rt": round(spent / round_trips / 1e3, 2)})

    error = take_turns_in_one_lab(rows, lab, pairs, workdir=workdir, first_start=first_start, turn=turn)
    if error is None:
        progress(f"paired RTT ({pairs} pairs): " + ", ".join(
            f"{n} p50 {sorted(t['p50_us'] for t in out['turns'] if t['row'] == n)[pairs // 2]:.0f} µs" for n in names))
    else:
        out["error"] = f"{type(error).__name__}: {error}"
        progress(f"paired RTT failed: {error}")
    return out


def pair_rows(dataplanes: dict) -> dict[str, UdpflannelStatic] | None:
    """The fast-path row and the per-packet row, if this run has both (fresh objects: their own slugs)."""
    fast, per_packet = dataplanes.get("udpflannel"), dataplanes.get(f"udpflannel {NO_FAST_PATH}")
    if not isinstance(fast, UdpflannelStatic) or not isinstance(per_packet, UdpflannelStatic):
        return None
    return {name: UdpflannelStatic(f"{name} paired", dp.extra_args, code=dp.code, description=dp.description)
            for name, dp in (("udpflannel", fast), (f"udpflannel {NO_FAST_PATH}", per_packet))}

