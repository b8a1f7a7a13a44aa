"""From raw per-repeat results to results: metrics, aggregates, ratios, paired RTT (``benchmarks.render``
writes them out as ``results.json``, ``results.md`` and PNG plots).

Pure functions over plain dicts (no I/O until ``write_*``), so the aggregation and ratio rules are
unit-tested without a lab. A metric's value for one repeat is ``{"value": x, ...}`` or
``{"unsupported": reason}`` (or ``{"error": reason}`` when that repeat's measurement failed); the
aggregate over repeats is ``{"median", "min", "max", "n", "values", ...}`` or ``{"unsupported": reason}``.
"""

from __future__ import annotations

import random
import statistics
from dataclasses import dataclass

from benchmarks.rr import percentile

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
    Metric("tcp8_gbps", "TCP pod→pod, 8 streams", "Gb/s", "higher", 2),
    Metric("tcp4x3_gbps", "TCP pod→3 pods on 3 nodes, 4 streams each (4-node lab)", "Gb/s", "higher", 2),
    Metric("rtt_p50_us", "TCP request/response RTT p50", "µs", "lower", 0),
    Metric("rtt_p99_us", "TCP request/response RTT p99", "µs", "lower", 0),
    Metric("ping200_p50_us", "Sparse ping RTT p50 (200 Hz)", "µs", "lower", 0),
    Metric("ping200_p99_us", "Sparse ping RTT p99 (200 Hz)", "µs", "lower", 0),
    Metric("udprr200_p50_us", "Sparse UDP request/response RTT p50 (200 Hz)", "µs", "lower", 0),
    Metric("udprr200_p99_us", "Sparse UDP request/response RTT p99 (200 Hz)", "µs", "lower", 0),
    Metric("ping200_cpu_us", "Dataplane CPU per sparse ping round trip (both nodes)", "µs", "lower", 0,
           same_measure_for_kernel=False),
    Metric("ping200_wakeups", "Daemon wake-ups per sparse ping round trip (voluntary switches)", "", "lower", 1,
           same_measure_for_kernel=False),
    Metric("idle_cpu_pct", "Daemon CPU with no traffic, per daemon (share of one CPU)", "%", "lower", 3,
           same_measure_for_kernel=False),
    Metric("udp64_kpps", "UDP 64 B forwarding rate", "kpps", "higher", 0),
    Metric("udp1400_kpps", "UDP 1400 B forwarding rate", "kpps", "higher", 0),
    Metric("cpu_s_per_gb", "Dataplane CPU per GB (TCP 1 stream)¹", "CPU-s/GB", "lower", 2, same_measure_for_kernel=False),
    Metric("machine_cpu_s_per_gb", "Whole-machine CPU per GB (TCP 1 stream)²", "CPU-s/GB", "lower", 2),
    Metric("machine_cpu_s_per_gb_tcp4", "Whole-machine CPU per GB (TCP 4 streams)²", "CPU-s/GB", "lower", 2),
    Metric("ctx_vol_per_kpkt", "Voluntary context switches / 1000 packets (TCP 1 stream)", "", "lower", 1),
    Metric("ctx_invol_per_kpkt", "Involuntary context switches / 1000 packets (TCP 1 stream)", "", "lower", 1),
    Metric("syscalls_per_pkt", "Syscalls / packet (TCP 1 stream, daemon counters)", "", "lower", 2),
    # the data's direction: segments per sendmsg on the sending node, per TUN write on the receiving one(s)
    *(Metric(f"{what}_{group}", f"Segments / {call} (TCP {label}, {side})⁴", "", "higher", 1)
      for group, label in (("tcp1", "1 stream"), ("tcp4", "4 streams"), ("tcp8", "8 streams"), ("tcp4x3", "4 × 3 peers"))
      for what, call, side in (("seg_per_sendmsg", "sendmsg", "sending node"), ("seg_per_tun_write", "TUN write",
                                                                                 "receiving node"))),
    Metric("rss_rest_mib", "Peak RSS per daemon, at rest after start-up⁵", "MiB", "lower", 0),
    Metric("rss_bulk_mib", "Peak RSS per daemon, after bulk TCP (1 stream)⁵", "MiB", "lower", 0),
    Metric("startup_s", "Start-up to ready⁶", "s", "lower", 2),
)
# Metrics only on the many-peers lab (benchmarks.runner.PEERS_GROUPS), which a quick run leaves out
PEERS_METRICS = ("tcp4x3_gbps", "seg_per_sendmsg_tcp4x3", "seg_per_tun_write_tcp4x3")
NO_TUN = "kernel dataplane: no TUN and no sendmsg per segment (the kernel's own GRO/GSO)"
METRIC_BY_KEY = {m.key: m for m in METRICS}

NO_PROCESS = "kernel dataplane: no process of its own, forwarding runs in softirq context"
NO_COUNTERS = "this dataplane has no counters interface (strace it by hand)"


# -- one repeat -> metric values ----------------------------------------------------------------------------
def _value(x: float, **extra) -> dict:
    return {"value": float(x), **extra}


class NotMeasured(LookupError):
    """The run left the group out on purpose (the reason is the argument): unsupported, not failed."""


def _group(run: dict, name: str) -> dict:
    """The group's result, or raise KeyError/LookupError with the reason it is missing."""
    if name in run.get("not_measured", {}):
        raise NotMeasured(run["not_measured"][name])
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
    out.update(segments_per_call(group.get("node_counters")))
    if counters and counters.get("packets"):
        out["syscalls_per_pkt"] = counters["syscalls"] / counters["packets"]
        if counters.get("tun_wakeups"):
            out["pkts_per_tun_wakeup"] = counters["tun_packets"] / counters["tun_wakeups"]
        if counters.get("udp_wakeups"):
            out["pkts_per_udp_wakeup"] = counters["udp_packets"] / counters["udp_wakeups"]
    return out


def segments_per_call(nodes: dict | None) -> dict:
    """Segments (wire packets) per syscall in each direction, from each node's counters: the data goes
    from node 1 to the others, their ACKs come back. ``tx_``: node 1 (TUN reads of super-packets,
    sendmsg with UDP_SEGMENT); ``rx_``: the receiving nodes (recvmsg with UDP_GRO, TUN writes of merged
    super-packets); ``ack_``: the same calls for the ACKs (sendmsg on the receivers, TUN writes on node 1)."""
    if not nodes:
        return {}
    sender = nodes.get("1") or nodes.get(1)
    receivers = [c for i, c in nodes.items() if str(i) != "1"]
    if not sender or not receivers:
        return {}

    def per(counters: list[dict], packets: str, calls: str) -> float | None:
        n = sum(c.get(calls, 0) for c in counters)
        return sum(c.get(packets, 0) for c in counters) / n if n else None

    out = {
        "tx_seg_per_tun_read": per([sender], "tun_packets", "tun_reads"),
        "tx_seg_per_sendmsg": per([sender], "sent_packets", "udp_sends"),
        "rx_seg_per_recvmsg": per(receivers, "udp_packets", "udp_recvs"),
        "rx_seg_per_tun_write": per(receivers, "delivered_packets", "tun_writes"),
        "ack_seg_per_sendmsg": per(receivers, "sent_packets", "udp_sends"),
        "ack_seg_per_tun_write": per([sender], "delivered_packets", "tun_writes"),
    }
    return {k: v for k, v in out.items() if v is not None}


def metrics_from_run(kind: str, has_counters: bool, run: dict) -> dict[str, dict]:
    """Every metric of one repeat of one dataplane: a value, or why not."""
    out: dict[str, dict] = {}

    def put(key: str, fn) -> None:
        try:
            out[key] = fn()
        except NotMeasured as exc:
            out[key] = {"unsupported": str(exc.args[0])}
        except LookupError as exc:
            out[key] = {"error": str(exc.args[0]) if exc.args else "missing"}

    for group in ("tcp1", "tcp1_bbr", "tcp4", "tcp8", "tcp4x3"):
        put(f"{group}_gbps", lambda group=group: _value(_group(run, group)["gbps"]))
    put("rtt_p50_us", lambda: _value(_group(run, "rr")["p50_us"], n=_group(run, "rr")["n"]))
    put("rtt_p99_us", lambda: _value(_group(run, "rr")["p99_us"], n=_group(run, "rr")["n"]))
    for group in ("ping200", "udprr200"):
        for q in ("p50", "p99"):
            put(f"{group}_{q}_us", lambda group=group, q=q: _value(_group(run, group)[f"{q}_us"], n=_group(run, group)["n"],
                                                                  lost=_group(run, group)["lost"]))

    def per_round_trip(key: str):
        def fn():
            g = _group(run, "ping200")
            if kind == "kernel":
                return {"unsupported": NO_PROCESS}
            total = g["window"]["dataplane_run_us" if key == "cpu" else "ctx_voluntary"]
            if total is None or not g["n"]:
                raise LookupError(f"ping200_{key}: no dataplane process or no reply to account for")
            return _value(total / g["n"], n=g["n"])
        return fn

    put("ping200_cpu_us", per_round_trip("cpu"))
    put("ping200_wakeups", per_round_trip("wakeups"))

    def idle():
        g = _group(run, "idle")
        if kind == "kernel":
            return {"unsupported": NO_PROCESS}
        w = g["window"]
        if w["dataplane_run_us"] is None or not w["seconds"]:
            raise LookupError("idle: no dataplane process to account for")
        return _value(w["dataplane_run_us"] / 1e6 / w["seconds"] / 2 * 100, seconds=w["seconds"])  # two daemons

    put("idle_cpu_pct", idle)
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
    put("machine_cpu_s_per_gb_tcp4", lambda: _value(_need(group_cost(kind, _group(run, "tcp4")).get("machine_cpu_s_per_gb"))))

    def segments(key: str, group: str):
        def fn():
            g = _group(run, group)
            if kind == "kernel":
                return {"unsupported": NO_TUN}
            if not has_counters:
                return {"unsupported": NO_COUNTERS}
            return _value(_need(segments_per_call(g.get("node_counters")).get(f"{'tx' if 'sendmsg' in key else 'rx'}_{key}")))
        return fn

    for group in ("tcp1", "tcp4", "tcp8", "tcp4x3"):
        for key in ("seg_per_sendmsg", "seg_per_tun_write"):
            put(f"{key}_{group}", segments(key, group))

    def rss(when: str):
        def fn():
            if kind == "kernel":
                return {"unsupported": NO_PROCESS}
            peaks = _group(run, "tcp1").get("peak_rss_kb")
            if not peaks or not peaks.get(when):
                raise LookupError("no process to read VmHWM from")
            return _value(max(peaks[when].values()) / 1024, nodes_kib=peaks[when])
        return fn

    def startup():
        if kind == "kernel":
            return {"unsupported": NO_PROCESS}
        if "setup_error" in run:
            raise LookupError(run["setup_error"])
        starts = run.get("startup_s")
        if not starts:
            return {"unsupported": "no readiness file to time (readiness is a ping through the dataplane)"}
        return _value(statistics.median(starts), starts=starts)

    put("rss_rest_mib", rss("before"))
    put("rss_bulk_mib", rss("after"))
    put("startup_s", startup)
    return out


def _need(value: float | None) -> float:
    if value is None:
        raise LookupError("too little traffic to compute")
    return value


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
            "rtt_pairs": summarize_pairs(raw.get("rtt_pairs") or []),
            "sparse_turns": summarize_turns(raw.get("sparse_turns") or []), "raw": raw["rows"]}


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


def ratio_summary(ratios: list[float]) -> dict:
    """Ratios of one row's figure to another's, one per pair or round: their median, its bootstrap 95 %
    interval, the share of them ≤ 1 (the first row not slower) and how many there were."""
    lo, hi = bootstrap_median_ci(ratios)
    return {"median": statistics.median(ratios), "ci95": [lo, hi],
            "not_slower_share": sum(r <= 1 for r in ratios) / len(ratios), "n": len(ratios)}


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
        out[key] = ratio_summary([p[a][field] / p[b][field] for p in complete if p[b][field] > 0])
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


# -- sparse round trips, the rows taking turns in one lab (benchmarks.turns) ---------------------------------
TURNS_REFERENCE = "flanneld"  # the latency goals are set against flannel's own UDP backend
TAIL_LIMIT = 2.0  # the goal: p99 ≤ 2× the path's own p50


def summarize_turns(labs: list[dict]) -> dict:
    """Turns of the rows in one lab per repeat (``benchmarks.turns``) → per row: percentiles of every
    round trip pooled over its turns, the medians of the per-turn p50 and p99, the daemons' CPU and
    wake-ups per round trip; per round, each row's p50 and p99 ÷ flanneld's (the same round, the same
    lab), with a bootstrap interval of the median ratio; and the latency goals checked."""
    if not labs:
        return {"unsupported": "no sparse turns in this run (--sparse-rounds 0, or a row is missing)"}
    names = labs[0]["rows"]
    out: dict = {"rows": names, "labs": len(labs), "count": labs[0].get("count"),
                 "errors": [lab["error"] for lab in labs if "error" in lab], "raw": labs, "per_row": {}}
    turns = [(i, t) for i, lab in enumerate(labs) for t in lab["turns"]]
    ranked = {id(t): sorted(t["samples_us"]) for _, t in turns}  # each turn's round trips, sorted once
    for name in names:
        mine = [t for _, t in turns if t["row"] == name]
        if not mine:
            continue
        pooled = sorted(x for t in mine for x in t["samples_us"])
        per_turn = [ranked[id(t)] for t in mine]
        cpu = [t["cpu_us_per_rt"] for t in mine if t["cpu_us_per_rt"] is not None]
        wake = [t["wakeups_per_rt"] for t in mine if t["wakeups_per_rt"] is not None]
        p50, p99 = percentile(pooled, 0.50), percentile(pooled, 0.99)
        out["per_row"][name] = {
            "turns": len(mine), "n": len(pooled), "lost": sum(t["lost"] for t in mine),
            "p50_us": p50, "p90_us": percentile(pooled, 0.90), "p99_us": p99, "tail_ratio": p99 / p50,
            "turn_p50_us": statistics.median(percentile(v, 0.50) for v in per_turn),
            "turn_p99_us": statistics.median(percentile(v, 0.99) for v in per_turn),
            "cpu_us_per_rt": statistics.median(cpu) if cpu else None,
            "wakeups_per_rt": statistics.median(wake) if wake else None,
            "nodes": {node: {key: statistics.median(t["nodes"][node][key] for t in mine if node in t.get("nodes", {}))
                             for key in ("cpu_us", "runq_us", "wakeups")}
                      for node in sorted({n for t in mine for n in t.get("nodes", {})})},
        }
    ref = TURNS_REFERENCE if TURNS_REFERENCE in out["per_row"] else None
    out["reference"] = ref
    if ref is None:
        return {**out, "unsupported": f"{TURNS_REFERENCE} took no turn in this run"}
    by_round: dict[tuple[int, int], dict[str, dict]] = {}
    for i, t in turns:
        by_round.setdefault((i, t["round"]), {})[t["row"]] = t
    out["vs_reference"] = {}
    for name in names:
        if name == ref or name not in out["per_row"]:
            continue
        entry = {}
        for key, q in (("p50_ratio", 0.50), ("p99_ratio", 0.99)):
            ratios = [percentile(ranked[id(r[name])], q) / percentile(ranked[id(r[ref])], q)
                      for r in by_round.values() if name in r and ref in r]
            if ratios:
                entry[key] = ratio_summary(ratios)
        out["vs_reference"][name] = entry
    r = out["per_row"]
    out["goals"] = {name: {"p50_le_reference": r[name]["p50_us"] <= r[ref]["p50_us"],
                           "p99_le_reference": r[name]["p99_us"] <= r[ref]["p99_us"],
                           "p99_le_2x_p50": r[name]["tail_ratio"] <= TAIL_LIMIT}
                    for name in names if name.startswith("udpflannel") and name in r}
    return out


def turns_text(results: dict) -> str:
    s = results.get("sparse_turns") or {}
    if "per_row" not in s or not s["per_row"]:
        return f"Not measured: {s.get('unsupported', 'no sparse turns in this run')}"
    rounds = max((t["round"] for lab in s["raw"] for t in lab["turns"]), default=-1) + 1
    lines = [f"{s['labs']} lab(s), one per repeat; in each, {rounds} rounds in which every row takes a turn (the order "
             f"rotates), each turn {s['count']} pings at 200 Hz from pod 1 to pod 2 after a fresh start of the row. "
             "Percentiles of every round trip pooled over the turns; CPU and wake-ups are the daemons' on both "
             "nodes, per round trip (medians over the turns):", "",
             "| row | p50 | p90 | p99 | p99 ÷ p50 | median of the turns' p50 / p99 | CPU per round trip | wake-ups per round trip |",
             "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for name, r in s["per_row"].items():
        cpu = "–" if r["cpu_us_per_rt"] is None else f"{r['cpu_us_per_rt']:.0f} µs"
        wake = "–" if r["wakeups_per_rt"] is None else f"{r['wakeups_per_rt']:.1f}"
        lines.append(f"| {name} | {r['p50_us']} µs | {r['p90_us']} µs | {r['p99_us']} µs | {r['tail_ratio']:.2f} | "
                     f"{r['turn_p50_us']:.0f} / {r['turn_p99_us']:.0f} µs | {cpu} | {wake} |")
    hops = [(name, node, v) for name, r in s["per_row"].items() for node, v in r.get("nodes", {}).items()]
    if hops:
        lines += ["", "Per node and round trip (node 1 sends the request and takes the reply, node 2 the other way): "
                  "the daemon's CPU, its time woken but waiting for a CPU (schedstat's run-queue wait) and its "
                  "wake-ups, medians over the turns:", "",
                  "| row | node | CPU | waiting for a CPU | wake-ups |", "|---|---:|---:|---:|---:|"]
        lines += [f"| {name} | {node} | {v['cpu_us']:.0f} µs | {v['runq_us']:.1f} µs | {v['wakeups']:.2f} |"
                  for name, node, v in hops]
    ref = s.get("reference")
    if ref and s.get("vs_reference"):
        lines += ["", f"Round by round against {ref} (same lab, same round): median ratio, 95 % bootstrap interval, "
                  f"share of rounds not slower than {ref}:", ""]
        for name, entry in s["vs_reference"].items():
            parts = [f"{label} **{e['median']:.2f}×** ({e['ci95'][0]:.2f}–{e['ci95'][1]:.2f}; "
                     f"{e['not_slower_share'] * 100:.0f} %)"
                     for label, e in (("p50", entry.get("p50_ratio")), ("p99", entry.get("p99_ratio"))) if e]
            lines.append(f"- {name}: " + ", ".join(parts))
    if s.get("goals"):
        mark = {True: "met", False: "**not met**"}
        lines += ["", f"Latency goals (issue 21), pooled figures: p50 ≤ {ref}'s, p99 ≤ {ref}'s, p99 ≤ "
                  f"{TAIL_LIMIT:g}× the row's own p50:", ""]
        lines += [f"- {name}: {mark[g['p50_le_reference']]}, {mark[g['p99_le_reference']]}, {mark[g['p99_le_2x_p50']]}"
                  for name, g in s["goals"].items()]
    if s["errors"]:
        lines += ["", "Failed: " + "; ".join(s["errors"])]
    return "\n".join(lines)


GROUP_LABELS = {"tcp1": "TCP 1 stream", "tcp1_bbr": "TCP 1 stream, BBR", "tcp4": "TCP 4 streams", "tcp8": "TCP 8 streams",
                "tcp4x3": "TCP 4 streams × 3 peers", "rr": "request/response",
                "ping200": "ping at 200 Hz", "udprr200": "UDP request/response at 200 Hz", "udp64": "UDP 64 B flood", "udp1400": "UDP 1400 B flood"}
DETAIL_KEYS = ("cpu_s_per_gb", "ctx_vol_per_kpkt", "ctx_invol_per_kpkt", "syscalls_per_pkt",
               "pkts_per_tun_wakeup", "pkts_per_udp_wakeup", "tx_seg_per_tun_read", "tx_seg_per_sendmsg",
               "rx_seg_per_recvmsg", "rx_seg_per_tun_write", "ack_seg_per_sendmsg", "ack_seg_per_tun_write")


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
