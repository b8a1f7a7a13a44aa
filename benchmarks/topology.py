"""The two-node benchmark lab every row runs on (``udpflannel.lab.netns`` builds it)::

    pod n1p2 10.5.1.2 ── cni0 ── node n1 198.18.0.1 ══ underlay br0 ══ node n2 198.18.0.2 ── cni0 ── pod n2p2 10.5.2.2

and the many-peers lab (:data:`PEERS_LAB_NODES` nodes on the same underlay, pod n{i}p2 10.5.{i}.2 on
node i), where pod 1 sends to the pods of all the others at once.

Its addresses and constants, the nodes and pods, and the reachability check after a row's set-up.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from ipaddress import IPv4Network
from pathlib import Path

from udpflannel.lab.netns import Lab, Netns, Node, Pod

NETWORK = IPv4Network("10.5.0.0/16")
PEERS_LAB_NODES = 4  # the many-peers lab: node 1 and three peers
SUBNETS = {i: IPv4Network(f"10.5.{i}.0/24") for i in range(1, PEERS_LAB_NODES + 1)}
UNDERLAY_MTU = 1500
FLANNEL_UDP_PORT = 8285
VXLAN_PORT = 8472
VXLAN_VNI = 1
VXLAN_OVERHEAD = 50
UDP_OVERHEAD = 28


class DataplaneError(RuntimeError):
    """A dataplane could not be set up or started; its row is reported as unsupported with this reason."""


@dataclass
class Topology:
    """Two nodes, or more in the many-peers lab (and, once the MTU is known, a pod on each) in one lab;
    ``workdir`` holds logs."""

    lab: Lab
    nodes: dict[int, Node]
    workdir: Path
    pods: dict[int, Pod] = field(default_factory=dict)

    @property
    def hub(self) -> Netns:
        assert self.lab.hub is not None
        return self.lab.hub

    @staticmethod
    def peer(index: int) -> int:
        """The other node of the two-node lab."""
        return 3 - index

    def peers(self, index: int) -> list[int]:
        """Every other node (one in the two-node lab)."""
        return [j for j in self.nodes if j != index]


def build_nodes(lab: Lab, workdir: Path, count: int = 2) -> Topology:
    lab.add_hub()
    nodes = {i: lab.add_node(i, mtu=UNDERLAY_MTU) for i in range(1, count + 1)}
    workdir.mkdir(parents=True, exist_ok=True)
    return Topology(lab=lab, nodes=nodes, workdir=workdir)


def add_pods(topo: Topology, mtu: int) -> None:
    """One pod behind ``cni0`` on each node, with the MTU the dataplane asks for (as the CNI plugin would)."""
    for i, node in topo.nodes.items():
        gateway = f"{SUBNETS[i].network_address + 1}/{SUBNETS[i].prefixlen}"
        topo.pods[i] = topo.lab.add_pod(node, gateway, mtu=mtu)


def wait_reachable(topo: Topology, *, timeout: float = 15.0) -> None:
    """Pod 1 pings every other pod until one reply comes back from each (bounded by ``timeout``)."""
    deadline = time.monotonic() + timeout
    for j in topo.peers(1):
        _wait_reply(topo, str(topo.pods[j].address), deadline, timeout)


def _wait_reply(topo: Topology, target: str, deadline: float, timeout: float) -> None:
    last = ""
    for _ in range(int(timeout / 0.2) + 1):
        proc = topo.pods[1].run("ping", "-n", "-c", "1", "-W", "1", target, check=False, timeout=5)
        if proc.returncode == 0:
            return
        last = (proc.stdout + proc.stderr).strip().splitlines()[-1:] or [""]
        if time.monotonic() > deadline:
            break
        time.sleep(0.2)
    raise DataplaneError(f"pod {topo.pods[1].address} cannot reach {target} after {timeout:.0f}s ({last[0]})")
