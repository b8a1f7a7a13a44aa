"""The strace cross-check: the syscalls a dataplane makes per packet, counted by strace, against its own
counters (a row's ``syscalls per packet`` must not be a figure the dataplane merely claims)."""

from __future__ import annotations

import os
import re
import select
import signal
import subprocess
import time

from benchmarks.measure import MeasureError, link_stats, tcp_throughput
from benchmarks.rows import Row
from benchmarks.topology import Topology

DATA_SYSCALLS = ("read", "readv", "write", "writev", "sendto", "recvfrom", "sendmsg", "recvmsg", "sendmmsg", "recvmmsg")
STRACE_ROW = re.compile(r"^\s*[\d.]+\s+[\d.]+\s+\d+\s+(\d+)\s+(?:(\d+)\s+)?(\w+)\s*$")


def parse_strace_summary(text: str) -> dict[str, dict[str, int]]:
    """``strace -c`` table → {syscall: {"calls": n, "errors": e}} (the ``total`` row excluded)."""
    rows = {}
    for line in text.splitlines():
        m = STRACE_ROW.match(line)
        if m and m.group(3) != "total":
            rows[m.group(3)] = {"calls": int(m.group(1)), "errors": int(m.group(2) or 0)}
    return rows


def strace_check(dp: Row, topo: Topology, duration: float) -> dict:
    """Count node 1's dataplane syscalls with ``strace -c -f`` during a TCP transfer; compare to its counters.

    strace slows every syscall down a lot, so the transfer's rate here means nothing; the ratio of
    syscalls to packets is what is compared. The dataplane is restarted for this, so the counters
    cover the traced window plus start-up and the readiness ping (a handful of packets).
    """
    pids = dp.node_pids(1)
    if not pids:
        raise MeasureError("no dataplane process on node 1 to trace")
    out = topo.workdir / f"strace-{dp.slug}.txt"
    tracer = subprocess.Popen(["strace", "-c", "-f", "-p", str(pids[0]), "-o", str(out)],
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True)
    try:
        attached = _wait_for_line(tracer, "attached", timeout=5.0)
        if not attached:
            raise MeasureError(f"strace did not attach to pid {pids[0]} within 5s (needs ptrace; "
                               f"exit {tracer.poll()})")
        before = link_stats(topo.nodes[1])
        traffic = tcp_throughput(topo, streams=1, duration=duration, omit=0)
        after = link_stats(topo.nodes[1])
    finally:
        if tracer.poll() is None:
            tracer.send_signal(signal.SIGINT)
        try:
            tracer.wait(timeout=10)
        except subprocess.TimeoutExpired:
            os.killpg(tracer.pid, signal.SIGKILL)
            tracer.wait(timeout=5)
    counters = dp.stop()
    rows = parse_strace_summary(out.read_text() if out.exists() else "")
    if not rows:
        raise MeasureError(f"strace wrote no summary ({out})")
    node_counters = counters["nodes"][1] if counters else {}
    counted = sum(node_counters.get(k, 0) for k in ("tun_reads", "tun_writes", "udp_recvs", "udp_sends"))
    packets = node_counters.get("tun_packets", 0) + node_counters.get("udp_packets", 0)
    data_calls = sum(rows[k]["calls"] for k in DATA_SYSCALLS if k in rows)
    all_calls = sum(r["calls"] for r in rows.values())
    eth_packets = (after["tx_packets"] - before["tx_packets"]) + (after["rx_packets"] - before["rx_packets"])
    return {
        "dataplane": dp.name, "node": 1, "pid": pids[0], "transfer_seconds": traffic["seconds"],
        "packets_counters": packets, "packets_eth0_window": eth_packets,
        "syscalls_counters": counted,
        "syscalls_strace_data": data_calls,
        "syscalls_strace_all": all_calls,
        "counters_per_packet": round(counted / packets, 3) if packets else None,
        "strace_data_per_packet": round(data_calls / packets, 3) if packets else None,
        "strace_all_per_packet": round(all_calls / packets, 3) if packets else None,
        "strace_vs_counters": round(data_calls / counted, 4) if counted else None,
        "by_syscall": {k: v for k, v in sorted(rows.items(), key=lambda kv: -kv[1]["calls"])[:12]},
    }


def _wait_for_line(proc: subprocess.Popen, needle: str, timeout: float) -> bool:
    """Read ``proc``'s stderr until a line contains ``needle`` (bounded by ``timeout``)."""
    assert proc.stderr is not None
    fd = proc.stderr.fileno()
    deadline = time.monotonic() + timeout
    buf = b""
    for _ in range(1000):
        left = deadline - time.monotonic()
        if left <= 0:
            return False
        ready, _, _ = select.select([fd], [], [], left)
        if not ready:
            return False
        chunk = os.read(fd, 4096)
        if not chunk:
            return False
        buf += chunk
        if needle.encode() in buf:
            return True
    return False
