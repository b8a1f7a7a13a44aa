"""The benchmark harness: its quick mode end to end (root, namespaces), and its report rules on fake data.

No timing is asserted: the quick run must produce the three outputs with every metric either measured
or marked unsupported with a reason, fail no metric, and leave no namespace behind.
"""

from __future__ import annotations

import importlib.util
import json
import re
import shutil
import statistics
import subprocess
import sys
from pathlib import Path

import pytest

from benchmarks import render, report
from benchmarks.runner import LAB_PREFIX
from tests.conftest import require
from udpflannel.lab.netns import leftover_namespaces

REPO = Path(__file__).resolve().parents[1]
OUTPUTS = ("results.json", "results.md", "throughput.png", "latency.png", "packet_rate.png", "cpu_per_gb.png")


def test_quick_run_fills_every_metric_and_cleans_up(tmp_path: Path, root_lab_tools, flannel_binaries) -> None:
    for tool in ("iperf3", "strace", "bridge", "ss"):
        require(shutil.which(tool) is not None, f"needs `{tool}` (./dev setup installs it)")
    require(importlib.util.find_spec("matplotlib") is not None, "needs matplotlib (the `bench` extra)")
    proc = subprocess.run([sys.executable, "-m", "benchmarks", "--quick", "--out", str(tmp_path)],
                          cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    # This run's labs (their tags are in its results); other runs on the machine may have labs of their own.
    tags = set(re.findall(rf"{LAB_PREFIX}[0-9a-f]{{6}}", (tmp_path / "results.json").read_text()))
    assert len(tags) >= 4, tags  # a lab per row, and the paired-RTT lab
    left = [ns for ns in leftover_namespaces(LAB_PREFIX) if ns.split("-")[0] in tags]
    assert not left, f"the benchmark left namespaces behind: {left}"
    for name in OUTPUTS:
        assert (tmp_path / name).stat().st_size > 0, name

    results = json.loads((tmp_path / "results.json").read_text())
    assert {"udpflannel", "flanneld", "vxlan", "host-gw"} <= set(results["rows"])  # flanneld: ../shared/bin
    for row, data in results["rows"].items():
        assert set(data["metrics"]) == {m.key for m in report.METRICS}
        for key, agg in data["metrics"].items():
            assert "median" in agg or agg.get("unsupported"), (row, key, agg)
            assert not agg.get("failed"), (row, key, agg["unsupported"])
    # every metric measured, but the many-peers lab's, which a quick run leaves out (and says so)
    assert all("median" in agg for key, agg in results["rows"]["udpflannel"]["metrics"].items()
               if key not in report.PEERS_METRICS)
    assert all("--many-peers" in results["rows"]["udpflannel"]["metrics"][key]["unsupported"] for key in report.PEERS_METRICS)
    for row in ("udpflannel", "flanneld"):  # a daemon's memory and start-up, flannel's own beside ours
        assert all(results["rows"][row]["metrics"][k]["median"] > 0 for k in ("rss_rest_mib", "rss_bulk_mib", "startup_s"))
    for ref in report.REFERENCES:
        assert "ratio" in results["ratios"]["udpflannel"][ref]["tcp1_gbps"]
    turns = results["sparse_turns"]  # the latency rows taking turns in one lab, flanneld and VXLAN among them
    assert set(turns["per_row"]) == {"udpflannel", "udpflannel --no-fast-path", "flanneld", "vxlan"}, turns.get("errors")
    assert not turns["errors"] and set(turns["goals"]) == {"udpflannel", "udpflannel --no-fast-path"}
    assert all(r["n"] > 0 and r["p50_us"] <= r["p99_us"] for r in turns["per_row"].values())
    assert set(turns["per_row"]["flanneld"]["nodes"]) == {"1", "2"} and not turns["per_row"]["vxlan"]["nodes"]
    for row in results["raw"].values():  # the congestion control iperf3 reports, not the host's default
        groups = row["runs"][0]["groups"]
        assert [groups[g]["congestion"] for g in ("tcp1", "tcp1_bbr", "tcp4")] == ["cubic", "bbr", "cubic"]
        for g in ("udp64", "udp1400"):  # delivered = datagrams that reached the pod's UDP layer
            assert groups[g]["pod_udp"]["InDatagrams"] > 0 and groups[g]["pod_udp"]["InCsumErrors"] == 0
        for g in ("ping200", "udprr200"):  # sparse round trips: answered, one every 5 ms
            assert groups[g]["interval_ms"] == 5.0 and groups[g]["n"] + groups[g]["lost"] == 100, groups[g]
            assert 0 < groups[g]["p50_us"] <= groups[g]["p99_us"] < 1e6, groups[g]
    for row in ("udpflannel", "flanneld"):  # a daemon's CPU and wake-ups per sparse round trip
        per_rt = results["rows"][row]["metrics"]
        assert per_rt["ping200_cpu_us"]["median"] > 0 and per_rt["ping200_wakeups"]["median"] > 0, row
    strace = results["strace_check"]
    assert strace is not None and ("strace_vs_counters" in strace or strace.get("error"))
    pairs = results["rtt_pairs"]  # one pair of turns: fast path and per-packet path in one lab
    assert not pairs["errors"] and pairs["pairs"] == 1, pairs
    assert all(pairs["cpu_us_per_rt"][n] > 0 for n in pairs["rows"]), pairs

    md = (tmp_path / "results.md").read_text()
    header = next(line for line in md.splitlines() if line.startswith("| metric |"))
    assert header.startswith("| metric | udpflannel |") and "| vxlan |" in header and "| host-gw |" in header
    assert "Ratio to vxlan" in md and "Ratio to host-gw" in md
    assert "Not available" in md  # the kernel rows' per-process metrics, with their reasons
    assert "paired in one lab" in md


# -- report rules on fake data (no root) -------------------------------------------------------------------
def window(**kw) -> dict:
    base = {"seconds": 1.0, "machine_busy_s": 2.0, "kernel_cpu_s": 1.0, "dataplane_cpu_s": 1.5,
            "dataplane_run_us": 1_500_000,
            "ctx_voluntary": 10, "ctx_involuntary": 20, "underlay_packets": 4000, "underlay_bytes": 10**9,
            "pod_tx_packets": 1000, "pod_rx_packets": 1000, "pod_rx_bytes": 10**9}
    return {**base, **kw}


def fake_run(gbps: float, *, limited: bool = False, counters: bool = False) -> dict:
    tcp = {"gbps": gbps, "window": window()}
    if counters:  # a process row: its daemons' peak RSS (KiB per node) and start-up times
        tcp["peak_rss_kb"] = {"before": {1: 40960, 2: 41984}, "after": {1: 51200, 2: 50176}}
    if counters:
        tcp["counters"] = {"packets": 2000, "syscalls": 4100, "tun_packets": 1000, "tun_wakeups": 50,
                           "udp_packets": 1000, "udp_wakeups": 40}
    udp = {"delivered_pps": 5e4, "offered_pps": 5e4 if limited else 9e4, "generator_limited": limited,
           "generator_cpu_pct": 99.0, "window": window()}
    rr = {"p50_us": 50.0, "p99_us": 90.0, "n": 100, "window": window()}
    sparse = {**rr, "lost": 0, "interval_ms": 5.0}
    return {"groups": {"tcp1": tcp, "tcp1_bbr": dict(tcp), "tcp4": dict(tcp), "rr": rr, "ping200": sparse,
                       "udprr200": dict(sparse), "udp64": udp, "udp1400": dict(udp)},
            "startup_s": [0.5, 0.4, 0.6] if counters else []}


def fake_raw() -> dict:
    return {"rows": {
        "udpflannel": {"kind": "userspace", "description": "", "has_counters": True,
                       "runs": [fake_run(0.8, counters=True), fake_run(1.0, counters=True), {"setup_error": "boom"}]},
        "vxlan": {"kind": "kernel", "description": "", "has_counters": False,
                  "runs": [fake_run(9.0, limited=True), fake_run(10.0, limited=True), fake_run(11.0, limited=True)]},
        "host-gw": {"kind": "kernel", "description": "", "has_counters": False, "runs": [fake_run(12.0, limited=True)]},
    }}


META = {"date": "d", "machine": "m", "machine_short": "m", "settings_text": "s", "commit": "c", "cpus": 2,
        "background_busy_pct": 0.0, "background_busy_pct_max": 0.0, "rr_size": 64, "command": "x"}


def test_median_spread_and_failed_repeats() -> None:
    results = report.build_results(fake_raw(), META)
    tcp = results["rows"]["udpflannel"]["metrics"]["tcp1_gbps"]
    assert (tcp["median"], tcp["min"], tcp["max"], tcp["n"]) == (pytest.approx(0.9), 0.8, 1.0, 2)
    assert tcp["failed_repeats"] == ["boom"]
    assert results["rows"]["udpflannel"]["metrics"]["syscalls_per_pkt"]["median"] == 4100 / 2000
    assert results["rows"]["vxlan"]["metrics"]["tcp1_gbps"]["median"] == 10.0


def test_kernel_rows_mark_per_process_metrics_unsupported_with_a_reason() -> None:
    metrics = report.build_results(fake_raw(), META)["rows"]["vxlan"]["metrics"]
    for key in ("ctx_vol_per_kpkt", "ctx_invol_per_kpkt", "syscalls_per_pkt", "ping200_cpu_us", "ping200_wakeups",
                "rss_rest_mib", "rss_bulk_mib", "startup_s"):
        assert metrics[key]["unsupported"] and not metrics[key].get("failed")
    assert "median" in metrics["cpu_s_per_gb"] and "median" in metrics["machine_cpu_s_per_gb"]


def test_peak_rss_is_the_larger_nodes_vmhwm_and_start_up_the_median_start() -> None:
    metrics = report.build_results(fake_raw(), META)["rows"]["udpflannel"]["metrics"]
    assert metrics["rss_rest_mib"]["values"] == [41.0, 41.0]  # max(40960, 41984) KiB
    assert metrics["rss_bulk_mib"]["values"] == [50.0, 50.0]  # max(51200, 50176) KiB
    assert metrics["startup_s"]["values"] == [0.5, 0.5]


def test_ratios_are_qualified_by_generator_limits_and_kinds() -> None:
    ratios = report.build_results(fake_raw(), META)["ratios"]
    assert ratios["udpflannel"]["vxlan"]["tcp1_gbps"] == {"ratio": pytest.approx(0.09), "qualifier": ""}
    # vxlan's packet rate is a lower bound, so udpflannel's ratio to it is an upper bound
    assert ratios["udpflannel"]["vxlan"]["udp64_kpps"]["qualifier"] == "≤"
    assert ratios["host-gw"]["vxlan"]["udp64_kpps"]["qualifier"] == "~"
    assert "not comparable" in ratios["udpflannel"]["vxlan"]["cpu_s_per_gb"]["unsupported"]
    assert "ratio" in ratios["udpflannel"]["vxlan"]["machine_cpu_s_per_gb"]


def test_every_metric_failing_is_flagged_as_failed() -> None:
    raw = fake_raw()
    raw["rows"]["udpflannel"]["runs"] = [{"setup_error": "no /dev/net/tun"}]
    tcp = report.build_results(raw, META)["rows"]["udpflannel"]["metrics"]["tcp1_gbps"]
    assert tcp["failed"] and "no /dev/net/tun" in tcp["unsupported"]


def test_markdown_and_plots_render(tmp_path: Path) -> None:
    require(importlib.util.find_spec("matplotlib") is not None, "needs matplotlib (the `bench` extra)")
    paths = render.write_all(report.build_results(fake_raw(), META), tmp_path)
    md = paths["md"].read_text()
    assert "≥ 10.00" not in md and "0.90 (0.80–1.00) [2 of 3]" in md
    assert "≥ 50" in md  # generator-limited packet rate is shown as a lower bound
    assert all(p.stat().st_size > 0 for p in paths.values())


def test_ratio_table_leaves_out_metrics_the_reference_row_has_no_figure_for() -> None:
    table = render.ratio_table(report.build_results(fake_raw(), META), "vxlan")
    assert "| TCP pod→pod, 1 stream |" in table
    # a kernel row has no daemon: nothing to divide by, so no row of dashes
    assert "Daemon wake-ups per sparse ping round trip" not in table and "Daemon CPU with no traffic" not in table


def turn(row: str, pair: int, p50: float, cpu: float) -> dict:
    return {"row": row, "pair": pair, "p50_us": p50, "p99_us": 2 * p50, "n": 100, "daemon_cpu_us_per_rt": cpu}


def test_paired_rtt_is_compared_pair_by_pair() -> None:
    # lab 0: A is 10 % faster in every pair although lab 1 is much slower than lab 0 for both rows;
    # lab 1's last pair is incomplete (B's turn failed) and must be left out, not paired across labs.
    first = [t for i in range(3) for t in (turn("A", i, 90 + i, 50), turn("B", i, 100 + i, 60))]
    labs = [{"rows": ["A", "B"], "turns": first},
            {"rows": ["A", "B"], "turns": [turn("A", 0, 270, 50), turn("B", 0, 300, 60), turn("A", 1, 280, 50)],
             "error": "DataplaneError: boom"}]
    s = report.summarize_pairs(labs)
    assert (s["pairs"], s["labs"], s["errors"]) == (4, 2, ["DataplaneError: boom"])
    assert s["p50_ratio"]["median"] == pytest.approx(0.9, abs=0.01) and s["p50_ratio"]["not_slower_share"] == 1
    lo, hi = s["p50_ratio"]["ci95"]
    assert lo <= s["p50_ratio"]["median"] <= hi < 1
    assert s["cpu_ratio"]["median"] == pytest.approx(50 / 60)
    assert s["p50_us"] == {"A": pytest.approx((91 + 92) / 2), "B": pytest.approx((101 + 102) / 2)}
    assert "unsupported" in report.summarize_pairs([])


def sparse_turn(row: str, rnd: int, samples: list[int], cpu: float | None) -> dict:
    nodes = {} if cpu is None else {"1": {"cpu_us": cpu * 0.6, "runq_us": 10.0 + rnd, "wakeups": 2.0},
                                    "2": {"cpu_us": cpu * 0.4, "runq_us": 4.0, "wakeups": 1.0}}
    return {"row": row, "round": rnd, "samples_us": samples, "lost": 0, "cpu_us_per_rt": cpu,
            "wakeups_per_rt": None if cpu is None else 3.0, "nodes": nodes}


def test_sparse_turns_pool_the_samples_and_check_the_goals_round_by_round() -> None:
    # Round 1 is twice as slow as round 0 for every row (the host drifted): the round-by-round ratio
    # to flanneld must not see it. udpflannel: 0.8× flanneld's p50, but a tail of 5× its own p50.
    fast = [80] * 97 + [400] * 3
    ref = [100] * 98 + [300] * 2
    labs = [{"rows": ["udpflannel", "flanneld", "vxlan"], "count": 100,
             "turns": [sparse_turn("udpflannel", 0, fast, 70.0), sparse_turn("flanneld", 0, ref, 90.0),
                       sparse_turn("vxlan", 0, [20] * 100, None),
                       sparse_turn("udpflannel", 1, [2 * x for x in fast], 140.0),
                       sparse_turn("flanneld", 1, [2 * x for x in ref], 180.0)],
             "error": "DataplaneError: vxlan's second turn failed"}]
    s = report.summarize_turns(labs)
    mine, theirs = s["per_row"]["udpflannel"], s["per_row"]["flanneld"]
    assert (mine["n"], mine["turns"], mine["p50_us"], mine["p99_us"]) == (200, 2, 160, 800)  # pooled, nearest rank
    assert mine["tail_ratio"] == pytest.approx(5.0) and mine["cpu_us_per_rt"] == pytest.approx(105.0)
    assert (mine["turn_p50_us"], mine["turn_p99_us"]) == (120, 600)  # medians of (80, 160) and (400, 800)
    assert (theirs["p50_us"], theirs["p99_us"]) == (200, 300)
    assert mine["nodes"]["1"] == {"cpu_us": pytest.approx(63.0), "runq_us": pytest.approx(10.5), "wakeups": 2.0}
    assert s["per_row"]["vxlan"]["cpu_us_per_rt"] is None and s["errors"] == ["DataplaneError: vxlan's second turn failed"]
    ratio = s["vs_reference"]["udpflannel"]["p50_ratio"]
    assert (ratio["median"], ratio["n"], ratio["not_slower_share"]) == (pytest.approx(0.8), 2, 1.0)
    assert s["vs_reference"]["vxlan"]["p50_ratio"]["n"] == 1  # only the round where both took a turn
    assert s["goals"]["udpflannel"] == {"p50_le_reference": True, "p99_le_reference": False, "p99_le_2x_p50": False}
    text = report.turns_text({"sparse_turns": s})
    assert "| udpflannel | 160 µs |" in text and "**not met**" in text
    assert "| udpflannel | 1 | 63 µs | 10.5 µs | 2.00 |" in text and "| vxlan | 1 |" not in text
    assert "unsupported" in report.summarize_turns([])
    no_ref = report.summarize_turns([{"rows": ["udpflannel"], "turns": [sparse_turn("udpflannel", 0, fast, 1.0)]}])
    assert "flanneld took no turn" in no_ref["unsupported"] and no_ref["per_row"]["udpflannel"]["p50_us"] == 80
    assert "Round by round" not in report.turns_text({"sparse_turns": no_ref})


def test_results_json_puts_number_lists_on_one_line_and_keeps_every_value() -> None:
    data = {"samples_us": [80, 95, 1200], "ratio": [1.5, -2e-05, 7], "names": ["a", "b"], "empty": [],
            "nested": [[1, 2], [3]], "turns": [{"n": 1}], "flags": [True, None]}
    text = render.compact_number_lists(json.dumps(data, indent=1))
    assert json.loads(text) == data
    assert '"samples_us": [80, 95, 1200]' in text and '"ratio": [1.5, -2e-05, 7]' in text and "[1, 2]" in text
    assert '"names": [\n' in text and '"flags": [\n' in text  # only lists of plain numbers are folded


def test_bootstrap_interval_is_reproducible_and_covers_the_median() -> None:
    values = [1.0, 0.9, 1.1, 0.95, 1.05, 0.97, 1.2, 0.85]
    ci = report.bootstrap_median_ci(values)
    assert ci == report.bootstrap_median_ci(values) and ci[0] <= statistics.median(values) <= ci[1]
    assert report.bootstrap_median_ci([1.0] * 5) == (1.0, 1.0)
