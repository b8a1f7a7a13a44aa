"""The dataplanes measured on the benchmark lab (``benchmarks/topology.py``): the row interface, and the
kernel rows here; the rows that run processes are in ``benchmarks/processes.py``.

Every row of the benchmark is a :class:`Row` set up on a fresh two-node lab with the same
topology (``udpflannel.lab.netns``: an underlay bridge in a hub namespace, two nodes, one pod behind
``cni0`` on each)::

    pod n1p2 10.5.1.2 ── cni0 ── node n1 198.18.0.1 ══ underlay br0 ══ node n2 198.18.0.2 ── cni0 ── pod n2p2 10.5.2.2

A dataplane only decides how node 1 reaches ``10.5.2.0/24`` and back, and which MTU the pods get:

- :class:`KernelVxlan` — exactly flannel's vxlan backend: ``flannel.1``, VNI 1, port 8472, no learning,
  a permanent neighbour and FDB entry per peer, ``10.5.2.0/24 via 10.5.2.0 dev flannel.1 onlink``, MTU − 50;
- :class:`HostGw` — flannel's host-gw backend: ``10.5.2.0/24 via 198.18.0.2``, MTU unchanged;
- :class:`UdpflannelStatic` — ``python -m udpflannel static`` on each node (one row per set of extra flags,
  e.g. a future ``--no-fast-path``);
- :class:`External` — any command started on each node with placeholders filled in.

The lifecycle the harness drives: ``setup(topo)`` (kernel configuration, before the pods exist),
``start()`` (processes; the pod MTU is known afterwards), then per traffic group ``start()`` if not
``running``, measure, ``stop()`` — which for a dataplane with counters ends the processes and returns
the counters of that group (kernel dataplanes keep running and return ``None``). ``pids()`` are the
processes whose CPU time and context switches are charged to the dataplane.

- :class:`UdpflannelDaemon` — the daemon with flanneld's flags on a real etcd in the hub namespace;
- :class:`Flanneld` — flannel's own daemon (``udpflannel.lab.flanneld`` finds it) on the same set-up.
"""

from __future__ import annotations

import re

from benchmarks.topology import (
    SUBNETS,
    UNDERLAY_MTU,
    VXLAN_OVERHEAD,
    VXLAN_PORT,
    VXLAN_VNI,
    Topology,
)


class Row:
    """One row of the benchmark. Subclasses override what they need; the defaults suit kernel dataplanes."""

    kind = "kernel"  # "kernel" (softirq, no process) or "userspace" (processes we can account for)
    has_counters = False  # stop() returns per-group counters (so the harness restarts it per group)
    many_peers = False  # it can run on the many-peers lab (more than two nodes): routes to every peer

    def __init__(self, name: str, description: str) -> None:
        self.name = name
        self.slug = re.sub(r"[^A-Za-z0-9_.-]+", "_", name).strip("_")  # for file names
        self.description = description
        self.pod_mtu = UNDERLAY_MTU
        self.topo: Topology | None = None

    @property
    def running(self) -> bool:
        return True

    def setup(self, topo: Topology) -> None:
        self.topo = topo

    def start(self) -> None:
        """Start the dataplane's processes (no-op for kernel dataplanes)."""

    def stop(self) -> dict | None:
        """Stop the processes; return ``{"nodes": {i: counters}, "total": counters}`` or ``None``."""
        return None

    def pids(self) -> list[int]:
        return []

    def node_pids(self, index: int) -> list[int]:
        return []

    def take_startups(self) -> list[float]:
        """Seconds from start to ready of each start since the last call (slowest node); none for the kernel."""
        return []

    def teardown(self) -> None:
        """Stop everything; the lab deletes the namespaces (and with them every device and route)."""


class HostGw(Row):
    """flannel's host-gw backend: a plain route to each peer's subnet via its underlay address."""

    many_peers = True

    def __init__(self, name: str = "host-gw") -> None:
        super().__init__(name, "kernel routing, no encapsulation (flannel host-gw)")

    def setup(self, topo: Topology) -> None:
        super().setup(topo)
        self.pod_mtu = UNDERLAY_MTU
        for i, node in topo.nodes.items():
            for j in topo.peers(i):
                node.ip("route", "replace", str(SUBNETS[j]), "via", str(topo.nodes[j].address), "dev", "eth0")


def vtep_mac(index: int) -> str:
    """flannel picks a random locally administered MAC; a fixed one per node keeps the lab reproducible."""
    return f"0e:f1:a0:00:00:{index:02x}"


class KernelVxlan(Row):
    """flannel's vxlan backend (``pkg/backend/vxlan``), configured with ``ip`` and ``bridge``.

    Device ``flannel.1`` (VNI 1, ``local`` = the node's address, ``dev eth0``, ``dstport 8472``,
    ``nolearning``, MTU = eth0 MTU − 50, the lease's network address as /32, ``accept_ra`` 0); per peer
    a permanent neighbour entry (peer's flannel.1 address → peer's VTEP MAC), a permanent FDB entry
    (VTEP MAC → peer's underlay address) and ``<peer subnet> via <peer subnet address> dev flannel.1 onlink``.
    """

    many_peers = True

    def __init__(self, name: str = "vxlan") -> None:
        super().__init__(name, "kernel VXLAN exactly as flannel's vxlan backend")

    def setup(self, topo: Topology) -> None:
        super().setup(topo)
        self.pod_mtu = UNDERLAY_MTU - VXLAN_OVERHEAD
        for i, node in topo.nodes.items():
            node.ip("link", "add", "flannel.1", "address", vtep_mac(i), "mtu", str(self.pod_mtu), "type", "vxlan",
                    "id", str(VXLAN_VNI), "local", str(node.address), "dev", "eth0", "dstport", str(VXLAN_PORT),
                    "nolearning")
            node.sysctl("net.ipv6.conf.flannel/1.accept_ra", "0")  # '/' stands for the '.' in the device name
            node.ip("addr", "add", f"{SUBNETS[i].network_address}/32", "dev", "flannel.1")
            node.ip("link", "set", "flannel.1", "up")
        for i, node in topo.nodes.items():
            for j in topo.peers(i):
                peer_vtep = str(SUBNETS[j].network_address)
                node.ip("neigh", "replace", peer_vtep, "lladdr", vtep_mac(j), "dev", "flannel.1", "nud", "permanent")
                node.run("bridge", "fdb", "replace", vtep_mac(j), "dev", "flannel.1", "dst", str(topo.nodes[j].address),
                         "self", "permanent")
                node.ip("route", "replace", str(SUBNETS[j]), "via", peer_vtep, "dev", "flannel.1", "onlink")
