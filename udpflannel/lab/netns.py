"""A namespace lab: hosts, an underlay bridge, pods behind ``cni0`` — built with real ``ip`` commands.

Used by the tests, the demo and the benchmarks. It deliberately shells out to ``ip``: these are the
commands a reader would type to build the same lab by hand (the daemon itself uses netlink).

Topology (every name carries a per-run tag, so parallel runs and leftovers never collide)::

    hub ns:   br0 198.18.0.254/24 ── veth ──> node ns: eth0 198.18.0.N/24, cni0 <subnet>.1/24
                                                 └── veth ──> pod ns: eth0 <subnet>.2/24, default via .1
              r<M> 198.18.M.254/24 ── veth ──> routed node ns: eth0 198.18.M.1/24, default via .254

Nothing is created in the root namespace: veth pairs are created inside the hub/node namespace and
their far end is moved straight into the peer namespace. ``close()`` kills what the lab started and
deletes its namespaces (and with them every device in them), also after a failure.
"""

from __future__ import annotations

import ipaddress
import os
import secrets
import signal
import subprocess
import time
from collections.abc import Sequence
from dataclasses import dataclass, field

UNDERLAY = ipaddress.IPv4Network("198.18.0.0/24")  # RFC 2544 benchmarking range: never routed anywhere
HUB_ADDRESS = ipaddress.IPv4Address("198.18.0.254")


def sh(*args: str, check: bool = True, timeout: float = 30, input: str | None = None) -> subprocess.CompletedProcess:
    """Run a command, capture its output, and say which command failed and why if it does."""
    proc = subprocess.run(args, capture_output=True, text=True, timeout=timeout, input=input)
    if check and proc.returncode != 0:
        raise RuntimeError(f"{' '.join(args)} exited {proc.returncode}: {proc.stderr.strip() or proc.stdout.strip()}")
    return proc


@dataclass
class Netns:
    """One network namespace; ``run``/``popen`` execute inside it."""

    name: str
    lab: Lab = field(repr=False)

    def run(self, *args: str, check: bool = True, timeout: float = 30, input: str | None = None) -> subprocess.CompletedProcess:
        return sh("ip", "netns", "exec", self.name, *args, check=check, timeout=timeout, input=input)

    def ip(self, *args: str, check: bool = True) -> subprocess.CompletedProcess:
        return sh("ip", "-n", self.name, *args, check=check)

    def popen(self, args: Sequence[str], **kwargs) -> subprocess.Popen:
        """Start a long-running process in this namespace; the lab kills it on close."""
        proc = subprocess.Popen(["ip", "netns", "exec", self.name, *args], start_new_session=True, **kwargs)
        self.lab.processes.append(proc)
        return proc

    def sysctl(self, key: str, value: str) -> None:
        self.run("sysctl", "-qw", f"{key}={value}")

    def snmp(self) -> dict[str, int]:
        """Every counter of ``/proc/net/snmp`` in this namespace, named as ``nstat`` does
        (``UdpInDatagrams``, ``IcmpInTimeExcds``...)."""
        lines = self.run("cat", "/proc/net/snmp").stdout.splitlines()
        out: dict[str, int] = {}
        for names, values in zip(lines[::2], lines[1::2], strict=True):
            proto = names.split(":")[0]
            for name, value in zip(names.split()[1:], values.split()[1:], strict=True):
                out[proto + name] = int(value)
        return out


@dataclass
class Node(Netns):
    """A host on the underlay: ``eth0`` with ``address``."""

    address: ipaddress.IPv4Address = HUB_ADDRESS
    mtu: int = 1500


@dataclass
class Pod(Netns):
    """A pod namespace behind its node's ``cni0`` bridge."""

    address: ipaddress.IPv4Address = HUB_ADDRESS
    node: Node | None = None


class Lab:
    """Builds and tears down namespaces. Use as a context manager."""

    def __init__(self, tag: str | None = None) -> None:
        self.tag = tag or f"uf{secrets.token_hex(3)}"
        self.namespaces: list[Netns] = []
        self.processes: list[subprocess.Popen] = []
        self.hub: Netns | None = None

    # -- building -------------------------------------------------------------------------
    def add_netns(self, suffix: str, cls: type = Netns, **kw) -> Netns:
        """A bare namespace named ``<tag>-<suffix>`` with loopback up (a pod before CNI runs, say)."""
        return self._netns(suffix, cls, **kw)

    def _netns(self, suffix: str, cls: type = Netns, **kw) -> Netns:
        name = f"{self.tag}-{suffix}"
        sh("ip", "netns", "add", name)
        ns = cls(name=name, lab=self, **kw)
        self.namespaces.append(ns)
        ns.ip("link", "set", "lo", "up")
        return ns

    def add_hub(self) -> Netns:
        """The underlay: a bridge that every node plugs into (and where etcd can listen)."""
        hub = self._netns("hub")
        hub.ip("link", "add", "br0", "type", "bridge")
        hub.ip("addr", "add", f"{HUB_ADDRESS}/{UNDERLAY.prefixlen}", "dev", "br0")
        hub.ip("link", "set", "br0", "up")
        self.hub = hub
        return hub

    def add_node(self, index: int, *, mtu: int = 1500) -> Node:
        """Node ``index`` (1..253) gets underlay address 198.18.0.<index> on ``eth0``."""
        if self.hub is None:
            self.add_hub()
        assert self.hub is not None
        address = UNDERLAY.network_address + index
        node = self._netns(f"n{index}", Node, address=address, mtu=mtu)
        port = f"n{index}"
        self.hub.ip("link", "add", port, "mtu", str(mtu), "type", "veth", "peer", "name", "eth0", "mtu", str(mtu), "netns", node.name)
        self.hub.ip("link", "set", port, "master", "br0", "up")
        node.ip("addr", "add", f"{address}/{UNDERLAY.prefixlen}", "dev", "eth0")
        node.ip("link", "set", "eth0", "up")
        node.sysctl("net.ipv4.ip_forward", "1")
        return node

    def add_routed_node(self, index: int, *, mtu: int = 1500, route_mtu: int = 1500) -> Node:
        """Node ``index`` (1..254) one routed hop away: the hub is its router. It gets its own link to
        the hub, ``198.18.<index>.0/24`` (node ``.1`` on ``eth0``, MTU ``mtu``; hub ``.254`` on
        ``r<index>``, MTU ``route_mtu``), a default route via the hub, and every node already on the
        bridge a route to that link via the hub. ``route_mtu`` below the node's own MTU makes the hub
        a router whose next link is narrower (a tunnel on the path): it drops a larger DF packet with
        ICMP frag-needed, and fragments one without DF. (A veth also drops, without a word, frames
        larger than its own MTU that its peer sends it: the node's larger packets towards the hub.)"""
        if self.hub is None:
            self.add_hub()
        assert self.hub is not None
        link = ipaddress.IPv4Network(f"198.18.{index}.0/24")
        address, router = link.network_address + 1, link.network_address + 254
        node = self._netns(f"n{index}", Node, address=address, mtu=mtu)
        port = f"r{index}"
        self.hub.ip("link", "add", port, "mtu", str(route_mtu), "type", "veth", "peer", "name", "eth0", "mtu", str(mtu),
                    "netns", node.name)
        self.hub.ip("addr", "add", f"{router}/{link.prefixlen}", "dev", port)
        self.hub.ip("link", "set", port, "up")
        self.hub.sysctl("net.ipv4.ip_forward", "1")
        node.ip("addr", "add", f"{address}/{link.prefixlen}", "dev", "eth0")
        node.ip("link", "set", "eth0", "up")
        node.ip("route", "add", "default", "via", str(router))
        node.sysctl("net.ipv4.ip_forward", "1")
        for other in self.namespaces:
            if isinstance(other, Node) and other.address in UNDERLAY:
                other.ip("route", "add", str(link), "via", str(HUB_ADDRESS))
        return node

    def add_pod(self, node: Node, gateway: str, *, mtu: int, index: int = 2) -> Pod:
        """A pod behind ``cni0`` on ``node``; ``gateway`` is cni0's address with prefix, e.g. ``10.5.1.1/24``.

        This is what the CNI bridge plugin does with the values from subnet.env.
        """
        gw = ipaddress.IPv4Interface(gateway)
        address = gw.network.network_address + index
        pod = self._netns(f"{node.name.rsplit('-', 1)[1]}p{index}", Pod, address=address, node=node)
        if node.ip("link", "show", "cni0", check=False).returncode != 0:
            node.ip("link", "add", "cni0", "mtu", str(mtu), "type", "bridge")
            node.ip("addr", "add", str(gw), "dev", "cni0")
            node.ip("link", "set", "cni0", "up")
        host_end = f"veth{index}"
        node.ip("link", "add", host_end, "mtu", str(mtu), "type", "veth", "peer", "name", "eth0", "mtu", str(mtu), "netns", pod.name)
        node.ip("link", "set", host_end, "master", "cni0", "up")
        pod.ip("addr", "add", f"{address}/{gw.network.prefixlen}", "dev", "eth0")
        pod.ip("link", "set", "eth0", "up")
        pod.ip("route", "add", "default", "via", str(gw.ip))
        return pod

    # -- tearing down ---------------------------------------------------------------------
    def stop_processes(self, grace: float = 2.0) -> None:
        """SIGTERM every process the lab started (whole process group), SIGKILL after ``grace``."""
        for proc in self.processes:
            if proc.poll() is None:
                signal_group(proc, signal.SIGTERM)
        deadline = time.monotonic() + grace
        for proc in self.processes:
            try:
                proc.wait(timeout=max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                signal_group(proc, signal.SIGKILL)
                proc.wait(timeout=5)
        self.processes.clear()

    def close(self) -> None:
        try:
            self.stop_processes()
        finally:
            failed = []
            for ns in reversed(self.namespaces):
                _kill_namespace_pids(ns.name)
                result = sh("ip", "netns", "del", ns.name, check=False)
                if result.returncode != 0:
                    failed.append(f"{ns.name}: {result.stderr.strip()}")
            self.namespaces.clear()
            if failed:
                raise RuntimeError("could not delete namespaces: " + "; ".join(failed))

    def __enter__(self) -> Lab:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def signal_group(proc: subprocess.Popen, sig: int) -> None:
    """Signal a process started in its own session and everything it started; gone already is fine."""
    try:
        os.killpg(proc.pid, sig)
    except ProcessLookupError:
        pass


def _kill_namespace_pids(name: str) -> None:
    """Anything still running inside the namespace (a stray iperf3, say) dies with it."""
    out = sh("ip", "netns", "pids", name, check=False).stdout.split()
    for pid in out:
        try:
            os.kill(int(pid), signal.SIGKILL)
        except (ProcessLookupError, ValueError):
            pass


def leftover_namespaces(tag_prefix: str = "uf") -> list[str]:
    """Namespaces whose name looks like one of ours (for the tests' leak check)."""
    out = sh("ip", "netns", "list", check=False).stdout
    return [line.split()[0] for line in out.splitlines() if line.startswith(tag_prefix)]
