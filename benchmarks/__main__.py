"""``python -m benchmarks``: udpflannel vs kernel VXLAN vs host-gw, measured side by side (root only).

    python -m benchmarks [--quick] [--repeat 3] [--out benchmarks/results]
                         [--variant NAME='--udpflannel-flags ...'] [--external NAME='command {subnet} ...']

Writes ``results.json``, ``results.md`` and PNG plots to ``--out``; logs go to ``<out>/tmp/logs``.
A full run into the default directory also refreshes the results section of benchmarks/README.md.
Ctrl-C (or SIGTERM) stops the run and removes every namespace and process it created.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import shlex
import shutil
import signal
import subprocess
import sys
from pathlib import Path

from benchmarks import render, report
from benchmarks.code import snapshot_code, static_flags
from benchmarks.measure import RR_RUNS, RR_SIZE, machine_busy_fraction
from benchmarks.processes import builtin_rows
from benchmarks.runner import FULL, OPEN_LABS, QUICK, QUIET, Progress, Settings, run_all
from benchmarks.topology import DataplaneError
from udpflannel.lab.flanneld import BinaryNotFound, find_flanneld

HERE = Path(__file__).resolve().parent
DEFAULT_OUT = HERE / "results"
QUICK_OUT = HERE / "results" / "tmp" / "quick"
REQUIRED_TOOLS = ("ip", "bridge", "ping", "ss", "iperf3")


class Interrupted(BaseException):
    """SIGTERM/SIGHUP: unwinds like Ctrl-C so every ``finally`` runs."""


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="CI smoke run (≤ 60 s): 1 repeat, 1 s per test")
    p.add_argument("--repeat", type=int, help=f"repeats per row (default {FULL.repeat}; --quick: {QUICK.repeat})")
    p.add_argument("--seconds", type=int, help="seconds per iperf3 test (default 5; --quick: 1)")
    p.add_argument("--out", type=Path, help=f"output directory (default {DEFAULT_OUT.relative_to(HERE.parent)}; "
                                            f"--quick: {QUICK_OUT.relative_to(HERE.parent)})")
    p.add_argument("--rows", help="comma-separated subset of rows to run (default: all)")
    p.add_argument("--variant", action="append", default=[], metavar="NAME=FLAGS",
                   help="an extra udpflannel row with extra static-mode flags, e.g. nofast='--no-fast-path'")
    p.add_argument("--external", action="append", default=[], metavar="NAME=COMMAND",
                   help="an extra row: COMMAND runs in each node's namespace; placeholders {node} {index} {iface} "
                        "{address} {subnet} {peer_subnet} {peer_address} {network} {port} {mtu} {subnet_file}")
    p.add_argument("--external-mtu", type=int, default=1472, help="pod MTU for --external rows that write no subnet file")
    p.add_argument("--rtt-pairs", type=int, metavar="N",
                   help=f"per repeat, N turns each of the fast-path and per-packet rows in one lab, for a paired RTT "
                        f"comparison (default {FULL.rtt_pairs}; --quick: {QUICK.rtt_pairs}; 0: off)")
    p.add_argument("--sparse-rounds", type=int, metavar="N",
                   help=f"per repeat, N rounds in which udpflannel's two paths, flanneld and kernel VXLAN each take a "
                        f"turn of sparse pings in one lab: the latency goals' measure (default {FULL.sparse_rounds}; "
                        f"--quick: {QUICK.sparse_rounds}; 0: off)")
    p.add_argument("--many-peers", action=argparse.BooleanOptionalAction, default=None,
                   help="also measure TCP with 4 streams to each of 3 peers on a 4-node lab per row that can "
                        "(default: on; --quick: off)")
    p.add_argument("--wait-idle", type=float, default=0.0, metavar="SECONDS",
                   help="before each lab, wait up to SECONDS for other work on the machine to drop below 15%% CPU")
    p.add_argument("--code", metavar="REV", help="run udpflannel from this git revision (default: a copy of the "
                                                 "working tree taken at start, so edits during the run do not leak in)")
    p.add_argument("--rebuild-report", action="store_true",
                   help="measure nothing: rebuild the Markdown, plots (and README section) from <out>/results.json")
    p.add_argument("--no-readme", action="store_true", help="do not update benchmarks/README.md")
    p.add_argument("--soak", action="store_true",
                   help="instead of the table: the soak (bulk TCP, request/response and lease churn together, "
                        "benchmarks/soak.py) into <out>/soak.md and soak.json; exit 1 if a check fails")
    p.add_argument("--soak-minutes", type=float, default=10.0, metavar="M", help="how long the soak runs (default 10)")
    return p.parse_args(argv)


def split_named(specs: list[str], flag: str) -> dict[str, str]:
    out = {}
    for spec in specs:
        name, sep, value = spec.partition("=")
        if not sep or not name or not value:
            raise SystemExit(f"{flag} {spec!r}: expected NAME=VALUE")
        out[name] = value
    return out


def check_environment() -> None:
    if os.geteuid() != 0:
        raise SystemExit("benchmarks: needs root (network namespaces, TUN devices); run: sudo ./dev bench")
    missing = [t for t in REQUIRED_TOOLS if shutil.which(t) is None]
    if missing:
        raise SystemExit(f"benchmarks: missing {', '.join(missing)} (./dev setup installs them)")
    if not os.path.exists("/dev/net/tun"):
        raise SystemExit("benchmarks: /dev/net/tun is missing (modprobe tun)")


def machine_description() -> tuple[str, str]:
    model = "unknown CPU"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    mem_gb = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    virt = ", ".join(f"{kind} {name}" for kind, name in (("VM", _run_text(["systemd-detect-virt", "--vm"])),
                                                          ("container", _run_text(["systemd-detect-virt", "--container"])))
                     if name and name != "none") or "none detected"
    cpus = os.cpu_count() or 0
    long = (f"{model}, {cpus} vCPU, {mem_gb:.0f} GiB RAM, Linux {platform.release()}, "
            f"virtualisation {virt}, Python {platform.python_version()}, {_run_text(['iperf3', '--version']).splitlines()[0]}")
    return long, f"{model} ×{cpus}, Linux {platform.release()}"


def _run_text(cmd: list[str]) -> str:
    try:
        return subprocess.run(cmd, capture_output=True, text=True, timeout=5).stdout.strip()
    except (OSError, subprocess.TimeoutExpired):
        return ""


def git_commit() -> str:
    """HEAD, marked ``+dirty`` if the harness itself (benchmarks/) has uncommitted changes."""
    rev = _run_text(["git", "-C", str(HERE.parent), "rev-parse", "--short", "HEAD"]) or "unknown"
    dirty = _run_text(["git", "-C", str(HERE.parent), "status", "--porcelain", "--untracked-files=no", "--", str(HERE)])
    return rev + ("+dirty" if dirty else "")


def rebuild_report(out: Path, update: bool) -> int:
    """Re-derive every table and plot from the raw data a previous run saved (after a change to report.py)."""
    saved = json.loads((out / "results.json").read_text())
    raw = {"rows": saved["raw"], "strace": saved.get("strace_check"), "calibration": saved.get("calibration"),
           "rtt_pairs": saved.get("rtt_pairs", {}).get("raw", []),
           "sparse_turns": saved.get("sparse_turns", {}).get("raw", [])}
    results = report.build_results(raw, saved["meta"])
    paths = render.write_all(results, out)
    print(f"rebuilt {', '.join(str(p) for p in paths.values())}", file=sys.stderr)
    if update and render.update_readme(HERE / "README.md", results, "results/"):
        print("updated the results section of benchmarks/README.md", file=sys.stderr)
    return 0


def main(argv: list[str] | None = None) -> int:
    """Run the rows, or rebuild the report: the command line's steps in order (long as that list is)."""
    args = parse_args(sys.argv[1:] if argv is None else argv)
    if args.rebuild_report:
        out = (args.out or (QUICK_OUT if args.quick else DEFAULT_OUT)).resolve()
        return rebuild_report(out, update=args.out is None and not args.quick and not args.no_readme)
    check_environment()
    if args.soak:
        from benchmarks import soak

        long, _ = machine_description()
        meta = {"date": dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M UTC"), "machine": long, "commit": git_commit(),
                "command": "python -m benchmarks " + " ".join(shlex.quote(a) for a in (sys.argv[1:] if argv is None else argv))}
        return soak.main((args.out or DEFAULT_OUT).resolve(), args.soak_minutes, Progress(), meta)
    base = QUICK if args.quick else FULL
    settings = Settings(
        repeat=args.repeat or base.repeat, tcp_seconds=args.seconds or base.tcp_seconds, omit=base.omit,
        udp_seconds=args.seconds or base.udp_seconds, rr_count=base.rr_count, rr_max_seconds=base.rr_max_seconds,
        strace_seconds=base.strace_seconds, sparse_count=base.sparse_count, idle_seconds=base.idle_seconds,
        wait_idle=args.wait_idle,
        rtt_pairs=base.rtt_pairs if args.rtt_pairs is None else args.rtt_pairs, rtt_pair_count=base.rtt_pair_count,
        sparse_rounds=base.sparse_rounds if args.sparse_rounds is None else args.sparse_rounds,
        sparse_turn_count=base.sparse_turn_count,
        peers_lab=base.peers_lab if args.many_peers is None else args.many_peers,
    )
    out = (args.out or (QUICK_OUT if args.quick else DEFAULT_OUT)).resolve()
    workdir = out / "tmp" / "logs"
    shutil.rmtree(workdir, ignore_errors=True)
    workdir.mkdir(parents=True)
    try:
        code = snapshot_code(HERE.parent, workdir / "code", args.code)
        try:
            flanneld: Path | None = find_flanneld(workdir / "bin")
        except BinaryNotFound as exc:
            flanneld = None
            print(f"benchmarks: no flanneld row: {exc}", file=sys.stderr)
        dataplanes = builtin_rows(
            variants={k: shlex.split(v) for k, v in split_named(args.variant, "--variant").items()},
            externals=split_named(args.external, "--external"), external_mtu=args.external_mtu,
            code=Path(code["path"]), static_flags=static_flags(Path(code["path"])), flanneld=flanneld)
    except (DataplaneError, OSError, subprocess.SubprocessError) as exc:
        raise SystemExit(f"benchmarks: {exc}") from exc
    if args.rows:
        wanted = [r.strip() for r in args.rows.split(",") if r.strip()]
        unknown = [r for r in wanted if r not in dataplanes]
        if unknown:
            raise SystemExit(f"benchmarks: unknown row(s) {unknown}; known: {', '.join(dataplanes)}")
        dataplanes = {k: v for k, v in dataplanes.items() if k in wanted}

    progress = Progress()
    for sig in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, _interrupt)
    try:
        busy = machine_busy_fraction(1.0)
        progress(f"udpflannel code: {code['source']} (sha256 {code['sha256']} of its .py and .c files; GSO/GRO kernels: {code['kernels']})")
        progress(f"rows: {', '.join(dataplanes)}; {settings.describe()}; machine {busy * 100:.0f}% busy before start")
        if busy > QUIET:
            progress("warning: the machine is busy with other work; every figure below is skewed by it")
        raw = run_all(dataplanes, settings, workdir, progress)
        long, short = machine_description()
        busy_runs = [run.get("background_busy_pct", 0.0) for row in raw["rows"].values() for run in row["runs"]]
        meta = {
            "date": dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M UTC"), "machine": long, "machine_short": short,
            "cpus": os.cpu_count(), "commit": git_commit(), "command": "python -m benchmarks " + " ".join(
                shlex.quote(a) for a in (sys.argv[1:] if argv is None else argv)),
            "quick": args.quick, "settings": settings.__dict__, "settings_text": settings.describe(),
            "background_busy_pct": busy * 100, "background_busy_pct_max": max(busy_runs, default=0.0),
            "rr_size": RR_SIZE, "rr_runs": RR_RUNS, "udpflannel_code": f"{code['source']}, sha256 {code['sha256']} of its .py and .c files, GSO/GRO kernels: {code['kernels']}",
            "elapsed_s": round(progress.elapsed(), 1),
        }
        results = report.build_results(raw, meta)
        paths = render.write_all(results, out)
        progress(f"wrote {', '.join(str(p) for p in paths.values())}")
        if not args.quick and args.out is None and not args.no_readme:
            if render.update_readme(HERE / "README.md", results, "results/"):
                progress("updated the results section of benchmarks/README.md")
        print(render.main_table(results))
        return 0
    except (KeyboardInterrupt, Interrupted) as exc:
        progress(f"interrupted ({type(exc).__name__}): removing the lab")
        return 130
    finally:
        for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
            signal.signal(sig, signal.SIG_IGN)
        for lab in list(OPEN_LABS):  # normally empty: each lab is closed where it was opened
            lab.close()
            OPEN_LABS.discard(lab)


def _interrupt(signum: int, _frame) -> None:
    raise Interrupted(signal.Signals(signum).name)


if __name__ == "__main__":
    raise SystemExit(main())
