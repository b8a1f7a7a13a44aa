"""The report's outputs from built results (``benchmarks.report.build_results``): ``results.md`` (Markdown
tables and notes), PNG plots, ``results.json``, and the latest-results block of benchmarks/README.md."""

from __future__ import annotations

import json
import re
import statistics
import textwrap
from pathlib import Path

from benchmarks.report import (
    GENERATOR_LIMITED_MARK,
    GROUP_LABELS,
    METRICS,
    REFERENCES,
    Metric,
    pairs_text,
    turns_text,
)


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
    if (results.get("sparse_turns") or {}).get("per_row"):
        lines += ["### Sparse round trips, the rows taking turns in one lab", "", turns_text(results), ""]
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
    body = []
    for m in METRICS:
        cells = [fmt_ratio(results["ratios"][n][ref][m.key]) for n in names]
        if any(cell != "—" for cell in cells):  # a metric the reference has no figure for says nothing here
            body.append(f"| {m.label} | " + " | ".join(cells) + " |")
    return "\n".join([head, sep, *body])


def detail_table(results: dict) -> str:
    labels = {"cpu_s_per_gb": "CPU-s/GB", "ctx_vol_per_kpkt": "vol. cs/1k pkt", "ctx_invol_per_kpkt": "invol. cs/1k pkt",
              "syscalls_per_pkt": "syscalls/pkt", "pkts_per_tun_wakeup": "pkts/TUN wake-up",
              "pkts_per_udp_wakeup": "pkts/UDP wake-up", "tx_seg_per_tun_read": "data: segs/TUN read",
              "tx_seg_per_sendmsg": "data: segs/sendmsg", "rx_seg_per_recvmsg": "data: segs/recvmsg",
              "rx_seg_per_tun_write": "data: segs/TUN write", "ack_seg_per_sendmsg": "ACKs: segs/sendmsg",
              "ack_seg_per_tun_write": "ACKs: segs/TUN write"}
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
        "- Sparse round trips: the dataplane's CPU per ping round trip at 200 Hz is the run time of its "
        "threads on both nodes (/proc/<pid>/task/*/schedstat, exact) over the replies; a round trip crosses "
        "each node's daemon twice, so it holds four passes. Wake-ups per round trip: the same threads' "
        "voluntary context switches (each pass that finds the daemon asleep costs one). See docs/latency.md.",
        "- Daemon CPU with no traffic: the last group of each repeat starts the daemons afresh, lets the pods "
        "ping once through them, then sends nothing for a while (10 s in a full run); the daemons' run time "
        "(schedstat) over that window, per daemon, as a share of one CPU.",
        "- ⁴ Segments per syscall, from each node's daemon counters, on the data's way: per sendmsg on the "
        "sending node (UDP_SEGMENT batches), per TUN write on the receiving node(s) (merged super-packets); the "
        "table of per-packet costs has both directions (data, and the ACKs coming back) and the reads too. "
        "TCP 4 streams × 3 peers runs on a lab of its own: 4 nodes on one underlay, pod 1 sending 4 streams to "
        "the pod on each other node at once (one iperf3 client per peer).",
        "- Context switches: /proc/<pid>/task/*/status of the dataplane processes, per 1000 packets they "
        "handled (the daemons' counters, both nodes, both directions: a pod-to-pod packet is handled once by "
        "each node, so it counts twice). Syscalls per packet: the daemons' counters (TUN reads/writes + UDP "
        "recvs/sends, EAGAIN attempts included) over the same packets: 2.0 is one read and one write each.",
        "- ⁵ Peak RSS: VmHWM of /proc/<pid>/status, the larger of the two nodes' daemons (a node's process tree "
        "summed): at rest = before the first traffic, once the daemons were ready and the pods had pinged each "
        "other; after bulk TCP = after the 1-stream transfer, whose peak it includes (the daemons restart for "
        "each traffic type, so the two readings belong to one start). Kernel rows have no process.",
        "- ⁶ Start-up to ready: from starting each node's process to the last write of its subnet.env (the "
        "daemons write it when ready; its mtime, not when the harness noticed), the slower node; median over "
        "every start in a repeat (the rows with counters restart for each traffic type).",
        f"- {meta['cpus']} CPUs shared by the generators, both nodes' dataplanes and the kernel: userspace "
        "rows compete with iperf3 for the same cores, which a real two-host deployment would not.",
    ]


# -- plots ----------------------------------------------------------------------------------------------------
TICK_WIDTH = 12  # characters per line of an x label: "udpflannel" fits, flags go on a line of their own


def tick_label(name: str) -> str:
    """A row's name over as many lines as it needs, broken at spaces only (never inside a flag), so
    neighbouring labels such as "udpflannel --no-fast-path" and "udpflannel daemon" never overlap."""
    return textwrap.fill(name, TICK_WIDTH, break_long_words=False, break_on_hyphens=False)


def plot(results: dict, out_dir: Path) -> list[str]:
    """Throughput, latency, packet rate and CPU/GB bar charts with min–max whiskers; returns file names."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = results["rows"]
    names = list(rows)
    subtitle = f"{results['meta']['machine_short']} · {results['meta']['date']}"
    charts = [
        ("throughput.png", "TCP throughput pod→pod (higher is better)", "Gb/s",
         ["tcp1_gbps", "tcp1_bbr_gbps", "tcp4_gbps", "tcp8_gbps", "tcp4x3_gbps"],
         ["1 stream", "1 stream, BBR", "4 streams", "8 streams", "4 streams × 3 peers"]),
        ("latency.png", "Round-trip time: back-to-back TCP and sparse ping at 200 Hz (lower is better)", "µs",
         ["rtt_p50_us", "rtt_p99_us", "ping200_p50_us", "ping200_p99_us"],
         ["TCP RR p50", "TCP RR p99", "ping 200 Hz p50", "ping 200 Hz p99"]),
        ("packet_rate.png", "UDP forwarding rate (hatched: generator-limited, a lower bound)", "kpps",
         ["udp64_kpps", "udp1400_kpps"], ["64 B", "1400 B"]),
        ("cpu_per_gb.png", "CPU seconds per GB, TCP 1 stream (lower is better)", "CPU-s/GB",
         ["cpu_s_per_gb", "machine_cpu_s_per_gb"], ["dataplane (kernel rows: sys+softirq)", "whole machine"]),
    ]
    files = []
    for filename, title, unit, keys, labels in charts:
        fig, ax = plt.subplots(figsize=(max(7.5, 1.1 * len(names) + 1.5), 4.4), dpi=110)  # ~1.1 in per row
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
            for bar, hatch, h, up in zip(bars, hatches, heights, hi, strict=True):
                bar.set_hatch(hatch)  # the value above the whisker, where no line crosses it
                ax.annotate(fmt_number(h, 2 if h < 10 else 1), (bar.get_x() + bar.get_width() / 2, h + up),
                            ha="center", va="bottom", fontsize=7, xytext=(0, 2), textcoords="offset points")
        ax.set_xticks(range(len(names)), [tick_label(name) for name in names], fontsize=8)
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
_NUMBER_LIST = re.compile(r"\[\n[ ]*(-?[0-9.eE+-]+(?:,\n[ ]*-?[0-9.eE+-]+)*)\n[ ]*\]")


def compact_number_lists(text: str) -> str:
    """Indented JSON with every list of plain numbers on one line: the sparse turns keep every round
    trip, and one number per line would more than double the file for nothing a reader wants."""
    return _NUMBER_LIST.sub(lambda m: "[" + ", ".join(x.strip() for x in m.group(1).split(",\n")) + "]", text)


def write_all(results: dict, out_dir: Path) -> dict[str, Path]:
    out_dir.mkdir(parents=True, exist_ok=True)
    images = plot(results, out_dir)
    json_path = out_dir / "results.json"
    json_path.write_text(compact_number_lists(json.dumps(results, indent=1, default=str)) + "\n")
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
    if (results.get("sparse_turns") or {}).get("per_row"):
        parts += ["Sparse round trips (ping at 200 Hz), the rows taking turns in one lab (the table's sparse cells "
                  "come from labs minutes apart, and this machine's round trips drift by more than the rows differ):",
                  "", turns_text(results), ""]
    parts += ["¹ kernel rows: the whole machine's system + softirq + irq time (no process of their own), so not "
              "compared across kinds; ² all non-idle CPU, generators included; ³ not applicable, reasons in the "
              "full report; ⁴ segments per syscall on the data's way (daemon counters: sendmsg on the sending "
              "node, TUN write on the receiving ones); ⁵ VmHWM, the larger node's daemon; ⁶ process start to "
              "subnet.env written; ≥ generator-limited (a lower bound). Medians (min–max) over the repeats.", "",
              f"![throughput]({image_prefix}throughput.png) ![latency]({image_prefix}latency.png)", "",
              f"Full report with notes: [{image_prefix}results.md]({image_prefix}results.md).", "", README_END]
    head, rest = text.split(README_BEGIN, 1)
    _, tail = rest.split(README_END, 1)
    readme.write_text(head + "\n".join(parts) + tail)
    return True
