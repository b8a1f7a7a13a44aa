"""The rows whose dataplane is a process on each node: udpflannel (static or the daemon on etcd),
flanneld, or any external command; their counters, and the processes charged with their CPU time.
:func:`builtin_rows` lists every row the benchmark knows (these and the kernel rows of ``rows.py``).
"""

from __future__ import annotations

import json
import os
import re
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

from benchmarks.rows import HostGw, KernelVxlan, Row
from benchmarks.topology import (
    FLANNEL_UDP_PORT,
    NETWORK,
    SUBNETS,
    UDP_OVERHEAD,
    UNDERLAY_MTU,
    DataplaneError,
    Topology,
)
from udpflannel.lab.netns import signal_group


def read_subnet_env(path: Path) -> dict[str, str]:
    return dict(line.split("=", 1) for line in path.read_text().splitlines() if "=" in line)


class ProcessRow(Row):
    """A dataplane made of one process (tree) per node, started with ``ip netns exec``."""

    kind = "userspace"

    def __init__(self, name: str, description: str) -> None:
        super().__init__(name, description)
        self.procs: dict[int, subprocess.Popen] = {}
        self.logs: dict[int, Path] = {}
        self.starts = 0
        self.startups: list[float] = []

    @property
    def running(self) -> bool:
        return bool(self.procs) and all(p.poll() is None for p in self.procs.values())

    def command(self, index: int) -> list[str]:
        raise NotImplementedError

    def environment(self) -> dict[str, str]:
        return {**os.environ, "PYTHONUNBUFFERED": "1"}

    def cwd(self) -> str | None:
        return None

    def subnet_file(self, index: int) -> Path:
        assert self.topo is not None
        return self.topo.workdir / f"{self.slug}-n{index}.env"

    def ready_file(self, index: int) -> Path | None:
        """A file the process writes when it is ready (``None``: readiness is a ping through it)."""
        return None

    def ready_marker(self, index: int) -> Path | None:
        """The file whose last write is the moment the process was ready (for its start-up time)."""
        return self.ready_file(index)

    def start(self) -> None:
        assert self.topo is not None
        self.starts += 1
        started: dict[int, float] = {}
        for i, node in self.topo.nodes.items():
            ready = self.ready_file(i)
            if ready is not None:
                ready.unlink(missing_ok=True)
            self.logs[i] = self.topo.workdir / f"{self.slug}-n{i}-{self.starts}.log"
            with open(self.logs[i], "wb") as log:
                started[i] = time.time()  # (wall clock: compared with the marker's mtime)
                self.procs[i] = node.popen(self.command(i), stdout=log, stderr=subprocess.STDOUT, env=self.environment(),
                                           cwd=self.cwd())
        for i in self.topo.nodes:
            self._wait_ready(i)
        # Start-up to ready from the marker's mtime, not from when we polled it: nodes are waited for in turn
        markers = {i: self.ready_marker(i) for i in self.topo.nodes}
        if all(m is not None for m in markers.values()):
            self.startups.append(round(max(markers[i].stat().st_mtime - started[i] for i in markers), 3))

    def take_startups(self) -> list[float]:
        out, self.startups = self.startups, []
        return out

    def _wait_ready(self, index: int, timeout: float = 20.0) -> None:
        ready = self.ready_file(index)
        if ready is None:
            return
        deadline = time.monotonic() + timeout
        for _ in range(int(timeout / 0.05) + 1):
            if ready.exists():
                env = read_subnet_env(ready)
                if "FLANNEL_MTU" in env:
                    self.pod_mtu = int(env["FLANNEL_MTU"])
                return
            if self.procs[index].poll() is not None:
                raise DataplaneError(f"{self.name} on node {index} exited {self.procs[index].returncode}: "
                                     f"{self.log_tail(index)}")
            if time.monotonic() > deadline:
                break
            time.sleep(0.05)
        raise DataplaneError(f"{self.name} on node {index} did not write {ready.name} within {timeout:.0f}s: "
                             f"{self.log_tail(index)}")

    def log_tail(self, index: int, lines: int = 5) -> str:
        try:
            return " | ".join(self.logs[index].read_text(errors="replace").strip().splitlines()[-lines:])
        except (OSError, KeyError):
            return "(no log)"

    def stop(self) -> dict | None:
        for proc in self.procs.values():
            if proc.poll() is None:
                signal_group(proc, signal.SIGTERM)
        for i, proc in self.procs.items():
            try:
                proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                signal_group(proc, signal.SIGKILL)
                proc.wait(timeout=5)
                raise DataplaneError(f"{self.name} on node {i} ignored SIGTERM for 5s") from None
        self.procs.clear()
        return None

    def teardown(self) -> None:
        if self.procs:
            ProcessRow.stop(self)  # whatever is left, without reading counters

    def node_pids(self, index: int) -> list[int]:
        proc = self.procs.get(index)
        return process_tree(proc.pid) if proc is not None and proc.poll() is None else []

    def pids(self) -> list[int]:
        return [pid for i in sorted(self.procs) for pid in self.node_pids(i)]


COUNTERS_LINE = re.compile(r"counters (\{.*\})\s*$", re.MULTILINE)
COUNTED_SYSCALLS = ("tun_reads", "tun_writes", "udp_recvs", "udp_sends")


class UdpflannelStatic(ProcessRow):
    """``python -m udpflannel static`` on both nodes; ``extra_args`` make further rows (fast-path settings).

    ``code`` is a snapshot of the packages (see :func:`snapshot_code`) put first on ``PYTHONPATH``, so
    every repeat runs the same code even while the shared working tree changes.
    """

    has_counters = True
    many_peers = True

    def __init__(self, name: str = "udpflannel", extra_args: list[str] | None = None, *,
                 code: Path | None = None, description: str = "") -> None:
        self.extra_args = list(extra_args or [])
        self.code = code
        flags = f" {' '.join(self.extra_args)}" if self.extra_args else ""
        super().__init__(name, description or f"udpflannel static mode{flags}")
        self.pod_mtu = UNDERLAY_MTU - UDP_OVERHEAD

    def environment(self) -> dict[str, str]:
        env = super().environment()
        if self.code is not None:
            env["PYTHONPATH"] = str(self.code)
        return env

    def cwd(self) -> str | None:
        # ``python -m`` puts the working directory first on sys.path: it must not be the live checkout
        return str(self.code) if self.code is not None else None

    def ready_file(self, index: int) -> Path | None:
        return self.subnet_file(index)

    def command(self, index: int) -> list[str]:
        assert self.topo is not None
        routes = [a for j in self.topo.peers(index) for a in ("--route", f"{SUBNETS[j]}={self.topo.nodes[j].address}")]
        return [sys.executable, "-m", "udpflannel", "static", "--iface", "eth0", "--subnet", str(SUBNETS[index]),
                "--network", str(NETWORK), *routes, "--port", str(FLANNEL_UDP_PORT), "--subnet-file", str(self.subnet_file(index)), *self.extra_args]

    def stop(self) -> dict | None:
        indices = list(self.procs)
        super().stop()
        per_node = {i: parse_counters(self.logs[i]) for i in indices}
        missing = [i for i, c in per_node.items() if c is None]
        if missing:
            raise DataplaneError(f"{self.name}: no counters line in the log of node(s) {missing}: {self.log_tail(missing[0])}")
        return {"nodes": per_node, "total": sum_counters(list(per_node.values()))}


class UdpflannelTraced(UdpflannelStatic):
    """The default static row with a ``udpflannel trace`` client attached to each node's daemon, its
    filter matching nothing (:data:`NOBODY`): what a listener that wants none of the traffic costs the
    dataplane (issue 19: nothing measurable). The clients' own processes are not charged to the row;
    they sleep in ``recv``."""

    NOBODY = "192.0.2.1"  # TEST-NET-1 (RFC 5737): no pod, node or peer of the lab has it

    def __init__(self, name: str = "udpflannel +trace", *, code: Path | None = None) -> None:
        super().__init__(name, code=code, description="udpflannel static mode (fast path), a `udpflannel trace "
                                                      f"--host {self.NOBODY}` client attached on each node")
        self.tracers: dict[int, subprocess.Popen] = {}

    def control_socket(self, index: int) -> Path:
        assert self.topo is not None
        return self.topo.workdir / f"{self.slug}-n{index}.sock"

    def command(self, index: int) -> list[str]:
        return [*super().command(index), "--control-socket", str(self.control_socket(index))]

    def start(self) -> None:
        super().start()
        assert self.topo is not None
        for i, node in self.topo.nodes.items():
            log = self.topo.workdir / f"{self.slug}-n{i}-{self.starts}-trace.log"
            with open(log, "wb") as out:
                self.tracers[i] = node.popen([sys.executable, "-m", "udpflannel", "trace", "--control-socket",
                                              str(self.control_socket(i)), "--host", self.NOBODY],
                                             stdout=out, stderr=subprocess.STDOUT, env=self.environment(), cwd=self.cwd())
            deadline = time.monotonic() + 20
            while "tracing" not in log.read_text(errors="replace"):
                if self.tracers[i].poll() is not None or time.monotonic() > deadline:
                    raise DataplaneError(f"{self.name}: udpflannel trace on node {i} did not attach: "
                                         f"{log.read_text(errors='replace')[-500:]}")
                time.sleep(0.05)

    def stop(self) -> dict | None:
        for proc in self.tracers.values():
            if proc.poll() is None:
                signal_group(proc, signal.SIGINT)
        for proc in self.tracers.values():
            try:
                proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                signal_group(proc, signal.SIGKILL)
                proc.wait(timeout=5)
        self.tracers.clear()
        return super().stop()

    def teardown(self) -> None:
        for proc in self.tracers.values():
            if proc.poll() is None:
                signal_group(proc, signal.SIGKILL)
                proc.wait(timeout=5)
        self.tracers.clear()
        super().teardown()


class OnEtcd(ProcessRow):
    """A dataplane whose nodes lease their subnets from a real etcd in the hub namespace (mixed in).

    Each node's subnet.env is pre-seeded with the lab's subnet, so the daemon's own acquisition order
    (previous subnet from subnet.env) gives the pods the addresses every other row uses. Ready is when
    subnet.env carries FLANNEL_MTU (the seeded file has none).
    """

    etcd = None

    def setup(self, topo: Topology) -> None:
        from udpflannel.lab.etcd import EtcdServer
        from udpflannel.lab.netns import HUB_ADDRESS

        super().setup(topo)
        self.etcd = EtcdServer(host=str(HUB_ADDRESS), port=2379, netns=topo.hub.name)
        try:
            self.etcd.start()
            self.etcd.ctl("put", "/coreos.com/network/config",
                          json.dumps({"Network": str(NETWORK), "Backend": {"Type": "udp", "Port": FLANNEL_UDP_PORT}}))
        except Exception as exc:
            raise DataplaneError(f"etcd for {self.name} did not start: {exc}") from exc

    def start(self) -> None:
        assert self.topo is not None and self.etcd is not None
        for i, node in self.topo.nodes.items():  # what a restarted node finds: its subnet.env and every lease
            self.subnet_file(i).write_text(f"FLANNEL_NETWORK={NETWORK}\nFLANNEL_SUBNET={SUBNETS[i].network_address + 1}/"
                                           f"{SUBNETS[i].prefixlen}\n")
            # With every record already there, each daemon's first listing holds its peer: flanneld's watch
            # can miss a lease written while it starts (its README), and two nodes start together here.
            self.etcd.ctl("put", f"/coreos.com/network/subnets/{SUBNETS[i].network_address}-{SUBNETS[i].prefixlen}",
                          json.dumps({"PublicIP": str(node.address), "PublicIPv6": None}, separators=(",", ":")))
        super().start()
        for i in self.topo.nodes:
            got = read_subnet_env(self.subnet_file(i)).get("FLANNEL_SUBNET", "")
            if got != f"{SUBNETS[i].network_address + 1}/{SUBNETS[i].prefixlen}":
                raise DataplaneError(f"{self.name} on node {i} leased {got}, not {SUBNETS[i]}")

    def ready_file(self, index: int) -> Path | None:
        return self.subnet_file(index).with_suffix(".ready")

    def ready_marker(self, index: int) -> Path | None:
        return self.subnet_file(index)  # seeded before the start, written again with FLANNEL_MTU when ready

    def _wait_ready(self, index: int, timeout: float = 20.0) -> None:
        deadline = time.monotonic() + timeout
        while "FLANNEL_MTU" not in read_subnet_env(self.subnet_file(index)):
            if self.procs[index].poll() is not None:
                raise DataplaneError(f"{self.name} on node {index} exited {self.procs[index].returncode}: "
                                     f"{self.log_tail(index)}")
            if time.monotonic() > deadline:
                raise DataplaneError(f"{self.name} on node {index} not ready within {timeout:.0f}s: {self.log_tail(index)}")
            time.sleep(0.05)
        self.pod_mtu = int(read_subnet_env(self.subnet_file(index))["FLANNEL_MTU"])

    def etcd_flags(self, index: int) -> list[str]:
        """The flags both daemons take: etcd, interface, subnet file; no FORWARD rules (no other row has any)."""
        assert self.etcd is not None
        return [f"--etcd-endpoints={self.etcd.endpoint}", "--iface=eth0", f"--subnet-file={self.subnet_file(index)}",
                "--iptables-forward-rules=false"]

    def teardown(self) -> None:
        try:
            super().teardown()
        finally:
            if self.etcd is not None:
                self.etcd.close()
                self.etcd = None


class UdpflannelDaemon(OnEtcd, UdpflannelStatic):
    """The real thing: etcd in the hub namespace, ``udpflannel`` with flanneld's flags on each node."""

    def __init__(self, name: str = "udpflannel daemon", extra_args: list[str] | None = None, *,
                 code: Path | None = None, description: str = "") -> None:
        super().__init__(name, extra_args, code=code, description=description or "udpflannel daemon on a real etcd")

    def command(self, index: int) -> list[str]:
        return [sys.executable, "-m", "udpflannel", *self.etcd_flags(index),
                f"--control-socket={self.control_socket(index)}", *self.extra_args]

    def control_socket(self, index: int) -> Path:
        """Short on purpose: a unix socket path must fit in 108 bytes, a pytest tmp_path may not."""
        assert self.topo is not None
        return Path("/tmp") / f"{self.topo.lab.tag}-n{index}.sock"


class Flanneld(OnEtcd):
    """flannel's own daemon with its UDP backend (the C proxy), on the same etcd set-up as the daemon row:
    the alternative udpflannel replaces on nodes without VXLAN. No counters: the figures come from /proc
    and the interfaces, as for the kernel rows."""

    def __init__(self, binary: Path, name: str = "flanneld") -> None:
        super().__init__(name, f"flanneld {binary.name} (flannel's UDP backend, C proxy)")
        self.binary = binary
        self.pod_mtu = UNDERLAY_MTU - UDP_OVERHEAD

    def command(self, index: int) -> list[str]:
        return [str(self.binary), *self.etcd_flags(index)]


def parse_counters(log: Path) -> dict | None:
    """The JSON counters udpflannel logs when it stops (``... stopping; counters {...}``)."""
    matches = COUNTERS_LINE.findall(log.read_text(errors="replace"))
    return json.loads(matches[-1]) if matches else None


def sum_counters(items: list[dict]) -> dict:
    """Sum the integer counters of several nodes; ``syscalls`` and ``packets`` as udpflannel defines them."""
    total: dict[str, int] = {}
    for item in items:
        for key, value in item.items():
            if isinstance(value, int) and not isinstance(value, bool):
                total[key] = total.get(key, 0) + value
    total["syscalls"] = sum(total.get(k, 0) for k in COUNTED_SYSCALLS)
    total["packets"] = total.get("tun_packets", 0) + total.get("udp_packets", 0)
    return total


PLACEHOLDERS = ("node", "index", "iface", "address", "subnet", "network", "peer_subnet", "peer_address",
                "port", "subnet_file", "mtu")


class External(ProcessRow):
    """Any dataplane started by a command line, run (through ``sh -c``) inside each node's namespace.

    Placeholders: ``{node}`` namespace name, ``{index}`` 1 or 2, ``{iface}`` eth0, ``{address}`` the node's
    underlay address, ``{subnet}``/``{peer_subnet}`` the two pod subnets, ``{peer_address}``, ``{network}``
    10.5.0.0/16, ``{port}`` 8285, ``{mtu}`` the underlay MTU, ``{subnet_file}`` a path: if the command
    uses it, the harness waits for that file and takes the pod MTU from its ``FLANNEL_MTU``; otherwise
    the pods get ``default_mtu`` and readiness is a ping from pod to pod.
    """

    def __init__(self, name: str, template: str, default_mtu: int = UNDERLAY_MTU - UDP_OVERHEAD) -> None:
        super().__init__(name, f"external command: {template}")
        self.template = template
        self.pod_mtu = default_mtu
        try:
            self.template.format(**{k: "" for k in PLACEHOLDERS})
        except (KeyError, IndexError, ValueError) as exc:
            raise DataplaneError(f"--external {name}: bad placeholder {exc}; known: {', '.join(PLACEHOLDERS)}") from exc

    def ready_file(self, index: int) -> Path | None:
        return self.subnet_file(index) if "{subnet_file}" in self.template else None

    def command(self, index: int) -> list[str]:
        assert self.topo is not None
        node, peer = self.topo.nodes[index], self.topo.peer(index)
        values = {
            "node": node.name, "index": index, "iface": "eth0", "address": node.address, "subnet": SUBNETS[index],
            "network": NETWORK, "peer_subnet": SUBNETS[peer], "peer_address": self.topo.nodes[peer].address,
            "port": FLANNEL_UDP_PORT, "subnet_file": self.subnet_file(index), "mtu": node.mtu,
        }
        return ["sh", "-c", "exec " + self.template.format(**{k: shlex.quote(str(v)) for k, v in values.items()})]


NO_FAST_PATH = "--no-fast-path"


def builtin_rows(variants: dict[str, list[str]] | None = None, externals: dict[str, str] | None = None,
                       external_mtu: int = UNDERLAY_MTU - UDP_OVERHEAD, *, code: Path | None = None,
                       static_flags: frozenset[str] = frozenset(), flanneld: Path | None = None) -> dict[str, Row]:
    """The rows by name, in table order: udpflannel (and its variants), externals, flanneld (given its
    binary), then the kernel references.

    ``static_flags``: what ``udpflannel static --help`` of the code snapshot offers; with ``--no-fast-path``
    the per-packet path gets a row of its own next to the default (fast-path) one.
    """
    if NO_FAST_PATH in static_flags:
        rows: dict[str, Row] = {
            "udpflannel": UdpflannelStatic(code=code, description="udpflannel static mode, default settings (fast path)"),
            f"udpflannel {NO_FAST_PATH}": UdpflannelStatic(f"udpflannel {NO_FAST_PATH}", [NO_FAST_PATH], code=code,
                                                          description="udpflannel static mode, per-packet path"),
        }
    else:
        rows = {"udpflannel": UdpflannelStatic(code=code, description="udpflannel static mode, per-packet path")}
    if ((code or Path(__file__).parent.parent) / "udpflannel" / "tracehub.py").exists():  # `udpflannel trace` exists
        rows["udpflannel +trace"] = UdpflannelTraced(code=code)
    rows["udpflannel daemon"] = UdpflannelDaemon(code=code)
    for name, args in (variants or {}).items():
        rows[name] = UdpflannelStatic(name, args, code=code)
    for name, template in (externals or {}).items():
        rows[name] = External(name, template, external_mtu)
    if flanneld is not None:
        rows["flanneld"] = Flanneld(flanneld)
    rows["vxlan"] = KernelVxlan()
    rows["host-gw"] = HostGw()
    return rows


# -- processes --------------------------------------------------------------------------------------------
def process_tree(root: int) -> list[int]:
    """``root`` and all its live descendants (an external command may fork workers)."""
    children: dict[int, list[int]] = {}
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            stat = Path(entry.path, "stat").read_text()
        except OSError:
            continue
        ppid = int(stat[stat.rindex(")") + 2:].split()[1])
        children.setdefault(ppid, []).append(int(entry.name))
    out, todo = [], [root]
    for _ in range(10000):  # bounded walk
        if not todo:
            break
        pid = todo.pop()
        if os.path.exists(f"/proc/{pid}"):
            out.append(pid)
            todo.extend(children.get(pid, []))
    return out
