"""An etcd-backed udpflannel cluster in namespaces: etcd on the hub, one daemon per node, pods on cni0.

The demo, the cluster tests and the benchmarks all build the same thing with it::

    with Lab() as lab, Cluster(lab, workdir) as cluster:
        cluster.put_config({"Network": "10.5.0.0/16", "Backend": {"Type": "udp"}})
        node = cluster.start_node(1)          # udpflannel with flanneld-style flags
        env = cluster.wait_ready(1)           # subnet.env as a dict
        pod = cluster.add_pod(1)              # cni0 = FLANNEL_SUBNET, pod = .2

``Cluster(lab, workdir, etcd_members=3)`` runs a 3-member etcd cluster on the hub instead of one etcd
(``udpflannel.lab.etcdcluster``); ``cluster.etcd`` then kills and restarts members.

Given flannel's binaries (``udpflannel.lab.flanneld``), a node can run the real ``flanneld`` instead,
with the same flags, and its pods are then wired by flannel's own CNI plugin::

    cluster = Cluster(lab, workdir, flanneld=find_flanneld(workdir), flannel_cni=find_flannel_cni(workdir))
    cluster.start_flanneld(4)
"""

from __future__ import annotations

import datetime
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from ipaddress import IPv4Interface
from pathlib import Path

from udpflannel.lab.etcd import EtcdServer
from udpflannel.lab.etcdcluster import EtcdCluster
from udpflannel.lab.etcdcluster import on_hub as etcd_on_hub
from udpflannel.lab.netns import HUB_ADDRESS, Lab, Node, Pod

PREFIX = "/coreos.com/network"
CNI_PATH = "/usr/lib/cni:/opt/cni/bin"  # Debian's containernetworking-plugins, then the usual place
HOST_LOCAL_DIR = "/var/lib/cni/networks"


LOG_LINE = re.compile(r"^(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3}) (\S) (\S+): (.*)$", re.MULTILINE)


def log_lines(text: str) -> list[tuple[float, str, str, str]]:
    """A daemon's log as (wall-clock time, level letter, logger, message), in order."""
    return [(datetime.datetime.strptime(stamp, "%Y-%m-%d %H:%M:%S,%f").timestamp(), level, name, message)
            for stamp, level, name, message in LOG_LINE.findall(text)]


def cni_plugin_command() -> list[str]:
    """The installed ``udpflannel-cni`` next to this interpreter, else the module."""
    script = Path(sys.executable).parent / "udpflannel-cni"
    return [str(script)] if script.exists() else [sys.executable, "-m", "udpflannel.cni"]


@dataclass
class ClusterNode:
    index: int
    node: Node
    dir: Path
    proc: subprocess.Popen | None = None
    pod: Pod | None = None
    extra_args: list[str] = field(default_factory=list)
    kind: str = "udpflannel"  # or "flanneld": which daemon runs (or ran last) on this node

    @property
    def subnet_file(self) -> Path:
        return self.dir / "subnet.env"

    @property
    def control_socket(self) -> Path:
        return self.dir / "udpflannel.sock"

    @property
    def log_path(self) -> Path:
        return self.dir / "udpflannel.log"

    def env(self) -> dict[str, str]:
        return dict(line.split("=", 1) for line in self.subnet_file.read_text().splitlines() if "=" in line)

    def log(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except OSError:
            return "(no log)"


class Cluster:
    """Owns etcd and the daemons; the ``Lab`` owns the namespaces."""

    def __init__(self, lab: Lab, workdir: Path, *, healthz_port: int = 8286, flanneld: Path | None = None,
                 flannel_cni: Path | None = None, etcd_members: int = 1) -> None:
        """``etcd_members`` > 1: an etcd cluster of that many members on the hub (198.18.0.241 onwards;
        node indexes stay below), every daemon given all of them in ``--etcd-endpoints``."""
        self.lab = lab
        self.workdir = Path(workdir)
        self.healthz_port = healthz_port
        self.flanneld = flanneld
        self.flannel_cni = flannel_cni
        self.hub = lab.hub or lab.add_hub()
        self.etcd: EtcdServer | EtcdCluster = (
            EtcdServer(host=str(HUB_ADDRESS), port=2379, netns=self.hub.name) if etcd_members == 1
            else etcd_on_hub(self.hub, etcd_members))
        self.nodes: dict[int, ClusterNode] = {}
        self.cni_network = f"{lab.tag}-cbr0"  # host-local keeps its leases under /var/lib/cni/networks/<name>

    def __enter__(self) -> Cluster:
        self.etcd.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        try:
            for n in self.nodes.values():
                self.stop_node(n.index)
        finally:
            self.etcd.close()
            shutil.rmtree(Path(HOST_LOCAL_DIR) / self.cni_network, ignore_errors=True)

    @property
    def endpoint(self) -> str:
        return self.etcd.endpoint

    def put_config(self, config: dict | str) -> None:
        value = config if isinstance(config, str) else json.dumps(config)
        self.etcd.ctl("put", f"{PREFIX}/config", value)

    def leases(self) -> dict[str, str]:
        """Every key under <prefix>/subnets with its value, as etcdctl prints them."""
        out = self.etcd.ctl("get", "--prefix", f"{PREFIX}/subnets").splitlines()
        return dict(zip(out[0::2], out[1::2], strict=False))

    def add_node(self, index: int, *, mtu: int = 1500) -> ClusterNode:
        node = self.lab.add_node(index, mtu=mtu)
        directory = self.workdir / f"node{index}"
        directory.mkdir(parents=True, exist_ok=True)
        self.nodes[index] = ClusterNode(index, node, directory)
        return self.nodes[index]

    def start_node(self, index: int, *extra: str) -> ClusterNode:
        """Start (or restart) udpflannel on node ``index`` with flanneld's flags."""
        n = self.nodes.get(index) or self.add_node(index)
        if extra or n.kind != "udpflannel":
            n.extra_args = list(extra)
        n.kind = "udpflannel"
        return self._launch(n, [sys.executable, "-m", "udpflannel", *self._common_flags(n),
                                f"--control-socket={n.control_socket}", *n.extra_args])

    def start_flanneld(self, index: int, *extra: str) -> ClusterNode:
        """Start (or restart) flannel's own daemon on node ``index``, with the flags a udpflannel node gets."""
        if self.flanneld is None:
            raise RuntimeError("this cluster was built without a flanneld binary (Cluster(..., flanneld=PATH))")
        n = self.nodes.get(index) or self.add_node(index)
        if extra or n.kind != "flanneld":
            n.extra_args = list(extra)
        n.kind = "flanneld"
        return self._launch(n, [str(self.flanneld), *self._common_flags(n), *n.extra_args])

    def _common_flags(self, n: ClusterNode) -> list[str]:
        return [f"--etcd-endpoints={self.endpoint}", "--iface=eth0", f"--subnet-file={n.subnet_file}",
                f"--healthz-port={self.healthz_port}"]

    def _launch(self, n: ClusterNode, args: list[str]) -> ClusterNode:
        log = open(n.log_path, "ab")
        n.proc = n.node.popen(args, stdout=log, stderr=subprocess.STDOUT, env={**os.environ, "PYTHONUNBUFFERED": "1"})
        log.close()
        return n

    def wait_ready(self, index: int, timeout: float = 20.0, *, newer_than: float | None = None) -> dict[str, str]:
        """Until the node's subnet.env appears (flanneld's readiness point); fails if the daemon died.
        ``newer_than`` (a ``st_mtime``): until a daemon writes it anew, as one taking over from another does."""
        n = self.nodes[index]
        deadline = time.monotonic() + timeout

        def written() -> bool:
            try:
                mtime = n.subnet_file.stat().st_mtime
            except FileNotFoundError:
                return False
            return newer_than is None or mtime > newer_than

        while not written():
            if n.proc is not None and n.proc.poll() is not None:
                raise RuntimeError(f"{n.kind} on node {index} exited {n.proc.returncode}:\n{n.log()[-4000:]}")
            if time.monotonic() > deadline:
                raise TimeoutError(f"node {index} not ready after {timeout}s:\n{n.log()[-4000:]}")
            time.sleep(0.05)
        return n.env()

    def routed_subnets(self, index: int) -> set[str]:
        """The peer subnets node ``index`` routes now: from udpflannel's status, or from flanneld's log
        (its ``Subnet added: X`` / ``Subnet removed: X`` lines are its only record of them)."""
        n = self.nodes[index]
        if n.kind == "flanneld":
            routed: set[str] = set()
            for verb, subnet in re.findall(r"Subnet (added|removed): (\S+)", n.log()):
                (routed.add if verb == "added" else routed.discard)(subnet)
            return routed
        out = n.node.run(sys.executable, "-m", "udpflannel", "status", "--json",
                         f"--control-socket={n.control_socket}", check=False).stdout
        return {peer["subnet"] for peer in json.loads(out)["peers"]} if out else set()

    def add_pod(self, index: int, *, cni: bool = True) -> Pod:
        """A pod on node ``index``, wired as kubelet would: udpflannel-cni delegating to bridge + host-local.

        ``cni=False`` builds the same cni0/veth by hand (no bridge-plugin masquerade rules).
        """
        n = self.nodes[index]
        env = n.env()
        if not cni:
            n.pod = self.lab.add_pod(n.node, env["FLANNEL_SUBNET"], mtu=int(env["FLANNEL_MTU"]))
            return n.pod
        pod = self.lab.add_netns(f"n{index}p2", Pod, node=n.node)
        result = json.loads(self.cni(index, "ADD", pod.name))
        pod.address = IPv4Interface(result["ips"][0]["address"]).ip
        n.pod = pod
        return pod

    def cni(self, index: int, command: str, container: str) -> str:
        """Run the node's CNI plugin as a container runtime would; returns its stdout. A flanneld node's
        pods are wired by flannel's own plugin when the cluster has it, every other pod by udpflannel-cni."""
        n = self.nodes[index]
        flannel_plugin = n.kind == "flanneld" and self.flannel_cni is not None
        netconf = {
            "cniVersion": "0.4.0" if flannel_plugin else "1.0.0", "name": self.cni_network, "type": "flannel",
            "subnetFile": str(n.subnet_file), "dataDir": str(n.dir / "cni"),
            "delegate": {"hairpinMode": True, "isDefaultGateway": True},
        }
        plugin = [str(self.flannel_cni)] if flannel_plugin else cni_plugin_command()
        env = {**os.environ, "CNI_COMMAND": command, "CNI_CONTAINERID": container, "CNI_NETNS": f"/var/run/netns/{container}",
               "CNI_IFNAME": "eth0", "CNI_PATH": CNI_PATH}
        proc = subprocess.run(["ip", "netns", "exec", n.node.name, *plugin], input=json.dumps(netconf),
                              capture_output=True, text=True, env=env, timeout=30)
        if proc.returncode != 0:
            raise RuntimeError(f"{Path(plugin[-1]).name} {command} on node {index} failed: {proc.stdout} {proc.stderr}")
        return proc.stdout

    def stop_node(self, index: int, sig: int = signal.SIGTERM, timeout: float = 5.0) -> int | None:
        """Signal the node's daemon (either kind) and wait for it; returns its exit code (None if it was
        not running)."""
        n = self.nodes[index]
        proc, n.proc = n.proc, None
        if proc is None or proc.poll() is not None:
            return proc.returncode if proc else None
        os.killpg(proc.pid, sig)
        try:
            return proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=5)
            raise
