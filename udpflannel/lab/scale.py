"""A cluster at scale: a few real daemons among a thousand simulated nodes, and what to read from them.

Shared by the scale tests (tests/test_scale.py) and the soak (``python -m benchmarks --soak``)::

    with Lab() as lab, Cluster(lab, workdir) as cluster:
        cluster.put_config(SCALE_CONFIG)
        writer(cluster, "fill", 0, 1000)             # 1,000 simulated nodes (udpflannel.lab.leasewriter)
        proxy = EtcdProxy(cluster)                   # a node given proxy.endpoint can be cut off etcd
        cluster.start_node(1); ...
        rss_kib(daemon_pid(cluster.nodes[1])), scrape(cluster.nodes[1]), lags(writes, node.log())

Real daemons lease from ``10.127.0.0/16`` (SubnetMin/SubnetMax); simulated nodes hold the rest of
``10.64.0.0/10``, so neither ever overwrites the other.
"""

from __future__ import annotations

import asyncio
import base64
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
from collections.abc import Iterable

from prometheus_client.parser import text_string_to_metric_families

from udpflannel.httpapi import get
from udpflannel.lab.cluster import PREFIX, Cluster, ClusterNode, log_lines
from udpflannel.lab.netns import HUB_ADDRESS

SCALE_CONFIG = {"Network": "10.64.0.0/10", "SubnetMin": "10.127.0.0", "SubnetMax": "10.127.255.0",
                "Backend": {"Type": "udp"}}
PROXY_PORT = 23790


# -- simulated nodes ---------------------------------------------------------------------------------------

def _writer_args(cluster: Cluster, *args: object) -> list[str]:
    return [sys.executable, "-m", "udpflannel.lab.leasewriter", cluster.etcd.endpoint.split(",")[0], PREFIX,
            *map(str, args)]


def writer(cluster: Cluster, *args: object, timeout: float = 120) -> list[dict]:
    """Run one leasewriter command in the hub namespace; its records (the last ``done`` line dropped)."""
    out = cluster.hub.run(*_writer_args(cluster, *args), timeout=timeout).stdout
    return [json.loads(line) for line in out.splitlines() if line.strip() and "done" not in line]


class BackgroundWriter:
    """A leasewriter command running in the hub while the caller does other things (churn, say)."""

    def __init__(self, cluster: Cluster, *args: object) -> None:
        self._out = tempfile.TemporaryFile("w+")
        self.proc = cluster.hub.popen(_writer_args(cluster, *args), stdout=self._out, stderr=subprocess.STDOUT,
                                      text=True)

    def finish(self, timeout: float) -> tuple[list[dict], dict]:
        """(records, summary) once the command has ended; RuntimeError if it failed."""
        self.proc.wait(timeout=timeout)
        self._out.seek(0)
        lines = self._out.read().splitlines()
        self._out.close()
        if self.proc.returncode != 0:
            raise RuntimeError(f"leasewriter exited {self.proc.returncode}:\n" + "\n".join(lines[-20:]))
        parsed = [json.loads(line) for line in lines if line.startswith("{")]
        return [r for r in parsed if "done" not in r], next((r for r in parsed if "done" in r), {})


class EtcdProxy:
    """``udpflannel.lab.tcpproxy`` in the hub, in front of the cluster's etcd: a node given ``endpoint``
    can be cut off etcd (``cut``) and reconnected (``restore``) while the others are not."""

    def __init__(self, cluster: Cluster, port: int = PROXY_PORT) -> None:
        self.endpoint = f"http://{HUB_ADDRESS}:{port}"
        self.proc = cluster.hub.popen([sys.executable, "-m", "udpflannel.lab.tcpproxy", str(HUB_ADDRESS), str(port),
                                       str(HUB_ADDRESS), "2379"], stdout=subprocess.PIPE, text=True)
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline().strip()
        if line != "listening":
            raise RuntimeError(f"the etcd proxy did not start: {line!r}")

    def cut(self) -> None:
        self.proc.send_signal(signal.SIGUSR1)

    def restore(self) -> None:
        self.proc.send_signal(signal.SIGUSR2)


# -- reading a daemon --------------------------------------------------------------------------------------

def daemon_pid(n: ClusterNode) -> int:
    """The daemon's own pid (``ip netns exec`` execs it, so it is the Popen's)."""
    assert n.proc is not None and n.proc.poll() is None, f"node {n.index} is not running"
    return n.proc.pid


def rss_kib(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmRSS:"))


def fd_count(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def _control(n: ClusterNode, path: str) -> bytes:
    code, body = asyncio.run(get(path, unix_socket=str(n.control_socket), timeout=10))
    if code != 200:
        raise RuntimeError(f"{path} on node {n.index}: HTTP {code}")
    return body


def scrape(n: ClusterNode) -> dict[str, float]:
    """The daemon's /metrics over its control socket: ``name`` or ``name{label=value,...}`` -> value."""
    out = {}
    for family in text_string_to_metric_families(_control(n, "/metrics").decode()):
        for s in family.samples:
            labels = ",".join(f"{k}={v}" for k, v in sorted(s.labels.items()))
            out[f"{s.name}{{{labels}}}" if labels else s.name] = s.value
    return out


def status(n: ClusterNode) -> dict:
    return json.loads(_control(n, "/status"))


def routes(n: ClusterNode) -> dict[str, str]:
    """What the daemon routes now: subnet -> PublicIP."""
    return {p["subnet"]: p["public_ip"] for p in status(n)["peers"]}


def etcd_records(cluster: Cluster) -> dict[str, str]:
    """Every lease record in etcd: subnet -> PublicIP."""
    out = {}
    for kv in json.loads(cluster.etcd.ctl("get", "--prefix", f"{PREFIX}/subnets/", "-w", "json")).get("kvs", []):
        key = base64.b64decode(kv["key"]).decode().rsplit("/", 1)[1]
        out[key.replace("-", "/")] = json.loads(base64.b64decode(kv["value"]))["PublicIP"]
    return out


# -- lags ---------------------------------------------------------------------------------------------------

def applied(log_text: str, since: float = 0.0) -> dict[tuple[str, str], float]:
    """When the daemon first logged each ``("put"|"del", subnet)`` at or after ``since``."""
    out: dict[tuple[str, str], float] = {}
    for t, _, _, text in log_lines(log_text):
        if t < since:
            continue
        if text.startswith("Subnet added: "):
            out.setdefault(("put", text.split()[2]), t)
        elif text.startswith("Subnet removed: "):
            out.setdefault(("del", text.split()[2]), t)
    return out


def lags(writes: Iterable[dict], log_text: str, since: float = 0.0) -> tuple[list[float], list[dict]]:
    """Seconds from each write (its ``t``) to the daemon applying it, and the writes it never applied."""
    seen = applied(log_text, since)
    got, missing = [], []
    for w in writes:
        t = seen.get(("del" if w["op"] == "del" else "put", w["subnet"]))
        (missing.append(w) if t is None else got.append(t - w["t"]))
    return got, missing


def percentiles(values: list[float]) -> dict[str, float]:
    if not values:
        return {}
    ordered = sorted(values)
    p99 = ordered[min(len(ordered) - 1, int(0.99 * len(ordered)))]
    return {"n": len(ordered), "p50": statistics.median(ordered), "p99": p99, "max": ordered[-1]}
