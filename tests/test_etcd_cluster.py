"""Daemons on a 3-member etcd cluster that loses members (issue 17 items 1 and 6), in namespaces.

One cluster for the module: three etcd members on the hub, nodes 1-3 with pods pinging each other
every 10 ms throughout, every daemon given all three members in --etcd-endpoints. The faults run in
order, each with the cluster made whole again afterwards: the leader killed, a follower killed, two
of three killed (quorum lost). Through each: forwarding never stops and no route is lost; a node that
joins while a member is down is routed by every other node within 2 s of its subnet.env; SIGTERM
stops a daemon within 2 s with no task left running and its rules in place exactly once; how long
each daemon took to move to a live member is printed. After the quorum returns, a new lease reaches
every node and no etcd lease is orphaned. (Lease renewal and expiry through a quorum loss, with short
TTLs: tests/lease/test_etcd_cluster.py.)
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field

import pytest

from tests.cluster import Pinger, log_lines, logged_at, sigterm_cleanly, unused_subnet, wait_for
from tests.conftest import check_lab_tools
from tests.lease.conftest import need_etcd
from udpflannel.lab.cluster import PREFIX, Cluster
from udpflannel.lab.etcd import EtcdServer
from udpflannel.lab.etcdcluster import EtcdCluster
from udpflannel.lab.netns import Lab, leftover_namespaces

pytestmark = [pytest.mark.netns, pytest.mark.etcd, pytest.mark.timeout(180)]

CONFIG = {"Network": "10.5.0.0/16", "Backend": {"Type": "udp"}}
STEADY = (1, 2, 3)  # nodes that run through every fault, with pods
OUTAGE = 8.0  # seconds the quorum stays lost
JOIN_BUDGET = 2.0


@dataclass
class World:
    lab: Lab
    cluster: Cluster
    pingers: list[Pinger]
    subnets: dict[int, str] = field(default_factory=dict)  # node -> its subnet ("10.5.x.0/24")
    report: list[str] = field(default_factory=list)

    @property
    def etcd(self) -> EtcdCluster:
        assert isinstance(self.cluster.etcd, EtcdCluster)
        return self.cluster.etcd


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    check_lab_tools()
    need_etcd()
    with Lab() as lab:
        with Cluster(lab, tmp_path_factory.mktemp("etcd-cluster"), etcd_members=3) as cluster:
            cluster.put_config(CONFIG)
            for i in STEADY:
                cluster.start_node(i)
            w = World(lab, cluster, [])
            for i in STEADY:
                w.subnets[i] = subnet_of(cluster.wait_ready(i))
                cluster.add_pod(i)
            pods = [cluster.nodes[i].pod for i in STEADY]
            for i in range(3):  # pod1 -> pod2 -> pod3 -> pod1
                w.pingers.append(Pinger(pods[i], str(pods[(i + 1) % 3].address)))
            yield w
            for p in w.pingers:
                p.stop()
            print("\n" + "\n".join(w.report))
    assert not leftover_namespaces(lab.tag)


def subnet_of(env: dict[str, str]) -> str:
    return env["FLANNEL_SUBNET"].replace(".1/", ".0/")


def routed_everywhere(w: World) -> None:
    """Every steady node routes every other steady node's subnet (and none has died)."""
    for i in STEADY:
        n = w.cluster.nodes[i]
        assert n.proc is not None and n.proc.poll() is None, f"node {i} died:\n{n.log()[-3000:]}"
        want = {w.subnets[j] for j in STEADY if j != i}
        missing = want - w.cluster.routed_subnets(i)
        assert not missing, f"node {i} lost its route(s) to {missing}"


def endpoint_in_use(w: World, index: int, before: float) -> str | None:
    """The etcd endpoint node ``index``'s daemon last switched to before ``before`` (its log)."""
    used = None
    for t, _, _, text in log_lines(w.cluster.nodes[index].log()):
        if t < before and text.startswith("etcd: using "):
            used = text.split()[2]
    return used


def failover_times(w: World, killed: list[EtcdServer], at: float) -> str:
    """Per steady node: which member it used, and how long it took to move off a killed one."""
    dead = {m.endpoint for m in killed}
    parts = []
    for i in STEADY:
        before = endpoint_in_use(w, i, at)
        if before not in dead:
            parts.append(f"node {i} stayed on {before}")
            continue
        t = logged_at(w.cluster, i, "etcd: using ", since=at, timeout=15)
        after = next(text.split()[2] for s, _, _, text in log_lines(w.cluster.nodes[i].log())
                     if s == t and text.startswith("etcd: using "))
        parts.append(f"node {i} {before} -> {after} in {t - at:.2f} s")
    return "; ".join(parts)


def join_while_down(w: World, index: int, what: str) -> None:
    """Node ``index`` joins now: every steady node routes it within 2 s of its subnet.env (usually
    before: the route follows the lease write, bringing up flannel0 takes longer)."""
    started = time.time()
    w.cluster.start_node(index, "--ip-masq")
    w.subnets[index] = subnet_of(w.cluster.wait_ready(index, timeout=30))
    ready = w.cluster.nodes[index].subnet_file.stat().st_mtime
    written = logged_at(w.cluster, index, "Allocated lease", since=started)
    routed = [logged_at(w.cluster, i, f"Subnet added: {w.subnets[index]}", since=started) for i in STEADY]
    w.report.append(f"{what}: node {index} joined; nodes 1-3 routed it "
                    f"{', '.join(f'{t - written:.3f}' for t in routed)} s after its lease was written "
                    f"({', '.join(f'{t - ready:+.2f}' for t in routed)} s from its subnet.env)")
    assert max(routed) - ready < JOIN_BUDGET


def sigterm_within_budget(w: World, index: int, what: str) -> None:
    elapsed = sigterm_cleanly(w.cluster, index)
    w.report.append(f"{what}: SIGTERM to node {index} -> exit 0 in {elapsed:.2f} s, no task left running")


def forwarding_never_stopped(w: World, since_replies: list[int]) -> None:
    """Every pinger got replies all along (checked at the module's end from their timestamps)."""
    for p, n in zip(w.pingers, since_replies, strict=True):
        assert p.replies_so_far() > n, "a pinger got no reply during the fault"


def replies(w: World) -> list[int]:
    return [p.replies_so_far() for p in w.pingers]


def one_member_down(w: World, member: EtcdServer, joiner: int, what: str) -> None:
    """Kill ``member``; routes stay, a node joins and is routed, a SIGTERM is honoured; bring it back."""
    routed_everywhere(w)
    counts = replies(w)
    at = time.time()
    member.kill()
    w.report.append(f"{what}: {failover_times(w, [member], at)}")
    join_while_down(w, joiner, what)
    routed_everywhere(w)
    sigterm_within_budget(w, joiner, what)
    forwarding_never_stopped(w, counts)
    w.etcd.restart(member)


def test_leader_killed(world: World):
    one_member_down(world, world.etcd.leader(), 4, "leader killed")


def test_follower_killed(world: World):
    now = time.time()
    in_use = [endpoint_in_use(world, i, now) for i in STEADY]
    follower = max(world.etcd.followers(), key=lambda m: in_use.count(m.endpoint))  # one a daemon uses, if any
    one_member_down(world, follower, 5, "follower killed")


def test_quorum_lost_then_back(world: World):
    w = world
    routed_everywhere(w)
    w.cluster.start_node(6, "--ip-masq")  # ready before the fault, stopped during it
    w.subnets[6] = subnet_of(w.cluster.wait_ready(6, timeout=30))
    leader = w.etcd.leader()
    down = [leader, w.etcd.followers()[0]]
    counts = replies(w)
    at = time.time()
    for m in down:
        m.kill()
    w.cluster.start_node(7)  # starts while no quorum: it waits for the config
    wait_for(lambda: "Couldn't fetch network config" in w.cluster.nodes[7].log(), timeout=20,
             what="node 7 waiting for etcd")
    while time.time() - at < OUTAGE:
        routed_everywhere(w)
        time.sleep(1)
    sigterm_within_budget(w, 6, "quorum lost")
    sigterm_within_budget(w, 7, "quorum lost (not yet ready)")
    forwarding_never_stopped(w, counts)

    w.etcd.restart(*down)
    back = time.time()
    w.report.append(f"quorum lost, back after {back - at:.1f} s (a member with a leader exists only then): "
                    f"{failover_times(w, down, at)}")
    fresh = unused_subnet(w.etcd, PREFIX)
    w.etcd.ctl("put", f"{PREFIX}/subnets/{fresh.replace('/', '-')}", '{"PublicIP":"198.18.0.200","PublicIPv6":null}')
    lags = [logged_at(w.cluster, i, f"Subnet added: {fresh}", since=back, timeout=20) - back for i in STEADY]
    w.report.append(f"quorum back: a lease written at once is routed by nodes 1-3 after "
                    f"{', '.join(f'{x:.2f}' for x in lags)} s (reconnect backoff included)")
    routed_everywhere(w)
    # each steady daemon still holds the key and etcd lease it had, and no etcd lease is orphaned
    kvs = json.loads(w.etcd.ctl("get", "--prefix", f"{PREFIX}/subnets/", "-w", "json")).get("kvs", [])
    attached = {int(kv["lease"]) for kv in kvs if kv.get("lease")}
    assert w.etcd.leases() == attached, "an etcd lease that no subnet key uses"
    for i in STEADY:
        n = w.cluster.nodes[i]
        assert "LeaseLost" not in n.log() and "lost (" not in n.log(), n.log()[-3000:]


def test_forwarding_never_stopped_through_all_faults(world: World):
    w = world
    for p in w.pingers:
        p.stop()
    for p in w.pingers:
        gap, began = p.longest_gap()
        w.report.append(f"pinger: {len(p.replies)} replies, {p.lost} lost, longest gap {gap * 1000:.0f} ms")
        assert gap < 1.0, f"forwarding stopped for {gap:.2f} s at {began}"
    w.pingers.clear()

