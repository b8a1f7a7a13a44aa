"""From raw per-repeat results to the three outputs: ``results.json``, ``results.md`` and PNG plots.

Pure functions over plain dicts (no I/O until ``write_*``), so the aggregation and ratio rules are
unit-tested without a lab. A metric's value for one repeat is ``{"value": x, ...}`` or
``{"unsupported": reason}`` (or ``{"error": reason}`` when that repeat's measurement failed); the
aggregate over repeats is ``{"median", "min", "max", "n", "values", ...}`` or ``{"unsupported": reason}``.
"""

from __future__ import annotations

import json
import random
import statistics
from dataclasses import dataclass
from pathlib import Path

REFERENCES = ("vxlan", "host-gw")
GENERATOR_LIMITED_MARK = "≥"


@dataclass(frozen=True)
class Metric:
    key: str
    label: str
    unit: str
    better: str  # "higher" or "lower"
    digits: int
    same_measure_for_kernel: bool = True  # False: kernel rows measure it differently, ratios across kinds are n/c


METRICS = (
    Metric("tcp1_gbps", "TCP pod→pod, 1 stream", "Gb/s", "higher", 2),
    Metric("tcp1_bbr_gbps", "TCP pod→pod, 1 stream, BBR", "Gb/s", "higher", 2),
    Metric("tcp4_gbps", "TCP pod→pod, 4 streams", "Gb/s", "higher", 2),
    Metric("rtt_p50_us", "TCP request/response RTT p50", "µs", "lower", 0),
    Metric("rtt_p99_us", "TCP request/response RTT p99", "µs", "lower", 0),
    Metric("udp64_kpps", "UDP 64 B forwarding rate", "kpps", "higher", 0),
    Metric("udp1400_kpps", "UDP 1400 B forwarding rate", "kpps", "higher", 0),
    Metric("cpu_s_per_gb", "Dataplane CPU per GB (TCP 1 stream)¹", "CPU-s/GB", "lower", 2, same_measure_for_kernel=False),
    Metric("machine_cpu_s_per_gb", "Whole-machine CPU per GB (TCP 1 stream)²", "CPU-s/GB", "lower", 2),
    Metric("ctx_vol_per_kpkt", "Voluntary context switches / 1000 packets (TCP 1 stream)", "", "lower", 1),
    Metric("ctx_invol_per_kpkt", "Involuntary context switches / 1000 packets (TCP 1 stream)", "", "lower", 1),
    Metric("syscalls_per_pkt", "Syscalls / packet (TCP 1 stream, daemon counters)", "", "lower", 2),
)
METRIC_BY_KEY = {m.key: m for m in METRICS}

NO_PROCESS = "kernel dataplane: no process of its own, forwarding runs in softirq context"
NO_COUNTERS = "this dataplane has no counters interface (strace it by hand)"


# -- one repeat -> metric values ----------------------------------------------------------------------------
def _value(x: float, **extra) -> dict:
    return {"value": float(x), **extra}


def _group(run: dict, name: str) -> dict:
    """The group's result, or raise KeyError/LookupError with the reason it is missing."""
    if "setup_error" in run:
        raise LookupError(run["setup_error"])
    group = run.get("groups", {}).get(name)
    if group is None:
        raise LookupError(f"{name} was not measured")
    if "error" in group:
        raise LookupError(group["error"])
    return group


def group_cost(kind: str, group: dict) -> dict:
    """Per-group dataplane cost: CPU per GB, context switches and syscalls per packet, packets per wake-up."""
    w = group["window"]
    counters = group.get("counters")
    gb = w["pod_rx_bytes"] / 1e9
    packets, source = (counters["packets"], "counters") if counters else (w["underlay_packets"], "underlay eth0")
    out: dict = {"packets": packets, "packets_source": source, "gb": round(gb, 4)}
    if kind == "kernel":
        out["cpu_s"] = w["kernel_cpu_s"]
        out["cpu_source"] = "/proc/stat system+softirq+irq (whole machine)"
    else:
        out["cpu_s"] = w["dataplane_cpu_s"]
        out["cpu_source"] = "/proc/<pid>/stat utime+stime of the dataplane processes"
    out["cpu_s_per_gb"] = out["cpu_s"] / gb if gb > 0.001 else None
    out["machine_cpu_s_per_gb"] = w["machine_busy_s"] / gb if gb > 0.001 else None
    if kind != "kernel" and packets:
        out["ctx_vol_per_kpkt"] = w["ctx_voluntary"] * 1000 / packets
        out["ctx_invol_per_kpkt"] = w["ctx_involuntary"] * 1000 / packets
    if counters and counters.get("packets"):
        out["syscalls_per_pkt"] = counters["syscalls"] / counters["packets"]
        if counters.get("tun_wakeups"):
            out["pkts_per_tun_wakeup"] = counters["tun_packets"] / counters["tun_wakeups"]
        if counters.get("udp_wakeups"):
            out["pkts_per_udp_wakeup"] = counters["udp_packets"] / counters["udp_wakeups"]
    return out


def metrics_from_run(kind: str, has_counters: bool, run: dict) -> dict[str, dict]:
    """Every metric of one repeat of one dataplane: a value, or why not."""
    out: dict[str, dict] = {}

    def put(key: str, fn) -> None:
        try:
            out[key] = fn()
        except LookupError as exc:
            out[key] = {"error": str(exc.args[0]) if exc.args else "missing"}

    put("tcp1_gbps", lambda: _value(_group(run, "tcp1")["gbps"]))
    put("tcp1_bbr_gbps", lambda: _value(_group(run, "tcp1_bbr")["gbps"]))
    put("tcp4_gbps", lambda: _value(_group(run, "tcp4")["gbps"]))
    put("rtt_p50_us", lambda: _value(_group(run, "rr")["p50_us"], n=_group(run, "rr")["n"]))
    put("rtt_p99_us", lambda: _value(_group(run, "rr")["p99_us"], n=_group(run, "rr")["n"]))
    for size in (64, 1400):
        def pps(size=size):
            g = _group(run, f"udp{size}")
            return _value(g["delivered_pps"] / 1e3, generator_limited=g["generator_limited"],
                          offered_kpps=g["offered_pps"] / 1e3, generator_cpu_pct=g["generator_cpu_pct"])
        put(f"udp{size}_kpps", pps)

    def cost(key: str):
        def fn():
            value = group_cost(kind, _group(run, "tcp1")).get(key)
            if value is None:
                if kind == "kernel" and key.startswith("ctx"):
                    return {"unsupported": NO_PROCESS}
                if key == "syscalls_per_pkt":
                    return {"unsupported": "kernel dataplane makes no syscalls per packet (softirq)"
                            if kind == "kernel" else NO_COUNTERS}
                raise LookupError(f"{key}: too little traffic to compute")
            return _value(value)
        return fn

    for key in ("cpu_s_per_gb", "machine_cpu_s_per_gb", "ctx_vol_per_kpkt", "ctx_invol_per_kpkt", "syscalls_per_pkt"):
        put(key, cost(key))
    return out


# -- repeats -> aggregate --------------------------------------------------------------------------------------
def aggregate(values: list[dict]) -> dict:
    """Median and spread over the repeats that produced a value; the reason if none did."""
    good = [v for v in values if "value" in v]
    if not good:
        reasons = [v.get("unsupported") or v.get("error") or "not measured" for v in values]
        unsupported = next((v["unsupported"] for v in values if "unsupported" in v), None)
        if unsupported:
            return {"unsupported": unsupported}
        return {"unsupported": f"failed in every repeat: {reasons[0] if reasons else 'no repeats'}", "failed": True}
    xs = [v["value"] for v in good]
    med = statistics.median(xs)
    out = {
        "median": med, "min": min(xs), "max": max(xs), "n": len(xs), "values": xs,
        "spread_pct": round((max(xs) - min(xs)) / med * 100, 1) if med else 0.0,
    }
    limited = sum(1 for v in good if v.get("generator_limited"))
    if any("generator_limited" in v for v in good):
        out["generator_limited"] = limited
        out["offered_kpps"] = statistics.median(v["offered_kpps"] for v in good)
        cpus = [v["generator_cpu_pct"] for v in good if v.get("generator_cpu_pct") is not None]
        out["generator_cpu_pct"] = statistics.median(cpus) if cpus else None
    errors = [v["error"] for v in values if "error" in v]
    if errors:
        out["failed_repeats"] = errors
    return out


def ratio(row: dict, ref: dict, metric: Metric, row_kind: str, ref_kind: str) -> dict:
    """``row / ref`` of the medians, qualified when a side is generator-limited (a lower bound)."""
    if "median" not in ref:
        return {"unsupported": f"reference has no value ({ref.get('unsupported', 'missing')})"}
    if "median" not in row:
        return {"unsupported": row.get("unsupported", "missing")}
    if not metric.same_measure_for_kernel and row_kind != ref_kind:
        return {"unsupported": "not comparable: process CPU vs the kernel's system+softirq time; see whole-machine CPU"}
    if not ref["median"]:
        return {"unsupported": "reference is zero"}
    value = row["median"] / ref["median"]
    row_lim, ref_lim = bool(row.get("generator_limited")), bool(ref.get("generator_limited"))
    qualifier = ""
    if row_lim and ref_lim:
        qualifier = "~"  # both bounded by the generator: not a dataplane comparison
    elif row_lim:
        qualifier = "≥"
    elif ref_lim:
        qualifier = "≤"
    return {"ratio": value, "qualifier": qualifier}


def build_results(raw: dict, meta: dict) -> dict:
    """``raw``: {"rows": {name: {"kind", "description", "has_counters", "runs": [run, ...]}}, "strace": ...}."""
    rows = {}
    for name, row in raw["rows"].items():
        per_repeat = [metrics_from_run(row["kind"], row["has_counters"], run) for run in row["runs"]]
        rows[name] = {
            "kind": row["kind"], "description": row["description"],
            "metrics": {m.key: aggregate([r[m.key] for r in per_repeat]) for m in METRICS},
            "details": detail_costs(row),
        }
    ratios = {}
    for name, row in rows.items():
        ratios[name] = {}
        for ref in REFERENCES:
            if ref not in rows:
                ratios[name][ref] = {m.key: {"unsupported": f"{ref} was not in this run"} for m in METRICS}
                continue
            ratios[name][ref] = {
                m.key: ratio(row["metrics"][m.key], rows[ref]["metrics"][m.key], m, row["kind"], rows[ref]["kind"])
                for m in METRICS
            }
    return {"meta": meta, "metrics": {m.key: {"label": m.label, "unit": m.unit, "better": m.better} for m in METRICS},
            "rows": rows, "ratios": ratios, "strace_check": raw.get("strace"), "calibration": raw.get("calibration"),
            "rtt_pairs": summarize_pairs(raw.get("rtt_pairs") or []), "raw": raw["rows"]}


# -- paired RTT (benchmarks.pairs) ----------------------------------------------------------------------------
BOOTSTRAP_ROUNDS = 2000
BOOTSTRAP_SEED = 8285  # fixed: rebuilding the report from results.json gives the same interval


def bootstrap_median_ci(values: list[float], *, rounds: int = BOOTSTRAP_ROUNDS, seed: int = BOOTSTRAP_SEED,
                        level: float = 0.95) -> tuple[float, float]:
    """Percentile bootstrap interval of the median of ``values`` (resampled with replacement)."""
    rng = random.Random(seed)
    n = len(values)
    medians = sorted(statistics.median(rng.choices(values, k=n)) for _ in range(rounds))
    tail = (1 - level) / 2
    return medians[int(tail * rounds)], medians[min(rounds - 1, int((1 - tail) * rounds))]


def summarize_pairs(labs: list[dict]) -> dict:
    """Pairs of turns (same lab, same pair index) → per row: median RTT p50 and daemon CPU per round
    trip over its turns; per pair: the first row's p50 (and CPU) ÷ the second's, summarized by its
    median with a bootstrap 95 % interval and the share of pairs where the first row was not slower."""
    if not labs:
        return {"unsupported": "no paired RTT in this run (it needs the fast-path and the per-packet rows; --rtt-pairs)"}
    names = labs[0]["rows"]
    turns = [(i, t) for i, lab in enumerate(labs) for t in lab["turns"]]
    by_pair: dict[tuple[int, int], dict[str, dict]] = {}
    for i, t in turns:
        by_pair.setdefault((i, t["pair"]), {})[t["row"]] = t
    complete = [p for p in by_pair.values() if len(p) == 2]
    out: dict = {"rows": names, "labs": len(labs), "pairs": len(complete), "raw": labs,
                 "errors": [lab["error"] for lab in labs if "error" in lab]}
    if not complete:
        return {**out, "unsupported": "no complete pair was measured: " + "; ".join(out["errors"] or ["no turns"])}
    a, b = names
    out["p50_us"] = {n: statistics.median(p[n]["p50_us"] for p in complete) for n in names}
    out["cpu_us_per_rt"] = {n: statistics.median(p[n]["daemon_cpu_us_per_rt"] for p in complete) for n in names}
    for key, field in (("p50_ratio", "p50_us"), ("cpu_ratio", "daemon_cpu_us_per_rt")):
        ratios = [p[a][field] / p[b][field] for p in complete if p[b][field] > 0]
        lo, hi = bootstrap_median_ci(ratios)
        out[key] = {"median": statistics.median(ratios), "ci95": [lo, hi],
                    "not_slower_share": sum(r <= 1 for r in ratios) / len(ratios), "n": len(ratios)}
    return out


def pairs_text(results: dict) -> str:
    s = results.get("rtt_pairs") or {}
    if "p50_ratio" not in s:
        return f"Not measured: {s.get('unsupported', 'no paired RTT in this run')}"
    a, b = s["rows"]
    r, c = s["p50_ratio"], s["cpu_ratio"]
    lines = [f"{s['pairs']} pairs of turns in {s['labs']} lab(s), one lab per repeat: in each pair both rows' daemons "
             "run in turn in the same lab (order alternating), each turn a fresh start of the daemons and "
             f"{results['meta'].get('rr_runs', 1)} request/response client processes, pooled. Medians over the turns:", "",
             "| row | RTT p50 (µs) | daemon CPU per round trip, both nodes (µs) |", "|---|---:|---:|"]
    lines += [f"| {n} | {s['p50_us'][n]:.0f} | {s['cpu_us_per_rt'][n]:.1f} |" for n in (a, b)]
    lines += ["", f"{a} ÷ {b}, pair by pair: RTT p50 **{r['median']:.3f}×** (95 % bootstrap interval "
              f"{r['ci95'][0]:.3f}–{r['ci95'][1]:.3f}; not slower in {r['not_slower_share'] * 100:.0f} % of the pairs), "
              f"daemon CPU per round trip {c['median']:.3f}× ({c['ci95'][0]:.3f}–{c['ci95'][1]:.3f})."]
    if s["errors"]:
        lines += ["", "Failed: " + "; ".join(s["errors"])]
    return "\n".join(lines)


GROUP_LABELS = {"tcp1": "TCP 1 stream", "tcp1_bbr": "TCP 1 stream, BBR", "tcp4": "TCP 4 streams", "rr": "request/response",
                "udp64": "UDP 64 B flood", "udp1400": "UDP 1400 B flood"}
DETAIL_KEYS = ("cpu_s_per_gb", "ctx_vol_per_kpkt", "ctx_invol_per_kpkt", "syscalls_per_pkt",
               "pkts_per_tun_wakeup", "pkts_per_udp_wakeup")


def detail_costs(row: dict) -> dict:
    """Median per traffic group of the per-packet costs (userspace rows: the table below the main one)."""
    out: dict = {}
    for group in GROUP_LABELS:
        costs = []
        for run in row["runs"]:
            try:
                costs.append(group_cost(row["kind"], _group(run, group)))
            except (LookupError, KeyError, TypeError):
                continue
        if costs:
            out[group] = {k: statistics.median(c[k] for c in costs) for k in DETAIL_KEYS
                          if all(c.get(k) is not None for c in costs)}
    return out


# -- Markdown -------------------------------------------------------------------------------------------------
def fmt_number(x: float, digits: int) -> str:
    if abs(x) >= 100:
        digits = 0
    return f"{x:,.{digits}f}"


def fmt_cell(agg: dict, metric: Metric) -> str:
    if "median" not in agg:
        return "n/a³"
    mark = f"{GENERATOR_LIMITED_MARK} " if agg.get("generator_limited") else ""
    text = f"{mark}{fmt_number(agg['median'], metric.digits)}"
    if agg["n"] > 1:
        text += f" ({fmt_number(agg['min'], metric.digits)}–{fmt_number(agg['max'], metric.digits)})"
    if agg.get("failed_repeats"):
        text += f" [{agg['n']} of {agg['n'] + len(agg['failed_repeats'])}]"
    return text


def fmt_ratio(r: dict) -> str:
    if "ratio" not in r:
        return "—"
    q = r["qualifier"]
    return f"{q + ' ' if q else ''}{r['ratio']:.2f}×"


def markdown(results: dict, images: list[str]) -> str:
    meta, rows = results["meta"], results["rows"]
    names = list(rows)
    lines = [f"# udpflannel benchmark — {meta['date']}", ""]
    lines += [f"Machine: {meta['machine']}. ", f"Settings: {meta['settings_text']}. ",
              f"udpflannel code: {meta.get('udpflannel_code', meta['commit'])}. ",
              f"Harness commit {meta['commit']}; other work on the machine before the run: {meta['background_busy_pct']:.0f}% "
              f"of its CPU (at most {meta['background_busy_pct_max']:.0f}% before any row's lab).", ""]
    lines += [main_table(results), "", foreign_line(results), ""]
    for ref in REFERENCES:
        if ref in rows:
            lines += [f"### Ratio to {ref} (same run; median ÷ median)", "", ratio_table(results, ref), ""]
    detail = detail_table(results)
    if detail:
        lines += ["### Per-packet cost of the userspace dataplanes, by traffic type (medians)", "", detail, ""]
    strace = results.get("strace_check")
    if strace:
        lines += ["### Syscall counters cross-checked with strace", "", strace_text(strace), ""]
    if "p50_ratio" in (results.get("rtt_pairs") or {}):
        lines += ["### RTT of the fast path and the per-packet path, paired in one lab", "", pairs_text(results), ""]
    lines += ["### Notes", ""]
    lines += notes(results)
    unsupported = [(n, m.key, rows[n]["metrics"][m.key]["unsupported"]) for n in names for m in METRICS
                   if "unsupported" in rows[n]["metrics"][m.key]]
    if unsupported:
        lines += ["", "³ Not available:", ""]
        lines += [f"- {n} / {k}: {reason}" for n, k, reason in unsupported]
    if images:
        lines += [""] + [f"![{Path(i).stem}]({i})" for i in images]
    return "\n".join(lines) + "\n"


def main_table(results: dict) -> str:
    rows = results["rows"]
    names = list(rows)
    head = "| metric | " + " | ".join(names) + " |"
    sep = "|---|" + "---:|" * len(names)
    body = []
    for m in METRICS:
        unit = f" ({m.unit})" if m.unit else ""
        better = "↑" if m.better == "higher" else "↓"
        body.append(f"| {m.label}{unit} {better} | " + " | ".join(fmt_cell(rows[n]["metrics"][m.key], m) for n in names) + " |")
    return "\n".join([head, sep, *body])


def foreign_load(row: dict) -> list[float]:
    """Estimated share of the machine other people's work used during each measurement window of a row."""
    return [g["window"]["foreign_busy_pct"] for run in row["runs"] for g in run.get("groups", {}).values()
            if g.get("window", {}).get("foreign_busy_pct") is not None]


def foreign_line(results: dict) -> str:
    parts = []
    for name, row in results["raw"].items():
        load = foreign_load(row)
        if load:
            parts.append(f"{name} {statistics.median(load):.0f}% (max {max(load):.0f}%)")
    return ("Other work on the machine during the measurements (busy CPU minus this harness's processes and "
            "softirq, share of all CPUs; median per row): " + (", ".join(parts) or "not measured") + ".")


def ratio_table(results: dict, ref: str) -> str:
    names = [n for n in results["rows"] if n != ref]
    head = "| metric | " + " | ".join(f"{n} ÷ {ref}" for n in names) + " |"
    sep = "|---|" + "---:|" * len(names)
    body = [f"| {m.label} | " + " | ".join(fmt_ratio(results["ratios"][n][ref][m.key]) for n in names) + " |"
            for m in METRICS]
    return "\n".join([head, sep, *body])


def detail_table(results: dict) -> str:
    labels = {"cpu_s_per_gb": "CPU-s/GB", "ctx_vol_per_kpkt": "vol. cs/1k pkt", "ctx_invol_per_kpkt": "invol. cs/1k pkt",
              "syscalls_per_pkt": "syscalls/pkt", "pkts_per_tun_wakeup": "pkts/TUN wake-up",
              "pkts_per_udp_wakeup": "pkts/UDP wake-up"}
    lines = []
    for name, row in results["rows"].items():
        if row["kind"] == "kernel" or not row["details"]:
            continue
        if not lines:
            lines += ["| dataplane | traffic | " + " | ".join(labels.values()) + " |", "|---|---|" + "---:|" * len(labels)]
        for group, values in row["details"].items():
            cells = [fmt_number(values[k], 2) if k in values else "—" for k in labels]
            lines.append(f"| {name} | {GROUP_LABELS[group]} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def strace_text(s: dict) -> str:
    if "error" in s:
        return f"Not done: {s['error']}"
    top = ", ".join(f"{k} {v['calls']}" for k, v in list(s["by_syscall"].items())[:6])
    return (f"{s['dataplane']} on node {s['node']} (pid {s['pid']}), TCP 1 stream for {s['transfer_seconds']:.1f} s under "
            f"`strace -c -f`: the daemon counted {s['syscalls_counters']:,} data syscalls for {s['packets_counters']:,} "
            f"packets ({s['counters_per_packet']} per packet); strace saw {s['syscalls_strace_data']:,} read/write/send/recv "
            f"calls ({s['strace_data_per_packet']} per packet, {s['strace_vs_counters']:.3f}× the counters) and "
            f"{s['syscalls_strace_all']:,} syscalls of any kind ({s['strace_all_per_packet']} per packet, epoll included). "
            f"Most frequent: {top}.")


def notes(results: dict) -> list[str]:
    meta = results["meta"]
    cal = results.get("calibration") or {}
    nan = {"p50_us": float("nan"), "p99_us": float("nan"), "offered_pps": float("nan"), "generator_cpu_pct": None}
    rr, g64, g1400 = cal.get("rr", nan), cal.get("udp64", nan), cal.get("udp1400", nan)
    return [
        "- Every row ran on a fresh two-node namespace lab with the same topology (veth underlay over a bridge, "
        "pods behind cni0), interleaved per repeat; cells are median (min–max) over the repeats.",
        "- TCP: iperf3 pod 1 → pod 2, congestion control set on the sockets (`iperf3 -C`), not taken from the "
        "host: cubic, the kernel's default, and BBR for one more 1-stream test. BBR paces its sends, so a "
        "userspace dataplane finds fewer packets per wake-up than under cubic's bursts.",
        f"- RTT: {meta['rr_size']} B messages echoed (TCP_NODELAY) by a Python "
        f"client/server in the pods, over {meta.get('rr_runs', 1)} connections in turn, each from a fresh client "
        "process, samples pooled; the tool's own floor (same pod, loopback) is "
        f"p50 {rr['p50_us']:.0f} µs / p99 {rr['p99_us']:.0f} µs. On 2 vCPUs the kernel rows' RTT is bimodal "
        "(≈ 40 µs when client and server run on the same vCPU, ≈ 95 µs when each wake-up crosses vCPUs), "
        "so their medians and ratios move by ~2× with the scheduler's placement: read them with the spread.",
        "- UDP forwarding rate: iperf3 `-u -b 0` with 64 B / 1400 B payloads (92 / 1428 B IP packets), counted as "
        "datagrams that reached pod 2's UDP layer (/proc/net/snmp InDatagrams + RcvbufErrors; not eth0 packets, "
        f"since a dataplane that merges a flow's datagrams hands the pod one packet for many). {GENERATOR_LIMITED_MARK} = generator-limited: the dataplane delivered "
        "≥ 95 % of what the single-threaded generator offered, so the true capacity is at least this; ratios with "
        "≥/≤ are bounds, ~ means both sides were generator-limited. The generator alone (to loopback in a pod) "
        f"offers {g64['offered_pps'] / 1e3:.0f} kpps (64 B) and {g1400['offered_pps'] / 1e3:.0f} kpps (1400 B); "
        "a kernel row offering less was slowed by its own forwarding work, which on veth runs on the sending "
        "CPU inside the generator's sendto(): one core, generator plus kernel path.",
        "- ¹ Dataplane CPU: userspace rows: utime+stime of the dataplane processes from /proc/<pid>/stat. "
        "Kernel rows (vxlan, host-gw) have no process: their figure is the whole machine's system+softirq+irq "
        "time from /proc/stat, which also holds iperf3's own kernel work — not comparable across kinds.",
        "- ² Whole-machine CPU: all non-idle CPU time (/proc/stat) during the transfer, generators included: "
        "the like-for-like comparison between kernel and userspace rows.",
        "- Context switches: /proc/<pid>/task/*/status of the dataplane processes, per 1000 packets they "
        "handled (the daemons' counters, both nodes, both directions: a pod-to-pod packet is handled once by "
        "each node, so it counts twice). Syscalls per packet: the daemons' counters (TUN reads/writes + UDP "
        "recvs/sends, EAGAIN attempts included) over the same packets: 2.0 is one read and one write each.",
        f"- {meta['cpus']} CPUs shared by the generators, both nodes' dataplanes and the kernel: userspace "
        "rows compete with iperf3 for the same cores, which a real two-host deployment would not.",
    ]


# -- plots ----------------------------------------------------------------------------------------------------
def plot(results: dict, out_dir: Path) -> list[str]:
    """Throughput, latency, packet rate and CPU/GB bar charts with min–max whiskers; returns file names."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = results["rows"]
    names = list(rows)
    subtitle = f"{results['meta']['machine_short']} · {results['meta']['date']}"
    charts = [
        ("throughput.png", "TCP throughput pod→pod (higher is better)", "Gb/s", ["tcp1_gbps", "tcp1_bbr_gbps", "tcp4_gbps"],
         ["1 stream", "1 stream, BBR", "4 streams"]),
        ("latency.png", "TCP request/response RTT (lower is better)", "µs", ["rtt_p50_us", "rtt_p99_us"], ["p50", "p99"]),
        ("packet_rate.png", "UDP forwarding rate (hatched: generator-limited, a lower bound)", "kpps",
         ["udp64_kpps", "udp1400_kpps"], ["64 B", "1400 B"]),
        ("cpu_per_gb.png", "CPU seconds per GB, TCP 1 stream (lower is better)", "CPU-s/GB",
         ["cpu_s_per_gb", "machine_cpu_s_per_gb"], ["dataplane (kernel rows: sys+softirq)", "whole machine"]),
    ]
    files = []
    for filename, title, unit, keys, labels in charts:
        fig, ax = plt.subplots(figsize=(7.5, 4.2), dpi=110)
        width = 0.8 / len(keys)
        for k, (key, label) in enumerate(zip(keys, labels, strict=True)):
            xs, heights, lo, hi, hatches = [], [], [], [], []
            for i, name in enumerate(names):
                agg = rows[name]["metrics"][key]
                if "median" not in agg:
                    continue
                xs.append(i + (k - (len(keys) - 1) / 2) * width)
                heights.append(agg["median"])
                lo.append(agg["median"] - agg["min"])
                hi.append(agg["max"] - agg["median"])
                hatches.append("//" if agg.get("generator_limited") else "")
            bars = ax.bar(xs, heights, width * 0.95, yerr=[lo, hi], capsize=3, label=label, color=f"C{k}")
            for bar, hatch, h in zip(bars, hatches, heights, strict=True):
                bar.set_hatch(hatch)
                ax.annotate(fmt_number(h, 2 if h < 10 else 1), (bar.get_x() + bar.get_width() / 2, h),
                            ha="center", va="bottom", fontsize=7, xytext=(0, 2), textcoords="offset points")
        ax.set_xticks(range(len(names)), names)
        ax.set_ylabel(unit)
        ax.set_title(f"{title}\n{subtitle}", fontsize=9)
        ax.legend(fontsize=8)
        ax.grid(axis="y", alpha=0.3)
        fig.tight_layout()
        fig.savefig(out_dir / filename)
        plt.close(fig)
        files.append(filename)
    return files


# -- writing --------------------------------------------------------------------------------------------------
def write_all(results: dict, out_dir: Path) -> dict[str, Path]:
    out_dir.mkdir(parents=True, exist_ok=True)
    images = plot(results, out_dir)
    json_path = out_dir / "results.json"
    json_path.write_text(json.dumps(results, indent=1, default=str) + "\n")
    md_path = out_dir / "results.md"
    md_path.write_text(markdown(results, images))
    return {"json": json_path, "md": md_path, **{Path(i).stem: out_dir / i for i in images}}


README_BEGIN = "<!-- latest-results:begin -->"
README_END = "<!-- latest-results:end -->"


def update_readme(readme: Path, results: dict, image_prefix: str) -> bool:
    """Replace the README's latest-results section with this run's table, ratios and plots."""
    text = readme.read_text()
    if README_BEGIN not in text or README_END not in text:
        return False
    meta = results["meta"]
    parts = [README_BEGIN, "", f"From `{meta['command']}` on {meta['date']}, {meta['machine']}; udpflannel code: "
             f"{meta.get('udpflannel_code', meta['commit'])}.",
             "", main_table(results), "", foreign_line(results), ""]
    if "vxlan" in results["rows"]:
        parts += ["Ratio to kernel VXLAN from the same run:", "", ratio_table(results, "vxlan"), ""]
    if "p50_ratio" in (results.get("rtt_pairs") or {}):
        parts += ["RTT of the fast path and the per-packet path, paired (the table's RTT cells move ±10 % from lab "
                  "to lab, more than the two paths differ):", "", pairs_text(results), ""]
    parts += ["¹ kernel rows: the whole machine's system + softirq + irq time (no process of their own), so not "
              "compared across kinds; ² all non-idle CPU, generators included; ³ not applicable, reasons in the "
              "full report; ≥ generator-limited (a lower bound). Medians (min–max) over the repeats.", "",
              f"![throughput]({image_prefix}throughput.png) ![latency]({image_prefix}latency.png)", "",
              f"Full report with notes: [{image_prefix}results.md]({image_prefix}results.md).", "", README_END]
    head, rest = text.split(README_BEGIN, 1)
    _, tail = rest.split(README_END, 1)
    readme.write_text(head + "\n".join(parts) + tail)
    return True
