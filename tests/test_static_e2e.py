"""Two namespaced nodes in static mode, a pod behind cni0 on each: the per-packet path end to end."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

from tests.cluster import ping, start_udpflannel, tcp_transfer
from udpflannel.lab.netns import Lab

NETWORK = "10.5.0.0/16"
SUBNETS = {1: "10.5.1.0/24", 2: "10.5.2.0/24"}


@pytest.fixture
def two_nodes(lab: Lab, tmp_path: Path):
    nodes = {i: lab.add_node(i) for i in (1, 2)}
    daemons = {}
    for i, node in nodes.items():
        other = 3 - i
        env_file = tmp_path / f"subnet-{i}.env"
        daemons[i] = start_udpflannel(node, [
            "static", "--iface", "eth0", "--subnet", SUBNETS[i], "--network", NETWORK,
            "--route", f"{SUBNETS[other]}={nodes[other].address}", "--subnet-file", str(env_file),
            "--control-socket", str(tmp_path / f"ctl-{i}.sock"),
        ], tmp_path, ready_file=env_file)
    env = dict(line.split("=", 1) for line in (tmp_path / "subnet-1.env").read_text().splitlines())
    assert env["FLANNEL_MTU"] == "1472"
    pods = {i: lab.add_pod(nodes[i], SUBNETS[i].replace(".0/", ".1/"), mtu=int(env["FLANNEL_MTU"])) for i in nodes}
    yield nodes, pods, daemons
    for proc in daemons.values():
        if proc.poll() is not None:
            raise AssertionError(f"udpflannel died during the test:\n{Path(proc.log_path).read_text()}")


def test_ping_both_ways(two_nodes):
    nodes, pods, _ = two_nodes
    for a, b in ((1, 2), (2, 1)):
        result = ping(pods[a], str(pods[b].address), count=3)
        assert result.returncode == 0, result.stdout + result.stderr
        assert " 0% packet loss" in result.stdout
        # two kernel forwards + flannel's two TTL decrements: 64 → 60, as with flanneld
        assert "ttl=60" in result.stdout


def test_status_shows_the_peer_and_counters(two_nodes, tmp_path: Path):
    nodes, pods, _ = two_nodes
    assert ping(pods[1], str(pods[2].address), count=2).returncode == 0
    out = nodes[1].run(sys.executable, "-m", "udpflannel", "status", "--json", "--control-socket", str(tmp_path / "ctl-1.sock"))
    status = json.loads(out.stdout)
    assert status["lease"] == {"subnet": SUBNETS[1], "public_ip": "198.18.0.1", "static": True}
    [peer] = status["peers"]
    assert (peer["subnet"], peer["public_ip"], peer["port"]) == (SUBNETS[2], "198.18.0.2", 8285)
    assert peer["rx_packets"] >= 2 and peer["last_seen_seconds_ago"] is not None
    assert status["counters"]["sent_packets"] >= 2


def test_tcp_50mb_sha256(two_nodes):
    _, pods, _ = two_nodes
    sent, received = tcp_transfer(pods[1], pods[2], str(pods[2].address), 50 * 1024 * 1024)
    assert sent == received


def test_net_unreachable_reaches_the_pod(two_nodes):
    """flannel's net-unreachable dies as a martian; ours arrives, from the node's flannel0 address."""
    _, pods, _ = two_nodes
    result = ping(pods[1], "10.5.77.9")
    assert result.returncode != 0
    assert "From 10.5.1.0 icmp_seq=1 Destination Net Unreachable" in result.stdout, result.stdout


def test_time_exceeded_on_both_sides(two_nodes):
    """TTL 2: node 1's kernel leaves 1, node 1's daemon answers. TTL 3: node 2's daemon answers."""
    _, pods, _ = two_nodes
    result = ping(pods[1], str(pods[2].address), ttl=2)
    assert "From 10.5.1.0 icmp_seq=1 Time to live exceeded" in result.stdout, result.stdout
    result = ping(pods[1], str(pods[2].address), ttl=3)
    assert "From 10.5.2.0 icmp_seq=1 Time to live exceeded" in result.stdout, result.stdout
