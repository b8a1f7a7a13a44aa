"""The daemon on a real etcd, in namespaces: a cluster of nodes with pods, as issue 4 accepts it."""

from __future__ import annotations

import itertools
import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.cluster import Pinger, logged_at, ping, tcp_transfer, unused_subnet, wait_for
from tun.configure import TX_QUEUE
from udpflannel.lab.cluster import PREFIX, Cluster
from udpflannel.lab.netns import Lab

CONFIG = {"Network": "10.5.0.0/16", "Backend": {"Type": "udp"}}
TOOLS = Path(__file__).parent / "tools"


@pytest.fixture
def cluster(lab: Lab, tmp_path: Path):
    with Cluster(lab, tmp_path) as c:
        c.put_config(CONFIG)
        yield c
        for n in c.nodes.values():
            if n.proc is not None and n.proc.poll() is not None:
                pytest.fail(f"udpflannel on node {n.index} died:\n{n.log()[-3000:]}")


def start(cluster: Cluster, *indices: int, pods: bool = True) -> None:
    for i in indices:
        cluster.start_node(i)
    for i in indices:
        cluster.wait_ready(i)
        if pods:
            cluster.add_pod(i)


def first_reply_after(src, dst_ip: str, since: float, *, timeout: float = 10) -> float:
    """Seconds from ``since`` (wall clock) to the first echo reply ``src`` gets from ``dst_ip``, read from a
    background ping's own timestamps (10 ms apart), not from how fast a test can start ``ping``."""
    pinger = Pinger(src, dst_ip)
    try:
        wait_for(lambda: pinger.replies_so_far(), timeout=timeout, interval=0.05, what=f"{src.name} reaching {dst_ip}")
    finally:
        pinger.stop()
    return pinger.replies[0][0] - since


def metrics(cluster: Cluster, index: int) -> dict[tuple[str, tuple], float]:
    """Scrape the node's /metrics from inside its namespace and parse it with prometheus_client."""
    code = (
        "import urllib.request,json;from prometheus_client.parser import text_string_to_metric_families as p;"
        f"t=urllib.request.urlopen('http://127.0.0.1:{cluster.healthz_port}/metrics',timeout=5).read().decode();"
        "print(json.dumps([[s.name,sorted(s.labels.items()),s.value] for f in p(t) for s in f.samples]))"
    )
    out = cluster.nodes[index].node.run(sys.executable, "-c", code).stdout
    return {(name, tuple(tuple(x) for x in labels)): value for name, labels, value in json.loads(out)}


def test_four_nodes_all_pairs_and_50mb(cluster: Cluster):
    start(cluster, 1, 2, 3, 4)
    leases = cluster.leases()
    assert len(leases) == 4
    for key, value in leases.items():
        assert key.startswith(f"{PREFIX}/subnets/10.5.") and key.endswith("-24")
        assert value.startswith('{"PublicIP":"198.18.0.') and value.endswith('","PublicIPv6":null}')
    pods = {i: cluster.nodes[i].pod for i in cluster.nodes}
    for a, b in itertools.permutations(pods, 2):
        result = ping(pods[a], str(pods[b].address))
        assert result.returncode == 0, f"pod {a} -> pod {b}: {result.stdout}"
    sent, received = tcp_transfer(pods[3], pods[1], str(pods[1].address), 50 * 1024 * 1024)
    assert sent == received


def test_join_leave_and_sigkill_restart(cluster: Cluster):
    """Budgets run from the event (a subnet.env written, a key deleted, a restart) to the daemon's own
    log line or the pod's own echo reply timestamp, so a loaded machine's slow test polling cannot eat them."""
    start(cluster, 1, 2, 3)
    # a node that joins is routed by every other node within 2 s of its subnet.env appearing
    cluster.start_node(4)
    subnet4 = cluster.wait_ready(4)["FLANNEL_SUBNET"].replace(".1/", ".0/")
    ready = cluster.nodes[4].subnet_file.stat().st_mtime
    for i in (1, 2, 3):
        assert logged_at(cluster, i, f"Subnet added: {subnet4}") - ready < 2.0
    pod4 = cluster.add_pod(4)
    for i in (1, 2, 3):
        assert ping(cluster.nodes[i].pod, str(pod4.address)).returncode == 0

    # a node whose lease is deleted is unreachable, and its route is gone everywhere within 2 s
    subnet3 = cluster.nodes[3].env()["FLANNEL_SUBNET"]
    key3 = f"{PREFIX}/subnets/{subnet3.replace('.1/', '.0-')}"
    assert cluster.stop_node(3) == 0
    deleted = time.time()
    cluster.etcd.ctl("del", key3)
    for i in (1, 2, 4):
        assert logged_at(cluster, i, f"Subnet removed: {subnet3.replace('.1/', '.0/')}") - deleted < 2.0
        assert _route_gone(cluster, i, subnet3)
    assert ping(cluster.nodes[1].pod, str(cluster.nodes[3].pod.address)).returncode != 0

    # SIGKILL and restart: the same subnet, and pod traffic again within 3 s of the restart
    before = cluster.nodes[2].env()["FLANNEL_SUBNET"]
    cluster.stop_node(2, signal.SIGKILL)
    cluster.nodes[2].subnet_file.unlink()  # prove the subnet comes back from etcd (reuse by PublicIP)
    restarted = time.time()
    cluster.start_node(2)
    assert cluster.wait_ready(2)["FLANNEL_SUBNET"] == before
    assert first_reply_after(cluster.nodes[1].pod, str(cluster.nodes[2].pod.address), restarted) < 3.0


def _route_gone(cluster: Cluster, index: int, subnet_env_value: str) -> bool:
    status = json.loads(cluster.nodes[index].node.run(
        sys.executable, "-m", "udpflannel", "status", "--json", "--control-socket", str(cluster.nodes[index].control_socket)).stdout)
    subnet = subnet_env_value.replace(".1/", ".0/")
    return all(peer["subnet"] != subnet for peer in status["peers"])


def http_get(cluster: Cluster, index: int, path: str) -> tuple[int, str]:
    code = (
        "import urllib.request,urllib.error\n"
        f"try: r=urllib.request.urlopen('http://127.0.0.1:{cluster.healthz_port}{path}',timeout=5); print(r.status, r.read().decode())\n"
        "except urllib.error.HTTPError as e: print(e.code, e.read().decode())"
    )
    status, _, body = cluster.nodes[index].node.run(sys.executable, "-c", code).stdout.strip().partition(" ")
    return int(status), body


def test_flannel0_has_flanneld_address_mtu_and_route_and_a_1000_packet_queue(cluster: Cluster):
    start(cluster, 1, pods=False)
    node = cluster.nodes[1].node
    env = cluster.nodes[1].env()
    link = json.loads(node.ip("-j", "addr", "show", "flannel0").stdout)[0]
    eth0 = json.loads(node.ip("-j", "link", "show", "eth0").stdout)[0]
    subnet = env["FLANNEL_SUBNET"].rsplit(".", 1)[0] + ".0"
    assert [(a["local"], a["prefixlen"]) for a in link["addr_info"] if a["family"] == "inet"] == [(subnet, 32)]
    assert link["mtu"] == eth0["mtu"] - 28 == int(env["FLANNEL_MTU"])
    assert link["txqlen"] == TX_QUEUE == 1000  # room for the pods' bursts while the daemon is away
    assert f"{env['FLANNEL_NETWORK']} dev flannel0" in node.ip("route", "show").stdout


def test_sigterm_stops_within_2s_and_removes_the_tun(cluster: Cluster):
    start(cluster, 1, pods=False)
    assert http_get(cluster, 1, "/healthz") == (200, "flanneld is running")
    assert http_get(cluster, 1, "/readyz") == (200, "flanneld is ready")
    status = cluster.nodes[1].node.run(sys.executable, "-m", "udpflannel", "status",
                                       "--control-socket", str(cluster.nodes[1].control_socket)).stdout
    assert status.startswith("lease    10.5.") and "ready True" in status
    node = cluster.nodes[1].node
    assert "flannel0" in node.ip("link", "show").stdout
    t0 = time.monotonic()
    assert cluster.stop_node(1, signal.SIGTERM, timeout=2.0) == 0
    assert time.monotonic() - t0 < 2.0
    assert "flannel0" not in node.ip("link", "show").stdout
    assert cluster.leases(), "the lease stays for a restart to reuse, as with flanneld"


def test_attacker_without_lease_gets_nothing_in(cluster: Cluster):
    start(cluster, 1, 2)
    pod1, pod2 = cluster.nodes[1].pod, cluster.nodes[2].pod
    attacker = cluster.lab.add_node(9)  # on the underlay, no lease
    listener = pod1.popen([sys.executable, str(TOOLS / "udpcount.py"), "9999", "6"], stdout=subprocess.PIPE, text=True)
    assert listener.stdout.readline().strip() == "listening"
    before = metrics(cluster, 1)
    pinger = pod2.popen(["ping", "-n", "-q", "-c", "20", "-i", "0.1", "-W", "1", str(pod1.address)],
                        stdout=subprocess.PIPE, text=True)
    fired = attacker.run(sys.executable, str(TOOLS / "spoof.py"), str(cluster.nodes[1].node.address), "8285",
                         str(pod2.address), str(pod1.address), "9999", "100").stdout
    counts = json.loads(fired)
    assert sum(counts.values()) == 300
    ping_out, _ = pinger.communicate(timeout=30)
    assert " 0% packet loss" in ping_out, ping_out
    received = int(listener.communicate(timeout=30)[0].split()[-1])
    assert received == 0, "a spoofed datagram reached the pod"
    after = metrics(cluster, 1)

    def drops(reason: str) -> float:
        key = ("udpflannel_drops_total", (("direction", "udp_to_tun"), ("reason", reason)))
        return after[key] - before[key]

    rejected = sum(drops(r) for r in ("unknown_peer", "not_ipv4", "bad_header", "too_short"))
    assert drops("unknown_peer") >= 200  # the valid inner packets, from :8285 and from another port
    assert rejected == 300, {k: v for k, v in after.items() if k[0] == "udpflannel_drops_total"}


def test_metrics_move_with_traffic(cluster: Cluster):
    start(cluster, 1, 2)
    before = metrics(cluster, 1)
    result = ping(cluster.nodes[1].pod, str(cluster.nodes[2].pod.address), count=10)
    assert result.returncode == 0
    after = metrics(cluster, 1)

    def delta(name: str, **labels: str) -> float:
        key = (name, tuple(sorted(labels.items())))
        return after[key] - before.get(key, 0.0)

    assert delta("udpflannel_forwarded_packets_total", direction="tun_to_udp") >= 10
    assert delta("udpflannel_forwarded_packets_total", direction="udp_to_tun") >= 10
    assert delta("udpflannel_bytes_total", direction="tun_to_udp") >= 10 * 84
    assert delta("udpflannel_wakeups_total", fd="tun") >= 10
    assert delta("udpflannel_syscalls_total", call="udp_send") >= 10
    assert after[("udpflannel_peers", ())] == 1
    assert after[("udpflannel_syscalls_per_packet", ())] > 0
    assert after[("udpflannel_lease_expiry_timestamp_seconds", ())] > time.time() + 23 * 3600


def test_not_ready_until_config_then_etcd_down_15s_forwarding_continues(cluster: Cluster):
    cluster.etcd.ctl("del", f"{PREFIX}/config")
    cluster.start_node(1)
    wait_for(lambda: "Couldn't fetch network config" in cluster.nodes[1].log(), timeout=10, what="the config retry log line")
    assert http_get(cluster, 1, "/readyz") == (503, "flanneld is not ready yet")
    cluster.put_config({"Network": "10.5.0.0/16", "Backend": {"Type": "udp", "Port": 0}})  # flannel accepts port 0
    wait_for(lambda: "Backend.Port: must be between 1 and 65535" in cluster.nodes[1].log(), timeout=10,
             what="the bad config refused, naming the field")
    assert http_get(cluster, 1, "/readyz")[0] == 503
    cluster.put_config(CONFIG)
    cluster.wait_ready(1)
    cluster.add_pod(1)
    start(cluster, 2)
    pod1, pod2 = cluster.nodes[1].pod, cluster.nodes[2].pod
    pinger = pod1.popen(["ping", "-n", "-q", "-c", "90", "-i", "0.2", "-W", "1", str(pod2.address)],
                        stdout=subprocess.PIPE, text=True)
    time.sleep(0.5)
    cluster.etcd.stop()
    time.sleep(15)
    cluster.etcd.start()
    out, _ = pinger.communicate(timeout=60)
    assert " 0% packet loss" in out, out
    # reconnected: a lease change made after the restart reaches node 1
    fresh = unused_subnet(cluster.etcd, PREFIX)
    cluster.etcd.ctl("put", f"{PREFIX}/subnets/{fresh.replace('/', '-')}", '{"PublicIP":"198.18.0.77","PublicIPv6":null}')
    wait_for(lambda: not _route_gone(cluster, 1, fresh.replace(".0/", ".1/")), timeout=15,
             what="node 1 seeing a new lease after etcd returned")
