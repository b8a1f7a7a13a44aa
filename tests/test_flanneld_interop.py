"""udpflannel beside a real flanneld (v0.20.2, ../shared/bin) on one etcd and one wire.

One mixed cluster serves most tests here: two fast-path udpflannel nodes, a ``--no-fast-path`` node and a
flanneld node whose pod flannel's own CNI plugin wires. The start-order and renewal tests build their own.
"""

from __future__ import annotations

import itertools
import json
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from tests.cluster import TOOLS, Pinger, parallel_transfers, ping, tcp_transfer, unused_subnet, wait_for
from tests.conftest import check_lab_tools
from udpflannel.lab.cluster import PREFIX, Cluster
from udpflannel.lab.netns import Lab, leftover_namespaces

CONFIG = {"Network": "10.5.0.0/16", "Backend": {"Type": "udp"}}
FAST, FAST2, SLOW, GO = 1, 2, 3, 4  # GO: the node that runs flanneld
UDPFLANNEL_NODES = (FAST, FAST2, SLOW)


@contextmanager
def lab_cluster(binaries: tuple[Path, Path], workdir: Path) -> Iterator[Cluster]:
    """An etcd cluster in a fresh lab that knows flannel's binaries; torn down and leak-checked after,
    and it fails if a daemon died on the way."""
    check_lab_tools()
    flanneld, flannel_cni = binaries
    with Lab() as lab:
        with Cluster(lab, workdir, flanneld=flanneld, flannel_cni=flannel_cni) as cluster:
            cluster.put_config(CONFIG)
            yield cluster
            dead = [f"{n.kind} on node {n.index} died:\n{n.log()[-3000:]}" for n in cluster.nodes.values()
                    if n.proc is not None and n.proc.poll() is not None]
    assert not leftover_namespaces(lab.tag), "namespaces left behind"
    assert not dead, "\n".join(dead)


def wait_all_routed(cluster: Cluster, indices, *, timeout: float) -> None:
    """Until every node in ``indices`` routes every other node's subnet."""
    subnets = {i: cluster.nodes[i].env()["FLANNEL_SUBNET"].replace(".1/", ".0/") for i in indices}
    for i in indices:
        want = {s for j, s in subnets.items() if j != i}
        wait_for(lambda i=i, want=want: want <= cluster.routed_subnets(i), timeout=timeout,
                 what=f"node {i} ({cluster.nodes[i].kind}) routing {sorted(want)}")


@pytest.fixture(scope="module")
def mixed(flannel_binaries, tmp_path_factory) -> Iterator[Cluster]:
    """flanneld starts after the udpflannel nodes wrote subnet.env: its watch can miss a lease created
    right after it starts (a race of its own, see the start-order test), and this cluster is for traffic."""
    with lab_cluster(flannel_binaries, tmp_path_factory.mktemp("mixed")) as cluster:
        for i in (FAST, FAST2):
            cluster.start_node(i)
        cluster.start_node(SLOW, "--no-fast-path")
        for i in UDPFLANNEL_NODES:
            cluster.wait_ready(i)
        cluster.start_flanneld(GO)
        cluster.wait_ready(GO)
        for i in (*UDPFLANNEL_NODES, GO):
            cluster.add_pod(i)
        wait_all_routed(cluster, (*UDPFLANNEL_NODES, GO), timeout=10)
        yield cluster


def pod_ip(cluster: Cluster, index: int) -> str:
    return str(cluster.nodes[index].pod.address)


def tun_address(cluster: Cluster, index: int) -> str:
    """flannel0's address on node ``index``: its lease's network address, the source of its ICMP errors."""
    return cluster.nodes[index].env()["FLANNEL_SUBNET"].split("/")[0].rsplit(".", 1)[0] + ".0"


def test_every_ordered_pod_pair_pings_across_udpflannel_and_flanneld_nodes(mixed: Cluster):
    assert "fast path: tun tso on" in mixed.nodes[FAST].log()
    assert "fast path" not in mixed.nodes[SLOW].log()
    assert "udp_network_amd64.go" in mixed.nodes[GO].log()  # flannel's own UDP backend runs there
    failures = []
    for a, b in itertools.permutations((*UDPFLANNEL_NODES, GO), 2):
        result = ping(mixed.nodes[a].pod, pod_ip(mixed, b), count=2)
        if " 0% packet loss" not in result.stdout:
            failures.append(f"pod {a} -> pod {b}: {result.stdout[-300:]}")
    assert not failures, "\n".join(failures)


@pytest.mark.parametrize("sender, receiver", [(GO, FAST), (FAST, GO)], ids=["flanneld-to-fast", "fast-to-flanneld"])
def test_tcp_50mb_keeps_its_sha256_between_a_flanneld_pod_and_a_fast_path_pod(mixed: Cluster, sender: int, receiver: int):
    sent, received = tcp_transfer(mixed.nodes[sender].pod, mixed.nodes[receiver].pod, pod_ip(mixed, receiver),
                                  50 * 1024 * 1024)
    assert sent == received


@pytest.mark.parametrize("peer", [FAST2, SLOW, GO], ids=["fast-peer", "per-packet-peer", "flanneld-peer"])
def test_four_parallel_tcp_transfers_each_way_keep_their_sha256_beside_any_peer(mixed: Cluster, peer: int):
    """Many flows between two nodes: 4 TCP transfers from the fast-path pod to the peer's pod and 4 back,
    all at once, 8 MB each (each its own bytes): every one arrives with its SHA-256."""
    fast, other = mixed.nodes[FAST].pod, mixed.nodes[peer].pod
    parallel_transfers([(fast, other, pod_ip(mixed, peer))] * 4 + [(other, fast, pod_ip(mixed, FAST))] * 4,
                       8 * 1024 * 1024, port=5400)


def test_three_transfers_at_once_from_one_pod_to_three_nodes_and_back(mixed: Cluster):
    """Many peers: the fast-path pod sends to pods on a fast-path, a per-packet and a flanneld node at
    once, and all three send to it at once (its receive batches then mix senders), 8 MB each: every
    transfer arrives with its SHA-256."""
    fast = mixed.nodes[FAST].pod
    peers = (FAST2, SLOW, GO)
    parallel_transfers([(fast, mixed.nodes[p].pod, pod_ip(mixed, p)) for p in peers]
                       + [(mixed.nodes[p].pod, fast, pod_ip(mixed, FAST)) for p in peers], 8 * 1024 * 1024, port=5500)


@pytest.mark.parametrize("sender, receiver", [(GO, FAST), (FAST, GO), (GO, SLOW), (SLOW, GO)],
                         ids=["flanneld-to-fast", "fast-to-flanneld", "flanneld-to-per-packet", "per-packet-to-flanneld"])
def test_udp_datagrams_of_every_size_up_to_the_overlay_mtu_arrive_intact(mixed: Cluster, sender: int, receiver: int):
    largest = int(mixed.nodes[receiver].env()["FLANNEL_MTU"]) - 28  # inner IPv4 and UDP headers
    assert largest == 1444
    listener = mixed.nodes[receiver].pod.popen(
        [sys.executable, str(TOOLS / "udpflow.py"), "sweep-recv", "7100", str(largest), "20"],
        stdout=subprocess.PIPE, text=True)
    assert listener.stdout.readline().strip() == "listening"
    mixed.nodes[sender].pod.run(sys.executable, str(TOOLS / "udpflow.py"), "sweep-send", pod_ip(mixed, receiver),
                                "7100", str(largest), timeout=60)
    result = json.loads(listener.communicate(timeout=40)[0])
    missing = sorted(set(range(1, largest + 1)) - set(result["intact"]))
    assert not missing and result["damaged"] == 0, {"missing": missing[:50], "damaged": result["damaged"]}


@pytest.mark.parametrize("expiring_at", [FAST, SLOW], ids=["fast", "per-packet"])
def test_time_exceeded_from_a_udpflannel_node_reaches_a_pod_behind_flanneld(mixed: Cluster, expiring_at: int):
    """TTL 3 from flanneld's pod: its node's kernel and flanneld take one each, the udpflannel receiver the
    last; the ICMP error goes back over flanneld's wire and through its TUN to the pod."""
    result = ping(mixed.nodes[GO].pod, pod_ip(mixed, expiring_at), ttl=3)
    assert f"From {tun_address(mixed, expiring_at)} icmp_seq=1 Time to live exceeded" in result.stdout, result.stdout


def test_net_unreachable_from_a_udpflannel_node_reaches_a_pod_behind_flanneld(mixed: Cluster):
    """A stale lease that names a udpflannel node's PublicIP (say, a subnet it held before): flanneld
    routes it there; the udpflannel node does not route it to itself (flanneld would, in a loop), so
    the packet meets no route and the sender hears net-unreachable, across flanneld's wire."""
    stale = unused_subnet(mixed.etcd, PREFIX)  # nobody's lease: a node's would be taken from it
    key = f"{PREFIX}/subnets/{stale.replace('/', '-')}"
    inside = stale.replace(".0/24", ".5")
    mixed.etcd.ctl("put", key, json.dumps({"PublicIP": str(mixed.nodes[FAST].node.address), "PublicIPv6": None},
                                           separators=(",", ":")))
    try:
        wait_for(lambda: stale in mixed.routed_subnets(GO) and stale in mixed.routed_subnets(SLOW), timeout=10,
                 what="flanneld and the per-packet node routing the stale lease")
        assert stale not in mixed.routed_subnets(FAST)
        for sender in (GO, SLOW):
            result = ping(mixed.nodes[sender].pod, inside)
            assert f"From {tun_address(mixed, FAST)} icmp_seq=1 Destination Net Unreachable" in result.stdout, \
                f"pod {sender}: {result.stdout}"
    finally:
        mixed.etcd.ctl("del", key)


def test_flanneld_answers_no_ttl_expiry_where_udpflannel_does(mixed: Cluster):
    """The reference's behaviour, kept in view: flanneld drops a packet whose TTL runs out in it without
    a word (its TODO), where udpflannel, in the same place, sends time-exceeded."""
    into_flanneld = ping(mixed.nodes[FAST].pod, pod_ip(mixed, GO), ttl=3)  # expires in flanneld's receive
    assert "100% packet loss" in into_flanneld.stdout and "Time to live exceeded" not in into_flanneld.stdout
    into_udpflannel = ping(mixed.nodes[FAST2].pod, pod_ip(mixed, FAST), ttl=3)  # expires in udpflannel's receive
    assert "Time to live exceeded" in into_udpflannel.stdout, into_udpflannel.stdout


ORDERS = {
    "flanneld-first": [("flanneld", 4), ("flanneld", 5), ("udpflannel", 1), ("udpflannel", 2), ("udpflannel", 3)],
    "flanneld-last": [("udpflannel", 1), ("udpflannel", 2), ("udpflannel", 3), ("flanneld", 4), ("flanneld", 5)],
    "interleaved": [("udpflannel", 1), ("flanneld", 4), ("udpflannel", 2), ("flanneld", 5), ("udpflannel", 3)],
}


@pytest.mark.parametrize("order", [*ORDERS, "all-at-once"])
def test_udpflannel_nodes_never_miss_a_lease_whatever_the_start_order(flannel_binaries, tmp_path: Path, order: str):
    """Three udpflannel and two flanneld nodes, started one after the other (each once the one before is
    ready) or all at once. Every udpflannel node routes every other node within 2 s of the last one
    being ready. (flanneld itself can miss a lease made right after it starts; reported, not asserted.)"""
    with lab_cluster(flannel_binaries, tmp_path) as cluster:
        nodes = ORDERS.get(order, ORDERS["interleaved"])
        for _, index in nodes:
            cluster.add_node(index)
        for kind, index in nodes:
            (cluster.start_node if kind == "udpflannel" else cluster.start_flanneld)(index)
            if order != "all-at-once":
                cluster.wait_ready(index)
        for _, index in nodes:
            cluster.wait_ready(index)
        ready = time.monotonic()
        indices = [index for _, index in nodes]
        subnets = {i: cluster.nodes[i].env()["FLANNEL_SUBNET"].replace(".1/", ".0/") for i in indices}
        assert len(set(subnets.values())) == len(indices)
        for i in (1, 2, 3):
            want = {s for j, s in subnets.items() if j != i}
            wait_for(lambda i=i, want=want: cluster.routed_subnets(i) == want,
                     timeout=max(0.1, 2.0 - (time.monotonic() - ready)), what=f"udpflannel node {i} routing {sorted(want)}")
        time.sleep(0.5)  # flanneld logs its routes as it adds them
        for i in (4, 5):
            missed = {s for j, s in subnets.items() if j != i} - cluster.routed_subnets(i)
            print(f"start order {order}: flanneld node {i} missed {sorted(missed) or 'nothing'}")


def test_a_renewing_flanneld_peer_keeps_its_route_with_no_gap(flannel_binaries, tmp_path: Path):
    """flanneld renews by granting a new etcd lease and writing its record again (a PUT). With a renew
    margin of 1439 minutes it renews a minute after taking its 24 h lease. Its udpflannel peers, fast and
    per-packet, keep forwarding to it: no lost ping at 10 ms intervals, no route event for its subnet."""
    with lab_cluster(flannel_binaries, tmp_path) as cluster:
        cluster.start_node(1)
        cluster.start_node(2, "--no-fast-path")
        cluster.wait_ready(1)
        cluster.wait_ready(2)
        cluster.start_flanneld(3, "--subnet-lease-renew-margin=1439")
        subnet = cluster.wait_ready(3)["FLANNEL_SUBNET"].replace(".1/", ".0/")
        key = f"{PREFIX}/subnets/{subnet.replace('/', '-')}"
        for i in (1, 2, 3):
            cluster.add_pod(i)
        wait_all_routed(cluster, (1, 2, 3), timeout=10)
        first = etcd_record(cluster, key)
        logs_before = {i: len(cluster.nodes[i].log()) for i in (1, 2)}
        pingers = {i: Pinger(cluster.nodes[i].pod, pod_ip(cluster, 3)) for i in (1, 2)}
        try:
            wait_for(lambda: etcd_record(cluster, key)["lease"] != first["lease"], timeout=90, interval=0.2,
                     what="flanneld renewing its lease")
            renewed_at = time.time()
            time.sleep(2)  # a gap right after the renewal would show here
        finally:
            for p in pingers.values():
                p.stop()
        assert etcd_record(cluster, key)["mod_revision"] > first["mod_revision"]  # a PUT every peer watched
        for i, p in pingers.items():
            assert p.replies[0][0] < renewed_at - 0.2 and p.replies[-1][0] > renewed_at + 1.5, "not across the renewal"
            assert p.lost == 0, f"node {i}: {p.lost} lost of {p.output[-300:]}"
            events = [line for line in cluster.nodes[i].log()[logs_before[i]:].splitlines() if subnet in line]
            assert not events, f"node {i} changed its route to the renewing peer: {events}"
        print(f"flanneld renewed its lease; {sum(len(p.replies) for p in pingers.values())} pings crossed, none lost")


def etcd_record(cluster: Cluster, key: str) -> dict:
    """The key's etcd metadata: its etcd lease and revisions (etcdctl's JSON)."""
    [kv] = json.loads(cluster.etcd.ctl("get", key, "-w", "json"))["kvs"]
    return kv
