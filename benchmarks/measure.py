"""Measurements: traffic generators run in the pods, and counters read from /proc and the interfaces.

Each traffic group (TCP 1 stream, TCP 4 streams, request/response, UDP 64 B, UDP 1400 B) runs between
two :func:`snapshot` calls; :func:`window` turns the pair into what the dataplane cost in that time:

- CPU: ``utime + stime`` of the dataplane processes (``/proc/<pid>/stat``), and the machine's
  ``/proc/stat`` split (user, system, softirq, ...). Kernel dataplanes have no process: their
  comparable figure is system + softirq + irq time of the whole machine, which also contains the
  traffic generators' own kernel work (stated in the report);
- context switches: ``voluntary_ctxt_switches`` / ``nonvoluntary_ctxt_switches`` summed over every
  thread in ``/proc/<pid>/task/*/status``;
- packets and bytes: ``ip -s -j link`` of both nodes' ``eth0`` (underlay) and both pods' ``eth0``.

Nothing here asserts timing; every loop is bounded in count and time.
"""

from __future__ import annotations

import json
import os
import re
import resource
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from benchmarks import rr as rr_tool
from benchmarks.rows import Row
from benchmarks.topology import Topology
from udpflannel.lab.netns import Netns

CLK_TCK = os.sysconf("SC_CLK_TCK")
STAT_FIELDS = ("user", "nice", "system", "idle", "iowait", "irq", "softirq", "steal")
RR_TOOL = Path(__file__).with_name("rr.py")
_PING_TIME = re.compile(r"time=([0-9.]+) ms")
IPERF_PORT = 5201
RR_PORT = 5300
RR_SIZE = 64
UDP_RR_PORT = 5301
SPARSE_INTERVAL_MS = 5.0  # 200 Hz: every hop sleeps between two packets (issue: a lone packet's wake-ups)
# TCP congestion control, set on iperf3's sockets (-C) so that no figure depends on the host's default:
# cubic is the kernel's default and what most nodes run. BBR paces its sends, which leaves a userspace
# dataplane fewer packets per wake-up, so the 1-stream test is repeated with it (ALT_CONGESTION).
CONGESTION = "cubic"
ALT_CONGESTION = "bbr"
RR_RUNS = 5  # request/response client processes per measurement, pooled (see request_response)


class MeasureError(RuntimeError):
    """One measurement failed; the harness records the reason for that repeat and carries on."""


# -- /proc ----------------------------------------------------------------------------------------------------
def read_cpu_stat() -> dict[str, float]:
    """The machine's CPU time in seconds since boot, all CPUs summed, by ``/proc/stat`` column."""
    with open("/proc/stat") as f:
        parts = f.readline().split()
    return {name: int(v) / CLK_TCK for name, v in zip(STAT_FIELDS, parts[1:], strict=False)}


def busy_seconds(stat: dict[str, float]) -> float:
    """Non-idle CPU time that this machine's own work used (steal and iowait are not)."""
    return sum(stat.get(k, 0.0) for k in ("user", "nice", "system", "irq", "softirq"))


def proc_cpu_seconds(pid: int) -> float:
    """``utime + stime`` of a process (all its threads, live and exited), in seconds; 0 if it is gone."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return 0.0
    fields = stat[stat.rindex(")") + 2:].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK  # fields 14 and 15 of proc(5)


def _thread_files(pid: int, name: str) -> Iterator[str]:
    """The text of ``/proc/<pid>/task/*/<name>`` for each of the process's live threads (none once it is gone)."""
    try:
        tasks = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return
    for tid in tasks:
        try:
            yield Path(f"/proc/{pid}/task/{tid}/{name}").read_text()
        except OSError:
            continue


def runtime_ns(pids: list[int]) -> int:
    """CPU time the live threads of ``pids`` have run, in ns (``/proc/<pid>/task/*/schedstat``, field 1):
    exact where ``utime + stime`` counts 10 ms ticks, so it can price a few thousand round trips."""
    total = 0
    for pid in pids:
        for text in _thread_files(pid, "schedstat"):
            fields = text.split()
            total += int(fields[0]) if fields else 0
    return total


def runqueue_ns(pids: list[int]) -> int:
    """Time the live threads of ``pids`` have waited on a run queue, woken but not yet running, in ns
    (``schedstat`` field 2): a wake-up's wait for its CPU, busy with another task or, on a VM, a halted
    vCPU coming back (docs/latency.md)."""
    total = 0
    for pid in pids:
        for text in _thread_files(pid, "schedstat"):
            fields = text.split()
            total += int(fields[1]) if len(fields) > 1 else 0
    return total


def proc_ctxsw(pid: int) -> tuple[int, int]:
    """(voluntary, involuntary) context switches summed over the process's threads."""
    vol = invol = 0
    for text in _thread_files(pid, "status"):
        for line in text.splitlines():
            if line.startswith("voluntary_ctxt_switches:"):
                vol += int(line.split()[1])
            elif line.startswith("nonvoluntary_ctxt_switches:"):
                invol += int(line.split()[1])
    return vol, invol


def peak_rss_kb(pid: int) -> int:
    """``VmHWM`` of ``/proc/<pid>/status``: the most resident memory the process has had (KiB); 0 if gone."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1])
    except (OSError, ValueError, IndexError):
        pass
    return 0


def daemon_peak_rss_kb(dp: Row, topo: Topology) -> dict[int, int] | None:
    """Per node, the peak RSS of the dataplane's processes there (summed over the node's process tree:
    one daemon); None for a dataplane without processes."""
    per_node = {i: sum(peak_rss_kb(pid) for pid in dp.node_pids(i)) for i in topo.nodes}
    return per_node if any(per_node.values()) else None


def link_stats(ns: Netns, dev: str = "eth0") -> dict[str, int]:
    out = ns.ip("-s", "-j", "link", "show", "dev", dev).stdout
    stats = json.loads(out)[0]["stats64"]
    return {
        "rx_packets": stats["rx"]["packets"], "rx_bytes": stats["rx"]["bytes"], "rx_dropped": stats["rx"]["dropped"],
        "tx_packets": stats["tx"]["packets"], "tx_bytes": stats["tx"]["bytes"], "tx_dropped": stats["tx"]["dropped"],
    }


def machine_busy_fraction(seconds: float = 0.5) -> float:
    """How busy the machine is before we start (other people's work skews every figure)."""
    a, t0 = read_cpu_stat(), time.monotonic()
    time.sleep(seconds)
    b, t1 = read_cpu_stat(), time.monotonic()
    return (busy_seconds(b) - busy_seconds(a)) / ((t1 - t0) * (os.cpu_count() or 1))


def own_cpu_seconds(live_pids: list[int]) -> float:
    """CPU of this harness and everything it ran: itself, its reaped children (every short-lived
    ``ip netns exec`` tool, iperf3 clients included) and the long-running processes not yet reaped."""
    self_, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return (self_.ru_utime + self_.ru_stime + children.ru_utime + children.ru_stime
            + sum(proc_cpu_seconds(p) for p in live_pids))


@dataclass
class Reading:
    """Counters and CPU times of a lab at one instant; two make a measured window."""

    time: float
    cpu: dict[str, float]
    pids: list[int]
    proc_cpu: float
    run_ns: int  # the dataplane's threads' run time, exact (schedstat)
    own_cpu: float
    ctx: tuple[int, int]
    nodes: dict[int, dict[str, int]]
    pods: dict[int, dict[str, int]]


def read_now(dp: Row, topo: Topology, pids: list[int] | None = None, servers: list[int] = ()) -> Reading:
    """``pids``: the dataplane's processes; ``servers``: our other live processes (for :func:`own_cpu_seconds`)."""
    pids = dp.pids() if pids is None else pids
    ctx = [proc_ctxsw(p) for p in pids]
    return Reading(
        time=time.monotonic(), cpu=read_cpu_stat(), pids=pids,
        proc_cpu=sum(proc_cpu_seconds(p) for p in pids), run_ns=runtime_ns(pids), own_cpu=own_cpu_seconds([*pids, *servers]),
        ctx=(sum(c[0] for c in ctx), sum(c[1] for c in ctx)),
        nodes={i: link_stats(n) for i, n in topo.nodes.items()},
        pods={i: link_stats(p) for i, p in topo.pods.items()},
    )


def window(a: Reading, b: Reading) -> dict:
    """What happened between two snapshots of the same dataplane processes."""
    cpu = {k: round(b.cpu[k] - a.cpu[k], 4) for k in a.cpu}
    seconds = b.time - a.time
    busy = busy_seconds(b.cpu) - busy_seconds(a.cpu)
    # Other people's work: busy time that neither our processes nor the kernel's packet work (softirq) explain.
    foreign = max(0.0, busy - (b.own_cpu - a.own_cpu) - cpu["softirq"] - cpu["irq"])
    return {
        "seconds": round(seconds, 4),
        "foreign_busy_pct": round(foreign / (seconds * (os.cpu_count() or 1)) * 100, 1) if seconds > 0 else None,
        "machine_cpu": cpu,
        "machine_busy_s": round(busy_seconds(b.cpu) - busy_seconds(a.cpu), 4),
        "kernel_cpu_s": round(cpu["system"] + cpu["softirq"] + cpu["irq"], 4),
        "dataplane_cpu_s": round(b.proc_cpu - a.proc_cpu, 4) if a.pids else None,
        "dataplane_run_us": round((b.run_ns - a.run_ns) / 1e3) if a.pids else None,
        "ctx_voluntary": b.ctx[0] - a.ctx[0] if a.pids else None,
        "ctx_involuntary": b.ctx[1] - a.ctx[1] if a.pids else None,
        "underlay_packets": sum(b.nodes[i][k] - a.nodes[i][k] for i in a.nodes for k in ("rx_packets", "tx_packets")),
        "underlay_bytes": sum(b.nodes[i][k] - a.nodes[i][k] for i in a.nodes for k in ("rx_bytes", "tx_bytes")),
        "pod_tx_packets": b.pods[1]["tx_packets"] - a.pods[1]["tx_packets"],
        # what the receiving pods got: pod 2, or every pod but pod 1 in the many-peers lab
        "pod_rx_packets": sum(b.pods[i]["rx_packets"] - a.pods[i]["rx_packets"] for i in a.pods if i != 1),
        "pod_rx_bytes": sum(b.pods[i]["rx_bytes"] - a.pods[i]["rx_bytes"] for i in a.pods if i != 1),
    }


# -- servers in pod 2 -----------------------------------------------------------------------------------------
def wait_listening(ns: Netns, port: int, proto: str = "t", timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    for _ in range(int(timeout / 0.05) + 1):
        out = ns.run("ss", f"-Hln{proto}", "sport", "=", f":{port}", check=False).stdout
        if out.strip():
            return
        if time.monotonic() > deadline:
            break
        time.sleep(0.05)
    raise MeasureError(f"nothing listens on port {port} in {ns.name} after {timeout:.0f}s")


def start_servers(topo: Topology) -> dict[str, subprocess.Popen]:
    """iperf3 and the request/response echo server in pod 2, for the lab's lifetime."""
    pod = topo.pods[2]
    servers = {
        "iperf3": pod.popen(["iperf3", "-s", "-p", str(IPERF_PORT)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL),
        "rr": pod.popen([sys.executable, str(RR_TOOL), "server", str(RR_PORT), str(RR_SIZE)],
                        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL),
        "udp_rr": pod.popen([sys.executable, str(RR_TOOL), "udp-server", str(UDP_RR_PORT)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL),
    }
    wait_listening(pod, IPERF_PORT)
    wait_listening(pod, RR_PORT)
    wait_listening(pod, UDP_RR_PORT, proto="u")
    return servers


def start_iperf_servers(topo: Topology) -> dict[str, subprocess.Popen]:
    """An iperf3 server in every pod but pod 1 (the many-peers lab), for the lab's lifetime."""
    servers = {f"iperf3-{i}": pod.popen(["iperf3", "-s", "-p", str(IPERF_PORT)], stdout=subprocess.DEVNULL,
                                        stderr=subprocess.DEVNULL) for i, pod in topo.pods.items() if i != 1}
    for i in topo.peers(1):
        wait_listening(topo.pods[i], IPERF_PORT)
    return servers


def restart_iperf_server(topo: Topology, servers: dict[str, subprocess.Popen]) -> None:
    """After a failed test iperf3's server can stay busy; a fresh one keeps the next test clean."""
    old = servers["iperf3"]
    if old.poll() is None:
        os.killpg(old.pid, signal.SIGKILL)
        old.wait(timeout=5)
    servers["iperf3"] = topo.pods[2].popen(["iperf3", "-s", "-p", str(IPERF_PORT)],
                                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    wait_listening(topo.pods[2], IPERF_PORT)


# -- generators in pod 1 --------------------------------------------------------------------------------------
def iperf3(topo: Topology, args: list[str], duration: float) -> dict:
    target = str(topo.pods[2].address)
    cmd = ["iperf3", "-c", target, "-p", str(IPERF_PORT), "-J", "--connect-timeout", "3000", *args]
    try:
        proc = topo.pods[1].run(*cmd, check=False, timeout=duration + 20)
    except subprocess.TimeoutExpired as exc:
        raise MeasureError(f"iperf3 {' '.join(args)} did not finish within {duration + 20:.0f}s") from exc
    try:
        data = json.loads(proc.stdout)
    except json.JSONDecodeError as exc:
        raise MeasureError(f"iperf3 {' '.join(args)} printed no JSON (exit {proc.returncode}): "
                           f"{(proc.stderr or proc.stdout).strip()[:200]}") from exc
    if data.get("error") or proc.returncode != 0:
        raise MeasureError(f"iperf3 {' '.join(args)}: {data.get('error') or f'exit {proc.returncode}'}")
    return data


def tcp_throughput(topo: Topology, streams: int, duration: float, omit: int, congestion: str = CONGESTION) -> dict:
    """iperf3 TCP with ``congestion`` control set on its sockets (-C), whatever the host's default is."""
    data = iperf3(topo, ["-t", str(duration), "-P", str(streams), "-O", str(omit), "-C", congestion], duration + omit)
    end = data["end"]
    cpu = end.get("cpu_utilization_percent", {})
    return {
        "gbps": end["sum_received"]["bits_per_second"] / 1e9,
        "bytes": end["sum_received"]["bytes"],
        "seconds": end["sum_received"]["seconds"],
        "retransmits": end["sum_sent"].get("retransmits"),
        "sender_cpu_pct": cpu.get("host_total"),
        "receiver_cpu_pct": cpu.get("remote_total"),
        "congestion": end.get("sender_tcp_congestion", congestion),
    }


def tcp_to_peers(topo: Topology, streams: int, duration: float, omit: int, congestion: str = CONGESTION) -> dict:
    """``streams`` TCP streams from pod 1 to each other pod at once (one iperf3 client per peer, started
    together): the sum of what the receivers got, and each peer's share."""
    cmd = ["iperf3", "-p", str(IPERF_PORT), "-J", "--connect-timeout", "3000", "-t", str(duration), "-P", str(streams),
           "-O", str(omit), "-C", congestion]
    clients = {i: topo.pods[1].popen([*cmd, "-c", str(topo.pods[i].address)], stdout=subprocess.PIPE,
                                     stderr=subprocess.PIPE, text=True) for i in topo.peers(1)}
    outputs = {}
    try:
        for i, proc in clients.items():
            outputs[i] = proc.communicate(timeout=duration + omit + 20)
    except subprocess.TimeoutExpired as exc:
        raise MeasureError(f"iperf3 to the peers did not finish within {duration + omit + 20:.0f}s") from exc
    finally:
        for proc in clients.values():
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(timeout=5)
    per_peer = {}
    for i, (out, err) in outputs.items():
        try:
            data = json.loads(out)
        except json.JSONDecodeError as exc:
            raise MeasureError(f"iperf3 to pod {i} printed no JSON: {(err or out).strip()[:200]}") from exc
        if data.get("error"):
            raise MeasureError(f"iperf3 to pod {i}: {data['error']}")
        per_peer[i] = data["end"]["sum_received"]
    return {
        "gbps": sum(r["bits_per_second"] for r in per_peer.values()) / 1e9,
        "bytes": sum(r["bytes"] for r in per_peer.values()),
        "peer_gbps": {str(i): r["bits_per_second"] / 1e9 for i, r in per_peer.items()},
        "peers": len(per_peer), "streams_per_peer": streams, "congestion": congestion,
    }


def udp_flood(topo: Topology, payload: int, duration: float) -> dict:
    """iperf3 UDP at full speed (``-b 0``) with ``payload``-byte datagrams.

    Offered = packets pod 1's eth0 sent (the generator's datagrams, one packet each); delivered =
    datagrams that reached pod 2's UDP layer: read by iperf3 (``InDatagrams``) or dropped because its
    socket was full (``RcvbufErrors``). Not pod 2's eth0 packets: a dataplane that merges a flow's
    datagrams (GRO) hands the pod one packet for many, which the pod's UDP layer cuts again. If the
    dataplane delivered ≥ 95 % of what was offered, the generator set the pace: the figure is a lower
    bound (``generator_limited``). The generator's own CPU (iperf3's ``host_total``) is reported alongside.
    """
    before_tx, before_udp = link_stats(topo.pods[1])["tx_packets"], topo.pods[2].snmp()
    data = iperf3(topo, ["-u", "-b", "0", "-l", str(payload), "-t", str(duration)], duration)
    after_tx, after_udp = link_stats(topo.pods[1])["tx_packets"], topo.pods[2].snmp()
    end = data["end"]
    seconds = end["sum"]["seconds"] or duration
    offered = after_tx - before_tx
    delta = {k: after_udp[f"Udp{k}"] - before_udp[f"Udp{k}"] for k in ("InDatagrams", "RcvbufErrors", "InErrors", "InCsumErrors")}
    delivered = delta["InDatagrams"] + delta["RcvbufErrors"]
    ratio = delivered / offered if offered else 0.0
    return {
        "payload": payload,
        "seconds": seconds,
        "offered_pps": offered / seconds,
        "delivered_pps": delivered / seconds,
        "delivered_fraction": round(ratio, 4),
        "generator_limited": ratio >= 0.95,
        "generator_cpu_pct": end.get("cpu_utilization_percent", {}).get("host_total"),
        "pod_udp": delta,
        "iperf_sent_packets": end["sum"].get("packets"),
        "iperf_lost_percent": end["sum"].get("lost_percent"),
    }


def generator_ceiling(pod: Netns, payload: int, duration: float) -> dict:
    """What the UDP generator offers when the path is trivial: iperf3 to a server on loopback in the same pod.

    Compared with a row's offered rate, it tells the generator's own cost from the forwarding work the
    kernel does synchronously inside the generator's ``sendto`` (on veth, a packet's whole kernel path
    runs on the sending CPU).
    """
    port = IPERF_PORT + 1
    server = pod.popen(["iperf3", "-s", "-1", "-p", str(port)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_listening(pod, port)
        cmd = ["iperf3", "-c", "127.0.0.1", "-p", str(port), "-J", "-u", "-b", "0", "-l", str(payload), "-t", str(duration)]
        proc = pod.run(*cmd, check=False, timeout=duration + 20)
        data = json.loads(proc.stdout or "{}")
        if data.get("error") or "end" not in data:
            raise MeasureError(f"iperf3 to loopback: {data.get('error') or proc.stderr.strip()[:200]}")
    finally:
        if server.poll() is None:
            os.killpg(server.pid, signal.SIGKILL)
        server.wait(timeout=5)
    end = data["end"]
    return {"payload": payload, "offered_pps": end["sum"]["packets"] / (end["sum"]["seconds"] or duration),
            "generator_cpu_pct": end.get("cpu_utilization_percent", {}).get("host_total")}


def request_response(client: Netns, target: str, count: int, max_seconds: float, warmup: int = 100,
                     runs: int = RR_RUNS) -> dict:
    """``count`` round trips as ``runs`` client processes one after the other, each on a new connection,
    pooled. On 2 vCPUs one run's p50 depends on where the scheduler happens to put the client, server
    and dataplane processes (it moves by 10–20 %); fresh processes re-draw that placement, so the pooled
    p50 says more about the dataplane and less about one draw. ``run_p50_us`` keeps each run's own."""
    samples: list[int] = []
    per_run: list[float] = []
    each = max(1, count // runs)
    for _ in range(runs):
        args = [sys.executable, str(RR_TOOL), "client", target, str(RR_PORT), str(RR_SIZE), str(each), str(warmup),
                str(max_seconds / runs), "samples"]
        try:
            proc = client.run(*args, check=False, timeout=max_seconds / runs + 15)
        except subprocess.TimeoutExpired as exc:
            raise MeasureError(f"request/response client did not finish within {max_seconds / runs + 15:.0f}s") from exc
        if proc.returncode != 0:
            raise MeasureError(f"request/response client exited {proc.returncode}: {proc.stderr.strip()[-200:]}")
        out = json.loads(proc.stdout)
        samples += out["samples_ns"]
        per_run.append(round(out["p50_us"], 1))
    return {**rr_tool.summarize(samples, size=RR_SIZE, count=each * runs), "runs": runs, "warmup": warmup,
            "run_p50_us": per_run}


# -- sparse round trips: one packet every 5 ms, so every hop wakes up for each -----------------------------
def ping_samples(client: Netns, target: str, count: int) -> list[int]:
    """``ping -i 0.005``: ICMP echo at 200 Hz; every reply's round trip (µs), in the order received.

    ping's output goes to a file, not a pipe: read through a pipe, every reply line would wake this
    harness, a fifth process on the round trip's two vCPUs.
    """
    interval = SPARSE_INTERVAL_MS / 1e3
    with tempfile.TemporaryFile("w+") as out:
        proc = client.popen(["ping", "-n", "-i", f"{interval:g}", "-c", str(count), "-W", "1", target],
                            stdout=out, stderr=subprocess.STDOUT)
        try:
            proc.wait(timeout=count * interval + 15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
            raise MeasureError(f"ping {target}: {count} pings did not finish within {count * interval + 15:.0f}s") from None
        out.seek(0)
        text = out.read()
    times = [round(float(m) * 1000) for m in _PING_TIME.findall(text)]
    if not times:
        raise MeasureError(f"ping {target}: no reply ({text.strip()[-200:]})")
    return times


def sparse_ping(client: Netns, target: str, count: int) -> dict:
    """:func:`ping_samples` summarized: percentiles (µs) and the replies lost."""
    times = ping_samples(client, target, count)
    return {**rr_tool.summarize([t * 1000 for t in times], size=64, count=count),
            "lost": count - len(times), "interval_ms": SPARSE_INTERVAL_MS}


def sparse_udp_rr(client: Netns, target: str, count: int) -> dict:
    """A 64-byte UDP request every 5 ms and its echo (benchmarks/rr.py udp-client)."""
    args = [sys.executable, str(RR_TOOL), "udp-client", target, str(UDP_RR_PORT), str(RR_SIZE), str(count),
            str(SPARSE_INTERVAL_MS)]
    proc = client.run(*args, check=False, timeout=count * SPARSE_INTERVAL_MS / 1e3 + 15)
    if proc.returncode != 0:
        raise MeasureError(f"sparse UDP client exited {proc.returncode}: {proc.stderr.strip()[-200:]}")
    return json.loads(proc.stdout)
