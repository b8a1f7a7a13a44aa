"""The soak (issue 17 item 4): bulk TCP, request/response and lease churn together for a long time, and
proof that nothing grows and nothing is lost.

    python -m benchmarks --soak [--soak-minutes 10] [--out benchmarks/results]   # soak.md and soak.json

The lab: one etcd, 1,000 simulated nodes (``udpflannel.lab.leasewriter``), two udpflannel daemons (fast
path) with a pod each. For the whole run pod 1 sends to pod 2 with iperf3 at full speed, pod 2 asks pod
1 request/response round trips (``benchmarks/rr.py``, 20 s connections back to back), and 20 leases are
added and 20 removed a second. Every ``sample_every`` seconds each daemon's RSS, open file descriptors,
threads, asyncio tasks (its gauge, both loops) and etcd requests are read, and etcd's lease count.

Afterwards (traffic stopped, 2 s to drain) the checks:

- flat after warm-up: from the first sample after ``warmup`` to the last, RSS grows by at most
  ``rss_growth_mb`` MB, and file descriptors, threads, asyncio tasks and etcd leases do not change;
- counters consistent, per direction: inside each daemon, packets read = forwarded + counted drops +
  send/write errors; between them, what node A sent = what node B's daemon received + the datagrams B's
  kernel dropped before the daemon read them (its UDP receive errors);
- every warning or error in the daemons' logs is one the list below explains (none is expected).

tests/test_soak.py runs the same for 2 minutes in the suite.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from benchmarks.measure import machine_busy_fraction
from udpflannel.lab.cluster import Cluster, log_lines
from udpflannel.lab.netns import Lab
from udpflannel.lab.scale import (
    SCALE_CONFIG,
    BackgroundWriter,
    daemon_pid,
    fd_count,
    rss_kib,
    scrape,
    status,
    writer,
)

RR = Path(__file__).resolve().parent / "rr.py"
RR_PORT, RR_SIZE, RR_CHUNK = 5300, 64, 20.0
NODES = (1, 2)
EXPLAINED_WARNINGS: dict[str, str] = {}  # message prefix -> why it is expected; none is, so far


@dataclass
class SoakSettings:
    seconds: float = 600.0
    warmup: float = 60.0
    sample_every: float = 10.0
    churn_rate: int = 20
    simulated: int = 1000
    rss_growth_mb: float = 4.0

    def describe(self) -> str:
        return (f"{self.seconds / 60:g} min: iperf3 pod 1 -> pod 2 at full speed, request/response pod 2 -> pod 1 "
                f"({RR_SIZE} B, {RR_CHUNK:g} s connections), {self.churn_rate} leases added and {self.churn_rate} "
                f"removed a second, among {self.simulated} simulated nodes; samples every {self.sample_every:g} s, "
                f"warm-up {self.warmup:g} s")


@dataclass
class Soak:
    cluster: Cluster
    settings: SoakSettings
    samples: list[dict] = field(default_factory=list)
    rr: list[dict] = field(default_factory=list)


def build(cluster: Cluster, settings: SoakSettings) -> Soak:
    """On a started ``Cluster``: the simulated nodes, two daemons and their pods."""
    cluster.put_config(SCALE_CONFIG)
    writer(cluster, "fill", 0, settings.simulated)
    for i in NODES:
        cluster.start_node(i)
    for i in NODES:
        cluster.wait_ready(i, timeout=60)
        cluster.add_pod(i, cni=False)
    return Soak(cluster, settings)


def sample(soak: Soak, t: float) -> dict:
    out: dict = {"t": round(t, 1), "etcd_leases": len(json.loads(soak.cluster.etcd.ctl(
        "lease", "list", "-w", "json")).get("leases") or [])}
    for i in NODES:
        n = soak.cluster.nodes[i]
        pid = daemon_pid(n)
        metrics = scrape(n)
        with open(f"/proc/{pid}/status") as f:
            threads = next(int(line.split()[1]) for line in f if line.startswith("Threads:"))
        out[f"node{i}"] = {
            "rss_kib": rss_kib(pid), "fds": fd_count(pid), "threads": threads,
            "tasks": int(metrics["udpflannel_asyncio_tasks"]), "peers": int(metrics["udpflannel_peers"]),
            "etcd_requests": int(sum(v for k, v in metrics.items() if k.startswith("udpflannel_etcd_"))),
        }
    return out


def run(soak: Soak, progress=print) -> dict:
    """Drive the load for ``settings.seconds``, sampling; then drain and check. Returns the report."""
    s, c = soak.settings, soak.cluster
    pods = {i: c.nodes[i].pod for i in NODES}
    assert all(pods.values())
    busy_before = machine_busy_fraction(1.0)
    iperf_server = pods[2].popen(["iperf3", "-s", "-1"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    rr_server = pods[1].popen([sys.executable, str(RR), "server", str(RR_PORT), str(RR_SIZE), "60"],
                              stdout=subprocess.PIPE, text=True)
    assert rr_server.stdout is not None and rr_server.stdout.readline().strip() == "listening"
    time.sleep(0.5)
    t0 = time.monotonic()
    bulk = pods[1].popen(["iperf3", "-c", str(pods[2].address), "-t", str(int(s.seconds)), "-J"],
                         stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    churn = BackgroundWriter(c, "churn", 9000, s.churn_rate, s.seconds - 2)
    rr_client: subprocess.Popen | None = None
    next_sample = 0.0
    try:
        while (elapsed := time.monotonic() - t0) < s.seconds:
            if rr_client is not None and rr_client.poll() is not None:
                soak.rr.append(_rr_result(rr_client))
                rr_client = None
            if rr_client is None:
                chunk = min(RR_CHUNK, s.seconds - elapsed - 1)
                if chunk > 2:
                    rr_client = pods[2].popen([sys.executable, str(RR), "client", str(pods[1].address), str(RR_PORT),
                                               str(RR_SIZE), "10000000", "100", str(chunk)],
                                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
            if elapsed >= next_sample:
                soak.samples.append(sample(soak, elapsed))
                progress(f"soak {elapsed:5.0f}/{s.seconds:.0f} s: " + ", ".join(
                    f"node {i} RSS {soak.samples[-1][f'node{i}']['rss_kib'] / 1024:.1f} MB" for i in NODES))
                next_sample += s.sample_every
            time.sleep(0.5)
        churn_writes, churn_summary = churn.finish(timeout=60)
        bulk_out, _ = bulk.communicate(timeout=60)
        if rr_client is not None:
            rr_client.wait(timeout=30)
            soak.rr.append(_rr_result(rr_client))
    finally:
        for p in (bulk, rr_client, rr_server, iperf_server, churn.proc):
            if p is not None and p.poll() is None:
                p.kill()
    time.sleep(2)  # drain: nothing in flight when the counters are read
    soak.samples.append(sample(soak, time.monotonic() - t0))
    busy_during = machine_busy_fraction(1.0)
    bulk_json = json.loads(bulk_out[bulk_out.index("{"):])
    report = {
        "settings": asdict(s), "settings_text": s.describe(),
        "machine_busy_pct_before": round(busy_before * 100), "machine_busy_pct_after": round(busy_during * 100),
        "samples": soak.samples,
        "bulk_gbps": round(bulk_json["end"]["sum_received"]["bits_per_second"] / 1e9, 3),
        "bulk_bytes": bulk_json["end"]["sum_received"]["bytes"],
        "rr": soak.rr, "churn": {**churn_summary, "events": len(churn_writes)},
        "counters": {i: status(c.nodes[i])["counters"] for i in NODES},
        "kernel_udp": {i: {k: v for k, v in c.nodes[i].node.snmp().items() if k.startswith("Udp")} for i in NODES},
        "warnings": {i: [f"{level} {text}" for _, level, _, text in log_lines(c.nodes[i].log()) if level in "WEC"]
                     for i in NODES},
    }
    report["checks"] = check(report)
    return report


# -- checks ---------------------------------------------------------------------------------------------------

def flatness(report: dict) -> dict:
    s = report["settings"]
    after = [x for x in report["samples"] if x["t"] >= s["warmup"]]
    first, last = after[0], after[-1]
    out = {"from_t": first["t"], "to_t": last["t"], "etcd_leases": [first["etcd_leases"], last["etcd_leases"]],
           "etcd_leases_range": [min(x["etcd_leases"] for x in after), max(x["etcd_leases"] for x in after)]}
    for i in NODES:
        key = f"node{i}"
        out[key] = {m: {"first": first[key][m], "last": last[key][m], "min": min(x[key][m] for x in after),
                        "max": max(x[key][m] for x in after)} for m in ("rss_kib", "fds", "threads", "tasks", "etcd_requests")}
    return out


def consistency(report: dict) -> list[dict]:
    """Per direction: inside each daemon and between the two (see the module docstring)."""
    c, k = report["counters"], report["kernel_udp"]
    rows = []
    for a, b in ((1, 2), (2, 1)):
        ca, cb = c[a], c[b]
        read_a = ca["tun_packets"]
        accounted_a = ca["sent_packets"] + ca["send_errors"] + sum(ca["drops"]["tun_to_udp"].values())
        recv_b = cb["udp_packets"]
        accounted_b = cb["delivered_packets"] + cb["tun_write_errors"] + sum(cb["drops"]["udp_to_tun"].values())
        kernel_drops_b = k[b].get("UdpInErrors", 0)
        rows.append({
            "direction": f"node {a} -> node {b}",
            "read_by_a": read_a, "sent_by_a": ca["sent_packets"], "a_drops_and_errors": accounted_a - ca["sent_packets"],
            "received_by_b": recv_b, "delivered_by_b": cb["delivered_packets"],
            "b_drops_and_errors": accounted_b - cb["delivered_packets"], "b_kernel_udp_errors": kernel_drops_b,
            "a_balanced": read_a == accounted_a, "b_balanced": recv_b == accounted_b,
            "wire_balanced": ca["sent_packets"] == recv_b + kernel_drops_b,
        })
    return rows


def check(report: dict) -> list[str]:
    """What failed, in words (empty: the soak passed)."""
    s, failures = report["settings"], []
    flat = flatness(report)
    if flat["etcd_leases_range"] != [len(NODES), len(NODES)]:
        failures.append(f"etcd leases {flat['etcd_leases_range']} after warm-up, expected {len(NODES)} throughout")
    for i in NODES:
        f = flat[f"node{i}"]
        growth = (f["rss_kib"]["max"] - f["rss_kib"]["first"]) / 1024
        if growth > s["rss_growth_mb"]:
            failures.append(f"node {i}: RSS grew {growth:.1f} MB after warm-up (bound {s['rss_growth_mb']} MB)")
        for m in ("fds", "threads", "tasks"):
            if f[m]["min"] != f[m]["max"]:
                failures.append(f"node {i}: {m} moved between {f[m]['min']} and {f[m]['max']} after warm-up")
        if f["etcd_requests"]["max"] != f["etcd_requests"]["first"]:
            failures.append(f"node {i}: etcd requests grew {f['etcd_requests']['first']} -> {f['etcd_requests']['max']}")
    for row in consistency(report):
        for side in ("a_balanced", "b_balanced", "wire_balanced"):
            if not row[side]:
                failures.append(f"{row['direction']}: counters do not balance ({side}): {row}")
    for i in NODES:
        unexplained = [w for w in report["warnings"][i] if not any(w[2:].startswith(p) for p in EXPLAINED_WARNINGS)]
        if unexplained:
            failures.append(f"node {i}: unexplained log warnings: {unexplained[:5]}")
    if any("error" in r for r in report["rr"]):
        failures.append(f"request/response failed: {[r for r in report['rr'] if 'error' in r][:2]}")
    return failures


# -- report ---------------------------------------------------------------------------------------------------

def render(report: dict, meta: dict) -> str:
    flat = flatness(report)
    lines = [
        "# Soak: bulk TCP, request/response and lease churn together",
        "",
        f"`{meta['command']}` on {meta['date']}, {meta['machine']}; udpflannel {meta['commit']}.",
        "",
        f"{report['settings_text']}. **Shared machine**: other work ran meanwhile (busy {report['machine_busy_pct_before']} % "
        f"of all CPUs before the start, {report['machine_busy_pct_after']} % right after the load stopped), so "
        "absolute rates say little; what counts is that nothing grows and everything balances.",
        "",
        f"Result: **{'PASS' if not report['checks'] else 'FAIL'}**" + ("" if not report["checks"] else ": " +
                                                                        "; ".join(report["checks"])),
        "",
        f"Load achieved: bulk {report['bulk_gbps']:.2f} Gbit/s ({report['bulk_bytes'] / 1e9:.1f} GB); "
        f"churn {report['churn'].get('events', 0)} events ({report['churn'].get('rate_achieved', 0):.0f}/s); "
        f"request/response {sum(r.get('n', 0) for r in report['rr'])} round trips in {len(report['rr'])} connections, "
        f"p50 of the connections' p50 {_median([r['p50_us'] for r in report['rr'] if 'p50_us' in r]):.0f} µs, "
        f"worst p99 {max((r['p99_us'] for r in report['rr'] if 'p99_us' in r), default=0):.0f} µs.",
        "",
        f"## Before and after (first sample after the {report['settings']['warmup']:g} s warm-up, t = {flat['from_t']:g} s, "
        f"and the last, t = {flat['to_t']:g} s)",
        "",
        "| | " + " | ".join(f"node {i} first | node {i} last | node {i} min–max" for i in NODES) + " |",
        "|---|" + "---:|" * (3 * len(NODES)),
    ]
    names = {"rss_kib": "RSS (MB)", "fds": "open file descriptors", "threads": "threads", "tasks": "asyncio tasks",
             "etcd_requests": "etcd requests since start"}
    for m, label in names.items():
        cells = []
        for i in NODES:
            f = flat[f"node{i}"][m]
            scale = 1024 if m == "rss_kib" else 1
            fmt = (lambda v, sc=scale: f"{v / sc:.1f}") if m == "rss_kib" else (lambda v: f"{v}")
            cells += [fmt(f["first"]), fmt(f["last"]), f"{fmt(f['min'])}–{fmt(f['max'])}"]
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    lines += [f"| etcd leases (cluster) | {flat['etcd_leases'][0]} | {flat['etcd_leases'][1]} | "
              f"{flat['etcd_leases_range'][0]}–{flat['etcd_leases_range'][1]} |" + " |" * (3 * len(NODES) - 3), ""]
    lines += ["## Counters, per direction (after the load stopped)", "",
              "| direction | read by A | A drops + errors | sent by A | received by B | B kernel UDP errors | "
              "B drops + errors | delivered by B | balanced |", "|---|---:|---:|---:|---:|---:|---:|---:|---|"]
    for r in consistency(report):
        ok = r["a_balanced"] and r["b_balanced"] and r["wire_balanced"]
        lines.append(f"| {r['direction']} | {r['read_by_a']} | {r['a_drops_and_errors']} | {r['sent_by_a']} | "
                     f"{r['received_by_b']} | {r['b_kernel_udp_errors']} | {r['b_drops_and_errors']} | "
                     f"{r['delivered_by_b']} | {'yes' if ok else 'NO'} |")
    drops = {f"node {i} {direction}": {reason: n for reason, n in reasons.items() if n}
             for i in NODES for direction, reasons in report["counters"][i]["drops"].items()}
    lines += ["", "Drops by reason: " + "; ".join(f"{where}: {', '.join(f'{r} {n}' for r, n in d.items()) or 'none'}"
                                                  for where, d in drops.items()) + "."]
    warnings = [w for i in NODES for w in report["warnings"][i]]
    lines += ["", "## Daemon log warnings", "",
              "none" if not warnings else "\n".join(f"- {w}" for w in warnings[:40]), "",
              "RSS samples (MB), node 1: " + " ".join(f"{x['node1']['rss_kib'] / 1024:.1f}" for x in report["samples"]),
              "", "RSS samples (MB), node 2: " + " ".join(f"{x['node2']['rss_kib'] / 1024:.1f}" for x in report["samples"]),
              ""]
    return "\n".join(lines)


def _rr_result(proc: subprocess.Popen) -> dict:
    out = proc.stdout.read() if proc.stdout is not None else ""
    return json.loads(out) if proc.returncode == 0 else {"error": f"exit {proc.returncode}: {out[-500:]}"}


def _median(values: list[float]) -> float:
    return sorted(values)[len(values) // 2] if values else 0.0


def main(out: Path, minutes: float, progress, meta: dict) -> int:
    """``python -m benchmarks --soak``: one soak into ``out``/soak.md and soak.json; exit 1 if a check failed."""
    for tool in ("iperf3", "ip"):
        if shutil.which(tool) is None:
            raise SystemExit(f"benchmarks --soak: needs {tool}")
    settings = SoakSettings(seconds=minutes * 60, warmup=min(60.0, minutes * 60 / 4))
    workdir = out / "tmp" / "soak"
    shutil.rmtree(workdir, ignore_errors=True)
    workdir.mkdir(parents=True)
    progress(f"soak: {settings.describe()}")
    with Lab() as lab, Cluster(lab, workdir) as cluster:
        report = run(build(cluster, settings), progress)
    out.mkdir(parents=True, exist_ok=True)
    (out / "soak.json").write_text(json.dumps({"meta": meta, **report}, indent=1) + "\n")
    (out / "soak.md").write_text(render(report, meta))
    progress(f"wrote {out / 'soak.md'}: {'PASS' if not report['checks'] else 'FAIL: ' + '; '.join(report['checks'])}")
    return 0 if not report["checks"] else 1
