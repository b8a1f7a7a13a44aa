"""Hostile datagrams from a peer's own address (issue 15, item 3), on a real cluster.

Three udpflannel nodes on a real etcd: node 1 the target (fast path, or ``--no-fast-path``), node 2 the
peer whose PublicIP:8285 the attacker forges (it sends nothing itself), node 3 a legitimate peer whose
pod keeps talking to node 1's pod throughout (a 10 ms ping and back-to-back TCP transfers). The
attacker is one more host on the underlay bridge, with no lease (tools/forge.py: ≥ 100,000 datagrams,
random bytes and mutations of real traffic, singles and GRO-sized UDP_SEGMENT bursts, paced on the
target's own counters so that no socket buffer overflows). Node 1's pod captures everything that comes
from node 2's subnet (tools/podcap.py).

What is checked, exactly (equalities, not bounds):
- every datagram sent is either a ``udp_to_tun`` drop or accepted from node 2's address, per reason
  exactly what the per-packet decision (``forward.inbound``) gives that datagram alone, and the
  accepted ones exactly those well-formed, from node 2's subnet, with TTL ≥ 2 (tools/hostile.py,
  written independently of the product); the kernel dropped none (``/proc/net/snmp``);
- the pod received exactly the accepted packets, byte for byte after two hops (super-packets cut back
  into the packets they carry), and nothing malformed: malformed-and-delivered is 0;
- the daemon stayed up, the ping lost nothing and every transfer kept its SHA-256.
"""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
from collections import Counter
from ipaddress import IPv4Address, IPv4Network
from pathlib import Path

import pytest

from tests.cluster import TOOLS, BackgroundTransfer, Pinger, unused_subnet, wait_for
from tests.test_cluster import cluster  # noqa: F401  (the fixture: etcd, and the daemons checked at the end)
from udpflannel.httpapi import get
from udpflannel.lab.cluster import PREFIX, Cluster

COUNT = 100_000
SEED = 15
WINDOW = 1000  # datagrams in flight at most: well inside the target's 4 MB socket buffer
TRANSFER = 4 * 1024 * 1024  # bytes per TCP transfer pod 3 -> pod 1 while the attack runs
TRANSFER_RATE = 8 * 1024 * 1024  # bytes/s: traffic, not a load test
MODES = {"fast": (), "per_packet": ("--no-fast-path",)}


class WatchedPinger(Pinger):
    def replied(self) -> bool:
        """Whether a reply has come yet (ping writes to a file nobody reads while it runs)."""
        return b"bytes from" in os.pread(self._out.fileno(), 1 << 16, 0)


def status(on: Cluster, index: int) -> dict:
    code, body = asyncio.run(get("/status", unix_socket=str(on.nodes[index].control_socket)))
    assert code == 200, body
    return json.loads(body)


def peer_rx(st: dict, public_ip: str) -> int:
    return next(p["rx_packets"] for p in st["peers"] if p["public_ip"] == public_ip)


def drops(st: dict, direction: str = "udp_to_tun") -> Counter:
    return Counter(st["counters"]["drops"][direction])


def losses(before: dict, after: dict) -> dict[str, int]:
    """What a node's daemon counted as not passed on, between two statuses: drops by direction and
    reason, failed sends and TUN writes, GRO rows refused."""
    c0, c1 = before["counters"], after["counters"]
    out = {f"{d} {reason}": n for d in ("tun_to_udp", "udp_to_tun") for reason, n in (drops(after, d) - drops(before, d)).items()}
    out |= {k: c1[k] - c0[k] for k in ("send_errors", "tun_write_errors", "gro_refused") if c1.get(k, 0) != c0.get(k, 0)}
    return out


def queue_drops(on: Cluster) -> dict[str, int]:
    """Packets the kernel dropped on each node's and pod's devices, by way (a full TUN queue: tx)."""
    out = {}
    for i, n in on.nodes.items():
        for where, ns in (("node", n.node), ("pod", n.pod)):
            for link in json.loads(ns.ip("-s", "-j", "link", "show").stdout):
                stats = link.get("stats64", {})
                for way in ("tx", "rx"):
                    out[f"{where} {i} {link['ifname']} {way}"] = stats.get(way, {}).get("dropped", 0)
    return out


@pytest.mark.parametrize("mode", list(MODES))
def test_forged_datagrams_are_all_counted_and_nothing_malformed_reaches_the_pod(cluster: Cluster, mode: str,  # noqa: F811
                                                                               tmp_path: Path):
    # node 3 runs the other path: with a per-packet sender, every GRO batch the fast target sees is the attacker's
    legit_mode = "per_packet" if mode == "fast" else "fast"
    for index, args in ((1, MODES[mode]), (2, ()), (3, MODES[legit_mode])):
        cluster.start_node(index, *args)
    for index in (1, 2, 3):
        cluster.wait_ready(index)
        cluster.add_pod(index)
    nodes = cluster.nodes
    subnets = {i: IPv4Network(nodes[i].env()["FLANNEL_SUBNET"], strict=False) for i in nodes}
    for a, b in ((1, 2), (1, 3), (3, 1), (2, 1)):
        wait_for(lambda a=a, b=b: str(subnets[b]) in cluster.routed_subnets(a), timeout=10,
                 what=f"node {a} routing node {b}'s subnet")
    pod1, pod3 = nodes[1].pod, nodes[3].pod
    spoofed = str(nodes[2].node.address)
    attacker = cluster.lab.add_node(9)  # on the underlay, no lease

    unleased = IPv4Network(unused_subnet(cluster.etcd, PREFIX)).network_address + 1  # in no node's subnet
    outside = [pod3.address, pod1.address, subnets[1].network_address + 77, unleased, IPv4Address("127.0.0.1"),
               IPv4Address("0.0.0.0"), IPv4Address("224.0.0.1"), IPv4Address("255.255.255.255"), IPv4Address(spoofed), IPv4Address("8.8.8.8")]
    config = {"target": str(nodes[1].node.address), "port": 8285, "spoof": spoofed, "subnet": str(subnets[2]),
              "peer_pod": str(nodes[2].pod.address), "pod": str(pod1.address), "outside": [str(a) for a in outside],
              "seed": SEED, "count": COUNT, "mtu": int(nodes[1].env()["FLANNEL_MTU"]), "window": WINDOW,
              "control_socket": str(nodes[1].control_socket), "report": str(tmp_path / "forged.json")}
    forge = attacker.popen([sys.executable, str(TOOLS / "forge.py"), json.dumps(config)], stdin=subprocess.PIPE,
                           stdout=subprocess.PIPE, text=True)
    capture = pod1.popen([sys.executable, str(TOOLS / "podcap.py"), "eth0", str(subnets[2]), str(subnets[3])],
                         stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    assert capture.stdout.readline().strip() == "listening"
    assert forge.stdout.readline().strip() == "ready", "the forging tool failed before sending"

    before = {i: status(cluster, i) for i in (1, 2, 3)}
    snmp_before = {i: nodes[i].node.snmp() for i in (1, 3)}
    queues_before = queue_drops(cluster)
    pinger = WatchedPinger(pod3, str(pod1.address), interval=0.01)
    wait_for(pinger.replied, timeout=5, what="the first ping reply")
    forge.stdin.write("go\n")
    forge.stdin.flush()
    transfers = []
    while forge.poll() is None:  # TCP transfers back to back for as long as the attack lasts
        transfers.append(BackgroundTransfer(pod3, pod1, str(pod1.address), TRANSFER, rate=TRANSFER_RATE).finish())
    assert forge.returncode == 0, "the forging tool failed"
    report = json.loads((tmp_path / "forged.json").read_text())
    capture.stdin.write(f"stop {sum(report['delivered'].values())}\n")  # what the pod must get, at least
    capture.stdin.flush()
    seen = json.loads(capture.communicate(timeout=60)[0])
    pinger.stop()
    after = {i: status(cluster, i) for i in (1, 2, 3)}
    snmp_after = {i: nodes[i].node.snmp() for i in (1, 3)}
    queues = {k: v - queues_before.get(k, 0) for k, v in queue_drops(cluster).items() if v - queues_before.get(k, 0)}

    dropped = drops(after[1]) - drops(before[1])
    accepted = peer_rx(after[1], spoofed) - peer_rx(before[1], spoofed)
    kernel = {k: snmp_after[1][k] - snmp_before[1][k] for k in ("UdpRcvbufErrors", "UdpInErrors", "UdpInCsumErrors")}
    figures = table(mode, report, dropped, accepted, seen) + (
        f"\nmeanwhile pod 3 -> pod 1: {len(transfers)} TCP transfers of {TRANSFER >> 20} MiB, "
        f"{sum(a == b for a, b in transfers)} with equal SHA-256; a ping every 10 ms, {len(pinger.replies)} "
        f"replies, {pinger.lost} lost")
    print(figures)

    assert nodes[1].proc.poll() is None, f"node 1's daemon died:\n{nodes[1].log()[-3000:]}"
    assert report["total"] >= COUNT and not report["send_errors"], report["send_errors"]
    # nobody but the attacker sent from node 2's address: node 2 itself sent nothing at all
    assert after[2]["counters"]["sent_packets"] == before[2]["counters"]["sent_packets"]
    # the accounting: sent = dropped by reason + accepted, the kernel dropped nothing on the way
    assert kernel == dict.fromkeys(kernel, 0), kernel
    assert sum(dropped.values()) + accepted == report["total"], figures
    assert accepted == sum(report["accepted"].values()) == report["reference"].get("forward", 0), figures
    assert +dropped == Counter({k: v for k, v in report["reference"].items() if k != "forward"}), figures
    # the pod: exactly the accepted packets, none malformed, nothing from elsewhere, nothing lost by the capture
    assert seen["malformed"] == {}, seen["malformed_examples"]
    assert seen["foreign"] == 0, seen["foreign_examples"]
    assert seen["socket_drops"] == 0 and seen["truncated"] == 0
    assert Counter(seen["delivered"]) == Counter(report["delivered"]), figures
    # the fast path really got GRO batches (exactly the attacker's bursts: node 3 sends singles), and
    # merged runs of forged TCP segments and of UDP datagrams into super-packets (checked above, packet by
    # packet, like the rest)
    if mode == "fast":
        c0, c1 = before[1]["counters"], after[1]["counters"]
        assert c1["udp_gro_recvs"] - c0["udp_gro_recvs"] == report["bursts"]
        assert c1["udp_gro_datagrams"] - c0["udp_gro_datagrams"] == report["burst_rows"]
        merged = {kind for kind in seen["units"] if not kind.startswith("gso_type 0")}
        uso = "tun uso on" in nodes[1].log()  # UDP super-packets only where the TUN takes them (Linux ≥ 6.2)
        assert merged == {"gso_type 1 needs_csum"} | ({"gso_type 5 needs_csum"} if uso else set()), seen["units"]
    # pod-to-pod traffic kept flowing
    node3_udp = {k: snmp_after[3][k] - snmp_before[3][k] for k in ("UdpRcvbufErrors", "UdpInErrors")}
    assert pinger.lost == 0, (f"the kernel's drops on the devices: {queues}, node 3's UDP: {node3_udp}; "
                              f"node 1's daemon: {losses(before[1], after[1])}, node 3's: {losses(before[3], after[3])}\n"
                              + pinger.output[-1000:])
    stamps = [t for t, _ in pinger.replies]
    assert stamps[0] < report["started"] and stamps[-1] > report["finished"]
    assert transfers and all(sent == received for sent, received in transfers)


def table(mode: str, report: dict, dropped: Counter, accepted: int, seen: dict) -> str:
    """The attack's figures, as the issue's closing note wants them."""
    lines = [f"## {mode}: {report['total']} datagrams in {report['syscalls']} sends "
             f"({report['bursts']} GRO-sized bursts, {report['burst_rows']} datagrams), "
             f"{report['finished'] - report['started']:.1f} s",
             "| category | sent | accepted |", "|---|---:|---:|"]
    lines += [f"| {c} | {n} | {report['accepted'].get(c, 0)} |" for c, n in sorted(report["sent"].items())]
    lines += ["", "| dropped, by reason | count | per-packet decision |", "|---|---:|---:|"]
    reference = report["reference"]
    lines += [f"| {r} | {dropped[r]} | {reference.get(r, 0)} |" for r in sorted(set(dropped) | set(reference) - {"forward"})
              if dropped[r] or reference.get(r)]
    lines += [f"| **total dropped** | {sum(dropped.values())} | {report['total'] - reference.get('forward', 0)} |", "",
              f"accepted (delivered into flannel0): {accepted}; the pod received {seen['packets']} packets from "
              f"node 2's subnet in {seen['frames']} frames {seen['units']}; malformed among them: "
              f"{sum(seen['malformed'].values())}"]
    return "\n".join(lines)
