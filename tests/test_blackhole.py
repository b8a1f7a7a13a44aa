"""--ip-blackhole-route: a real daemon on a real etcd keeps a blackhole route for its own subnet."""

from __future__ import annotations

import json
import subprocess
import sys
from ipaddress import IPv4Address, IPv4Network
from pathlib import Path

import pytest

from tests.cluster import ping, wait_for
from tests.lease_moves import move_lease, node_subnet
from udpflannel.blackhole import METRIC
from udpflannel.lab.cluster import Cluster
from udpflannel.lab.netns import Lab, Pod

CONFIG = {"Network": "10.5.0.0/16", "Backend": {"Type": "udp"}}
GATEWAY = "169.254.1.1"  # the node's end of a routed pod's veth, as Calico/Canal wire it
UNASSIGNED = 77  # a host number in each node's subnet that no pod holds
DATAGRAMS = 20


def add_routed_pod(cluster: Cluster, index: int, host: int = 2) -> Pod:
    """A pod without a bridge (the case flanneld's flag is for, e.g. Canal): a /32 on the pod, its /32
    route on the node, default route via the node's end of the veth. No connected route for the subnet."""
    n = cluster.nodes[index]
    address = node_subnet(cluster, index).network_address + host
    mtu = n.env()["FLANNEL_MTU"]
    pod = cluster.lab.add_netns(f"n{index}r{host}", Pod, node=n.node, address=address)
    veth = f"cali{host}"
    n.node.ip("link", "add", veth, "mtu", mtu, "type", "veth", "peer", "name", "eth0", "mtu", mtu, "netns", pod.name)
    n.node.ip("addr", "add", f"{GATEWAY}/32", "dev", veth)
    n.node.ip("link", "set", veth, "up")
    n.node.ip("route", "add", f"{address}/32", "dev", veth)
    pod.ip("addr", "add", f"{address}/32", "dev", "eth0")
    pod.ip("link", "set", "eth0", "up")
    pod.ip("route", "add", GATEWAY, "dev", "eth0")
    pod.ip("route", "add", "default", "via", GATEWAY)
    n.pod = pod
    return pod


def blackholes(cluster: Cluster, index: int) -> list[str]:
    out = cluster.nodes[index].node.ip("route", "show", "type", "blackhole").stdout
    return [line.strip() for line in out.splitlines() if line.strip()]


def our_route(subnet) -> str:
    return f"blackhole {subnet} proto static metric {METRIC}"


def no_route_drops(cluster: Cluster, index: int) -> int:
    """Packets the daemon read from flannel0 and found no peer for (our own subnet is no peer)."""
    out = subprocess.run([sys.executable, "-m", "udpflannel", "status", "--json",
                          f"--control-socket={cluster.nodes[index].control_socket}"],
                         capture_output=True, text=True, timeout=30, check=True).stdout
    return json.loads(out)["counters"]["drops"]["tun_to_udp"]["no_route"]


def send_udp(pod: Pod, address: IPv4Address, count: int) -> None:
    pod.run(sys.executable, "-c", f"import socket\ns=socket.socket(2,2)\nfor _ in range({count}): s.sendto(b'x',('{address}',9))")


@pytest.fixture
def cluster(lab: Lab, tmp_path: Path):
    """Node 1 (flag) and node 3 (no flag) have routed pods; node 2 (flag) a cni0 pod, wired after the route."""
    with Cluster(lab, tmp_path) as c:
        c.put_config(CONFIG)
        c.start_node(1, "--ip-blackhole-route", "--iptables-resync=1")
        c.start_node(2, "--ip-blackhole-route", "--iptables-resync=1")
        c.start_node(3)
        for i in (1, 2, 3):
            c.wait_ready(i)
        add_routed_pod(c, 1)
        c.add_pod(2, cni=False)
        add_routed_pod(c, 3)
        yield c
        for n in c.nodes.values():
            if n.proc is not None and n.proc.poll() is not None:
                pytest.fail(f"udpflannel on node {n.index} died:\n{n.log()[-3000:]}")


def test_unassigned_pod_addresses_are_dropped_at_the_node_not_sent_into_flannel0(cluster: Cluster):
    c = cluster
    s1, s2, s3 = (node_subnet(c, i) for i in (1, 2, 3))
    assert blackholes(c, 1) == [our_route(s1)] and blackholes(c, 2) == [our_route(s2)] and blackholes(c, 3) == []
    pod1, pod3 = c.nodes[1].pod, c.nodes[3].pod
    target1, target3 = s1.network_address + UNASSIGNED, s3.network_address + UNASSIGNED
    # the kernel answers a route lookup that hits a blackhole with EINVAL
    lookup1 = c.nodes[1].node.ip("route", "get", str(target1), "from", str(pod1.address), "iif", "cali2", check=False)
    assert lookup1.returncode != 0 and "Invalid argument" in lookup1.stderr
    assert "dev flannel0" in c.nodes[3].node.ip("route", "get", str(target3), "from", str(pod3.address), "iif", "cali2").stdout

    before1, before3 = no_route_drops(c, 1), no_route_drops(c, 3)
    send_udp(pod1, target1, DATAGRAMS)
    send_udp(pod3, target3, DATAGRAMS)
    # without the flag every datagram goes into flannel0 and the daemon drops it there
    wait_for(lambda: no_route_drops(c, 3) >= before3 + DATAGRAMS, timeout=10, what="node 3's daemon seeing the datagrams")
    assert no_route_drops(c, 1) == before1  # with it, none reached the daemon

    # the blackhole shadows nothing: pods behind /32 routes and behind cni0 (created after it) are reached
    for src, dst in ((1, 2), (2, 1), (3, 2), (1, 3)):
        assert ping(c.nodes[src].pod, str(c.nodes[dst].pod.address)).returncode == 0, (src, dst)
    assert ping(c.nodes[2].node, str(c.nodes[2].pod.address)).returncode == 0


def test_deleted_blackhole_route_comes_back_within_the_resync_period(cluster: Cluster):
    s1 = node_subnet(cluster, 1)
    cluster.nodes[1].node.ip("route", "del", "blackhole", str(s1), "metric", str(METRIC))
    assert blackholes(cluster, 1) == []
    wait_for(lambda: blackholes(cluster, 1) == [our_route(s1)], timeout=5, what="the resync re-adding the route")


def test_flanneld_metric_0_blackhole_is_replaced_by_ours(lab: Lab, tmp_path: Path):
    """flanneld's blackhole has metric 0: once cni0 comes up after it, it shadows cni0's route. A node
    migrated from flanneld keeps its subnet (subnet.env) and that route; udpflannel replaces it."""
    with Cluster(lab, tmp_path) as c:
        c.put_config(CONFIG)
        n = c.add_node(1)
        subnet = IPv4Network("10.5.200.0/24")
        n.subnet_file.write_text(f"FLANNEL_NETWORK=10.5.0.0/16\nFLANNEL_SUBNET={subnet.network_address + 1}/24\n"
                                 "FLANNEL_MTU=1472\nFLANNEL_IPMASQ=false\n")
        n.node.ip("route", "add", "blackhole", str(subnet))  # as flanneld leaves it
        c.start_node(1, "--ip-blackhole-route")
        wait_for(lambda: blackholes(c, 1) == [our_route(subnet)], timeout=20, what="udpflannel replacing the metric-0 route")
        assert node_subnet(c, 1) == subnet
        pod = c.add_pod(1, cni=False)  # cni0 comes up after the blackhole
        assert ping(n.node, str(pod.address)).returncode == 0


def test_lease_change_moves_the_blackhole_route(cluster: Cluster):
    c = cluster
    old, new = move_lease(c, 1)
    wait_for(lambda: blackholes(c, 1) == [our_route(new)], timeout=10, what=f"the blackhole route moving {old} -> {new}")
    # the old subnet is a peer's now: its addresses go into flannel0 again, not into a blackhole
    assert "dev flannel0" in c.nodes[1].node.ip("route", "get", str(old.network_address + UNASSIGNED)).stdout
