"""The GSO/GRO kernels per call: the C extension (tun.gso_c) against the numpy reference (tun.gso_numpy).

    python -m benchmarks.kernels [--repeat 21] [--calls 200] [--out benchmarks/results]

No root, no lab: each kernel is called in-process on the batches the fast path hands it — a cut of one
64 KB TSO super-packet (45 TCP segments), of three consecutive ones of a flow, of 20 small ones; the GRO
checks of a table of 44 TCP rows and of 64 UDP rows, and (C only: the numpy checks take no order) the
same TCP table checked in a shuffled row order; and the calls the fast path makes per batch around
them: a segmenter's whole cut of three super-packets, a coalescer's plan of a table of 4 flows'
504 rows and that plan's merged writes. C and numpy run back to back per repeat (order
alternating), so drift of a shared machine hits both alike; the figures are medians over the repeats
(min–max) of the time per call. Also what loading them costs a fresh Python process: peak RSS (VmHWM)
and wall time of the imports and a warm-up. Writes ``kernels.md`` and ``kernels.json`` to ``--out``.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

from tun import kernels, vnet
from tun.coalesce import Coalescer, merge_rule
from tun.layout import PROTO_TCP, PROTO_UDP
from tun.segment import BUFFER_SIZE, Segmenter, parse

MSS = 1448


def tso_packet(payload: int, *, ident: int = 1, seq: int = 1000, proto: int = PROTO_TCP, mss: int = MSS) -> bytes:
    """A super-packet 10.5.1.2 → 10.5.2.2 as a TUN hands it over (TCP with a timestamp option, or UDP)."""
    l4 = (b"\x9c\x40\x14\x51" + seq.to_bytes(4, "big") + b"\0\0\0\x4d\x80\x10\x01\xf6\0\0\0\0"
          + b"\x01\x01\x08\x0a" + bytes(range(8))) if proto == PROTO_TCP else b"\x9c\x40\x14\x51\0\0\0\0"
    head = bytearray(b"\x45\0\0\0" + ident.to_bytes(2, "big") + b"\x40\0\x40" + bytes([proto]) + b"\0\0\x0a\x05\x01\x02\x0a\x05\x02\x02")
    head[2:4] = (20 + len(l4) + payload).to_bytes(2, "big")
    head[10:12] = (0xFFFF - int.from_bytes(head, "big") % 0xFFFF).to_bytes(2, "big")
    return bytes(head) + l4 + bytes(i * 7 % 251 for i in range(payload))


def cut_case(packets: list[bytes], mss: int = MSS) -> tuple:
    """(src, its arrays, out, its arrays, group) for one kernel call, as Segmenter lays them out."""
    src = bytearray(sum(len(p) + mss + 8 for p in packets) + BUFFER_SIZE)
    group, at = [], 0
    for p in packets:
        src[at:at + len(p)] = p
        gso_type = vnet.GSO_TCPV4 if p[9] == PROTO_TCP else vnet.GSO_UDP_L4
        group.append(parse(src, at, len(p), gso_type, mss))
        at += len(p) + mss + 7 & ~7
    out = bytearray(len(src) * 2)
    return (src, np.frombuffer(src, np.uint8), np.frombuffer(src, np.uint32, len(src) >> 2), out,
            np.frombuffer(out, np.uint8), 0, group)


def check_case(proto: int, rows: int, mss: int) -> tuple:
    """A received GRO table: one flow's segments, back to back, and the arguments of one check."""
    packet = tso_packet(rows * mss, proto=proto, mss=mss)
    segmenter = Segmenter(BUFFER_SIZE * 2, jit=False)
    buf = bytearray(BUFFER_SIZE * 2)
    buf[:len(packet)] = packet
    [cut] = segmenter.cut(buf, [(0, len(packet), vnet.GSO_TCPV4 if proto == PROTO_TCP else vnet.GSO_UDP_L4, mss)])
    table = bytearray(BUFFER_SIZE * 2)
    table[:cut.count * cut.size] = segmenter.out[cut.start:cut.start + cut.count * cut.size]
    hl = 20 + (32 if proto == PROTO_TCP else 8)
    mask, step = merge_rule(hl, cut.size, proto)
    return (table, np.frombuffer(table, np.uint8), np.frombuffer(table, np.uint32, len(table) >> 2), 0, cut.count,
            cut.size, hl, proto, {}, mask, step)


def received_table(flows: int, supers: int, rows: int) -> tuple[bytearray, list[int], int]:
    """A receive buffer as the fast path lays it out: ``supers`` rounds of one super-packet of ``rows``
    segments from each of ``flows`` TCP flows (source ports differ), each super-packet one GRO batch.
    (The buffer, the batches' byte counts, the row size.)"""
    packets = []
    for s in range(supers):
        for f in range(flows):
            packet = bytearray(tso_packet(rows * MSS, ident=1 + s * rows, seq=1000 + s * rows * MSS))
            packet[21] = 0x40 + f  # the source port (the cut sums the TCP checksum)
            packets.append(bytes(packet))
    src, *_, group = cut_case(packets)
    segmenter = Segmenter(len(src) * 2, jit=False)
    cuts = segmenter.cut(src, [(p.at, p.hl + (p.count - 1) * p.mss + p.last, vnet.GSO_TCPV4, MSS) for p in group])
    table, sizes, at = bytearray(len(src) * 2 + BUFFER_SIZE), [], 0
    for cut in cuts:
        n = (cut.count - 1) * cut.size + cut.last
        table[at:at + n] = segmenter.out[cut.start:cut.start + n]
        sizes.append(n)
        at += cut.count * cut.size
    return table, sizes, cuts[0].size


def per_call_us(fn: Callable[[], object], calls: int) -> float:
    t0 = time.perf_counter_ns()
    for _ in range(calls):
        fn()
    return (time.perf_counter_ns() - t0) / calls / 1000


CASES = {
    "cut_1x64k": "cut: 1 TCP super-packet of 64 KB (45 segments)",
    "cut_3x64k": "cut: 3 consecutive TCP super-packets of a flow (135 segments)",
    "cut_20x4k": "cut: 20 TCP super-packets of 4 KB (60 segments)",
    "cut_udp_64k": "cut: 1 UDP super-packet of 63 KB (44 datagrams)",
    "check_tcp44": "GRO checks: 44 TCP rows of 1500 B",
    "check_udp64": "GRO checks: 64 UDP rows of 1028 B",
    "check_tcp44_order": "GRO checks: 44 TCP rows of 1500 B, in a shuffled order",
    "segmenter_3x64k": "Segmenter.cut, whole (parse, group, cut): 3 TCP super-packets of a flow",
    "plan_4x3": "Coalescer.plan, whole: 4 flows × 3 super-packets received (504 rows)",
    "merge_4x3": "Plan.merge: that table's 12 merged TUN writes",
}


def calls_for(compiled) -> dict[str, Callable[[], object]]:
    """Each case as a no-argument call on the kernels ``compiled`` (a :class:`tun.kernels.Kernels`)."""
    one = tso_packet(45 * MSS)
    cuts = {
        "cut_1x64k": cut_case([one]),
        "cut_3x64k": cut_case([tso_packet(45 * MSS, ident=1 + 45 * i, seq=1000 + 45 * MSS * i) for i in range(3)]),
        "cut_20x4k": cut_case([tso_packet(3 * MSS, ident=1 + 3 * i, seq=1000 + 3 * MSS * i) for i in range(20)]),
        "cut_udp_64k": cut_case([tso_packet(44 * MSS, proto=PROTO_UDP)]),
    }
    checks = {"check_tcp44": check_case(PROTO_TCP, 44, 1448), "check_udp64": check_case(PROTO_UDP, 64, 1000)}
    out: dict[str, Callable[[], object]] = {}
    for name, args in cuts.items():
        cutter = compiled.new_cutter()
        out[name] = lambda cutter=cutter, args=args: cutter(*args)
    for name, args in checks.items():
        checker = compiled.new_checker()
        out[name] = lambda checker=checker, args=args: checker(*args)
    src, _, _, _, _, _, group = cuts["cut_3x64k"]
    items = [(p.at, p.hl + (p.count - 1) * p.mss + p.last, vnet.GSO_TCPV4, MSS) for p in group]
    segmenter = Segmenter(len(src) * 2, jit=compiled.compiled)
    out["segmenter_3x64k"] = lambda: segmenter.cut(src, items)
    table, sizes, seg = received_table(4, 3, 42)
    coalescer = Coalescer(table, jit=compiled.compiled)
    out["plan_4x3"] = lambda: coalescer.plan(seg, sizes)
    plan = coalescer.plan(seg, sizes)
    out["merge_4x3"] = lambda: [plan.merge(a, b) for a, b in plan.runs if b - a > 1]
    if compiled.compiled:
        order = np.random.default_rng(8285).permutation(44).astype(np.intp)
        checker, args = compiled.new_checker(), checks["check_tcp44"]
        out["check_tcp44_order"] = lambda: checker(*args, order)
    return out


def measure(repeat: int, calls: int) -> dict:
    compiled = kernels.load()
    if compiled is None:
        raise SystemExit(f"benchmarks.kernels: the C kernels do not load: {kernels.why_not}")
    sides = {"C": calls_for(compiled), "numpy": calls_for(kernels.NUMPY)}
    times: dict[str, dict[str, list[float]]] = {case: {"C": [], "numpy": []} for case in CASES}
    for side in sides.values():  # a warm-up call each (the numpy kernels build their views on the first)
        for fn in side.values():
            fn()
    for r in range(repeat):
        for case in CASES:
            for name in (("C", "numpy") if r % 2 == 0 else ("numpy", "C")):
                if case in sides[name]:
                    times[case][name].append(per_call_us(sides[name][case], calls))
    out: dict = {}
    for case, per in times.items():
        out[case] = {name: _spread(values) for name, values in per.items() if values}
        if per["numpy"]:
            out[case]["speedup"] = _spread([n / c for c, n in zip(per["C"], per["numpy"], strict=True)])
    return out


def _spread(values: list[float]) -> dict:
    return {"median": statistics.median(values), "min": min(values), "max": max(values)}


LOADS = {
    "bare": "import sys",
    "numpy": "import numpy",
    "numpy kernels": "import os; os.environ['UDPFLANNEL_JIT'] = '0'; from tun import gso; gso.warm_up()",
    "C kernels": "from tun import gso; assert gso.warm_up() == 'compiled (C)'",
}


def load_costs(runs: int = 5) -> dict:
    """What each step costs a fresh interpreter: peak RSS (VmHWM, MiB) and wall time (ms), median of ``runs``."""
    out = {}
    probe = "\nfrom pathlib import Path\nprint([l for l in Path('/proc/self/status').read_text().splitlines() if l.startswith('VmHWM')][0].split()[1])"
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parent.parent)}
    for name, code in LOADS.items():
        rss, wall = [], []
        for _ in range(runs):
            t0 = time.perf_counter()
            proc = subprocess.run([sys.executable, "-c", code + probe], capture_output=True, text=True, env=env, timeout=60,
                                  check=True)
            wall.append((time.perf_counter() - t0) * 1000)
            rss.append(int(proc.stdout.split()[-1]) / 1024)
        out[name] = {"rss_mib": statistics.median(rss), "wall_ms": statistics.median(wall)}
    return out


def render(results: dict, loads: dict, meta: dict) -> str:
    lines = [
        "# GSO/GRO kernels per call: C extension vs numpy",
        "",
        f"`{meta['command']}` on {meta['date']}, {meta['machine']}, Python {meta['python']}, numpy {meta['numpy']}; "
        f"{meta['repeat']} repeats of {meta['calls']} calls per cell, C and numpy back to back (order alternating). "
        "The machine is shared: absolute figures move, the ratio is taken repeat by repeat.",
        "",
        "| call | C (µs) | numpy (µs) | numpy ÷ C |",
        "|---|---:|---:|---:|",
    ]

    def cell(x: dict | None, unit: str = "", digits: int = 1) -> str:
        if x is None:
            return "—"
        return f"{x['median']:.{digits}f}{unit} ({x['min']:.{digits}f}–{x['max']:.{digits}f})"

    for case, label in CASES.items():
        per = results[case]
        lines.append(f"| {label} | {cell(per.get('C'))} | {cell(per.get('numpy'))} | {cell(per.get('speedup'), '×', 2)} |")
    lines += ["", "What loading them costs a fresh Python process (median of 5): peak RSS (VmHWM) and wall time "
              "from start to exit.", "", "| process | peak RSS (MiB) | wall (ms) |", "|---|---:|---:|"]
    lines += [f"| `{LOADS[name]}` | {x['rss_mib']:.1f} | {x['wall_ms']:.0f} |" for name, x in loads.items()]
    lines += ["", "Medians (min–max) over the repeats. The cut is one pass per row in C (headers from the "
              "template, payload copied and summed while it is in L1, checksums written) against ~20 numpy "
              "array calls per batch, each a pass over the table; the checks likewise (one loop over the rows "
              "against a strided header read, a masked compare and an `add.reduceat`). The whole cut, plan and "
              "merge are what the fast path calls per batch: with the C kernels one C call each; with numpy, "
              "Python (the parse, the grouping by flow, the cut points, the iovec) around the numpy kernels.", ""]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    p = argparse.ArgumentParser(prog="python -m benchmarks.kernels", description=__doc__.split("\n\n")[0])
    p.add_argument("--repeat", type=int, default=21)
    p.add_argument("--calls", type=int, default=200, help="calls per cell and repeat")
    p.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "results")
    args = p.parse_args(argv)
    results = measure(args.repeat, args.calls)
    loads = load_costs()
    meta = {"date": dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M UTC"), "python": platform.python_version(),
            "numpy": np.__version__, "machine": f"{os.cpu_count()} CPUs {platform.machine()}, Linux {platform.release()}",
            "repeat": args.repeat, "calls": args.calls, "command": " ".join(["python -m benchmarks.kernels", *argv])}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "kernels.json").write_text(json.dumps({"meta": meta, "results": results, "loads": loads}, indent=2) + "\n")
    text = render(results, loads, meta)
    (args.out / "kernels.md").write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
