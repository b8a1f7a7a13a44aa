"""The fast path end to end: two namespaced nodes in static mode, a pod behind cni0 on each.

A fast-path node and a per-packet node interoperate both ways (the per-packet node sees only ordinary
datagrams, as a flanneld peer would), 200 MB keep their SHA-256 over every pairing, TTL and ICMP
behave as on the per-packet path, parallel TCP flows (several in one GRO batch) each keep their bytes,
and each fallback (no GSO/GRO and no TUN offloads, forced with
``--disable-offloads``; a device without checksum offload) still moves the bytes, on the path it says.
"""

from __future__ import annotations

import json
import re
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from tests.cluster import TOOLS, parallel_transfers, ping, start_udpflannel, tcp_transfer, wait_for
from tests.conftest import require
from udpflannel.lab.netns import Lab

NETWORK = "10.5.0.0/16"
SUBNETS = {1: "10.5.1.0/24", 2: "10.5.2.0/24"}
BIG = 200 * 1024 * 1024
COUNTERS = re.compile(r"stopping; counters (\{.*\})")


class Pair:
    """Two nodes, their daemons and pods; ``modes[i]`` is "fast" or "slow" (``--no-fast-path``), ``args[i]``
    more flags for node ``i``'s daemon."""

    def __init__(self, lab: Lab, tmp: Path, modes: dict[int, str], args: dict[int, list[str]] | None = None,
                 before_start=None) -> None:
        self.lab, self.tmp = lab, tmp
        self.nodes = {i: lab.add_node(i) for i in (1, 2)}
        if before_start is not None:
            before_start(self.nodes)
        self.daemons: dict[int, subprocess.Popen] = {}
        for i, node in self.nodes.items():
            other = 3 - i
            env_file = tmp / f"subnet-{i}.env"
            flags = ["static", "--iface", "eth0", "--subnet", SUBNETS[i], "--network", NETWORK,
                     "--route", f"{SUBNETS[other]}={self.nodes[other].address}", "--subnet-file", str(env_file),
                     *(args or {}).get(i, [])]
            if modes[i] == "slow":
                flags.append("--no-fast-path")
            self.daemons[i] = start_udpflannel(node, flags, tmp, ready_file=env_file)
        self.pods = {i: lab.add_pod(self.nodes[i], SUBNETS[i].replace(".0/", ".1/"), mtu=1472) for i in (1, 2)}

    def log(self, i: int) -> str:
        return Path(self.daemons[i].log_path).read_text()  # type: ignore[attr-defined]

    def stop(self) -> dict[int, dict]:
        """SIGTERM both daemons; the counters each logged on the way out."""
        out = {}
        for i, proc in self.daemons.items():
            proc.send_signal(signal.SIGTERM)
            proc.wait(timeout=10)
            found = COUNTERS.findall(self.log(i))
            assert found, f"no counters in node {i}'s log:\n{self.log(i)[-2000:]}"
            out[i] = json.loads(found[-1])
        return out

    def transfer(self, a: int, b: int, nbytes: int = BIG) -> None:
        sent, received = tcp_transfer(self.pods[a], self.pods[b], str(self.pods[b].address), nbytes)
        assert sent == received, f"SHA-256 differs after {nbytes} bytes pod {a} -> pod {b}"


def test_fast_and_per_packet_nodes_interoperate_both_ways(lab: Lab, tmp_path: Path):
    """The per-packet node is what a flanneld peer is on the wire: if it takes our datagrams and we take
    its, the wire format is unchanged. 200 MB each way."""
    pair = Pair(lab, tmp_path, {1: "fast", 2: "slow"})
    assert "fast path: tun tso on" in pair.log(1)
    for a, b in ((1, 2), (2, 1)):
        result = ping(pair.pods[a], str(pair.pods[b].address), count=2)
        assert " 0% packet loss" in result.stdout and "ttl=60" in result.stdout, result.stdout
    pair.transfer(1, 2)
    pair.transfer(2, 1)
    fast, slow = (c := pair.stop())[1], c[2]
    assert fast["tun_superpackets"] > 0 and fast["udp_gso_sends"] > 0  # TSO read, GSO sent...
    assert slow["udp_recvs"] >= slow["udp_packets"] - slow["udp_wakeups"]  # ...and seen one by one
    assert fast["udp_gro_recvs"] == 0  # a per-packet sender gives GRO nothing to merge on veth
    for counters in (fast, slow):
        for direction in ("tun_to_udp", "udp_to_tun"):
            assert not any(v for k, v in counters["drops"][direction].items() if k != "not_ipv4"), counters["drops"]


def test_fast_to_fast_200mb_both_ways_in_batches(lab: Lab, tmp_path: Path):
    pair = Pair(lab, tmp_path, {1: "fast", 2: "fast"})
    pair.transfer(1, 2)
    pair.transfer(2, 1)
    counters = pair.stop()
    for c in counters.values():
        assert c["udp_gso_sends"] > 0 and c["udp_gro_recvs"] > 0 and c["tun_gso_writes"] > 0
        assert c["tun_write_errors"] == 0 and c["send_errors"] == 0
        # each direction's data moved many packets per syscall (ACKs, one by one, pull the mean down)
        assert c["udp_gso_datagrams"] / c["udp_gso_sends"] > 4
        assert c["tun_gso_segments"] / c["tun_gso_writes"] > 4


FLOW_BYTES = 16 * 1024 * 1024  # per transfer: 8 at once move 128 MB, seconds on the fast path


@pytest.mark.parametrize("peer", ["fast", "slow"], ids=["fast-peer", "per-packet-peer"])
def test_four_parallel_tcp_transfers_each_way_keep_their_sha256(lab: Lab, tmp_path: Path, peer: str):
    """4 TCP transfers pod 1 -> pod 2 and 4 back, all at once (16 MB each, each its own bytes): every
    one arrives with its SHA-256 (the flows share one UDP flow between the daemons, so a fast peer's
    GRO batches may interleave them), and no daemon dropped anything or failed a write or a send."""
    pair = Pair(lab, tmp_path, {1: "fast", 2: peer})
    pods = pair.pods
    parallel_transfers([(pods[1], pods[2], str(pods[2].address))] * 4 + [(pods[2], pods[1], str(pods[1].address))] * 4,
                       FLOW_BYTES)
    counters = pair.stop()
    fast = [counters[i] for i in (1, 2) if i == 1 or peer == "fast"]
    for c in fast:
        assert c["tun_write_errors"] == 0 and c["send_errors"] == 0
        for direction in ("tun_to_udp", "udp_to_tun"):
            assert not any(v for k, v in c["drops"][direction].items() if k != "not_ipv4"), c["drops"]


@pytest.mark.parametrize("size", [1400, 64])
def test_a_udp_flow_is_merged_on_write_and_arrives_intact(lab: Lab, tmp_path: Path, size: int):
    """UDP datagrams of one flow, received in GRO batches, go into node 2's TUN as GSO_UDP_L4 writes
    (at most 64 a write); the kernel cuts them again and the pod gets every datagram as it was sent."""
    pair = Pair(lab, tmp_path, {1: "fast", 2: "fast"})
    assert "tun uso on" in pair.log(2)  # Linux >= 6.2
    count = 6000
    receiver = pair.pods[2].popen([sys.executable, str(TOOLS / "udpflow.py"), "recv", "7000", str(count), "20"],
                                  stdout=subprocess.PIPE, text=True)
    assert receiver.stdout.readline().strip() == "listening"
    before = pair.pods[2].snmp()["UdpInCsumErrors"]
    # bursts of 50 with 2 ms pauses: batches to merge, and room for a daemon that a busy machine starves for a
    # moment (what it reads it delivers; flannel0's 500-packet queue takes the rest of a late wake-up)
    pair.pods[1].run(sys.executable, str(TOOLS / "udpflow.py"), "send", str(pair.pods[2].address), "7000",
                     str(count), str(size), "50", timeout=60)
    out, _ = receiver.communicate(timeout=30)
    result = json.loads(out)
    assert result == {"received": count, "intact": count, "distinct": count}, result
    assert pair.pods[2].snmp()["UdpInCsumErrors"] == before
    counters = pair.stop()
    assert counters[2]["tun_gso_writes"] > 0  # merged...
    assert counters[2]["tun_gso_segments"] <= 64 * counters[2]["tun_gso_writes"]  # ...within the kernel's limit
    assert counters[2]["tun_writes"] < counters[2]["delivered_packets"] / 4
    assert not any(counters[2]["drops"]["udp_to_tun"].values()) and counters[2]["tun_write_errors"] == 0


TTL_CLIENT = """
import socket, sys, time
s = socket.create_connection((sys.argv[1], 5201), timeout=5)
s.setsockopt(socket.IPPROTO_IP, socket.IP_TTL, int(sys.argv[2]))
s.setblocking(False)
end = time.monotonic() + 1.0
while time.monotonic() < end:
    try:
        s.send(b"x" * 65536)
    except (BlockingIOError, OSError):
        time.sleep(0.01)
s.close()
"""


@pytest.mark.parametrize("ttl, dropper", [(2, 1), (3, 2)])
def test_a_tcp_stream_whose_ttl_expires_gets_time_exceeded(lab: Lab, tmp_path: Path, ttl: int, dropper: int):
    """TTL set after the handshake, so the data goes out as TSO super-packets (node 1) and GRO batches
    (node 2): the node where it expires drops it and the sender hears "time exceeded", as it would
    from the per-packet path."""
    pair = Pair(lab, tmp_path, {1: "fast", 2: "fast"})
    server = pair.pods[2].popen(["iperf3", "-s", "-1", "-p", "5201"], stdout=subprocess.DEVNULL,
                                stderr=subprocess.DEVNULL)
    wait_for(lambda: "5201" in pair.pods[2].run("ss", "-ltn").stdout, timeout=5, what="iperf3 listening")
    before = pair.pods[1].snmp()["IcmpInTimeExcds"]
    pair.pods[1].run(sys.executable, "-c", TTL_CLIENT, str(pair.pods[2].address), str(ttl), timeout=30)
    assert pair.pods[1].snmp()["IcmpInTimeExcds"] > before
    server.kill()
    counters = pair.stop()
    direction = "tun_to_udp" if dropper == 1 else "udp_to_tun"
    assert counters[dropper]["drops"][direction]["ttl_expired"] > 0
    assert counters[dropper]["icmp_sent"] > 0
    if dropper == 2:
        assert counters[2]["udp_gro_recvs"] > 0  # the expiring data did arrive in GRO batches


def test_ping_ttl_and_unreachable_as_on_the_per_packet_path(lab: Lab, tmp_path: Path):
    pair = Pair(lab, tmp_path, {1: "fast", 2: "fast"})
    pods = pair.pods
    result = ping(pods[1], str(pods[2].address), ttl=2)
    assert "From 10.5.1.0 icmp_seq=1 Time to live exceeded" in result.stdout, result.stdout
    result = ping(pods[1], str(pods[2].address), ttl=3)
    assert "From 10.5.2.0 icmp_seq=1 Time to live exceeded" in result.stdout, result.stdout
    result = ping(pods[1], "10.5.77.9")
    assert "From 10.5.1.0 icmp_seq=1 Destination Net Unreachable" in result.stdout, result.stdout


def test_without_udp_gso_and_gro(lab: Lab, tmp_path: Path):
    args = {i: ["--disable-offloads=udp_gso,udp_gro"] for i in (1, 2)}
    pair = Pair(lab, tmp_path, {1: "fast", 2: "fast"}, args=args)
    assert "udp gso off, udp gro off" in pair.log(1)
    pair.transfer(1, 2, 50 * 1024 * 1024)
    counters = pair.stop()
    assert counters[1]["tun_superpackets"] > 0  # still reading 64 KB at a time...
    for c in counters.values():
        assert c["udp_gso_sends"] == 0 and c["udp_gro_recvs"] == 0  # ...but one datagram per syscall


GSO_PROBE = """
import errno, socket, struct, sys
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
try:
    s.sendmsg([bytes(2800)], [(17, 103, struct.pack("=H", 1400))], 0, (sys.argv[1], 9))
    print("software checksum")
except OSError as exc:
    print("EIO" if exc.errno == errno.EIO else exc)
"""


def test_an_egress_device_without_checksum_offload(lab: Lab, tmp_path: Path):
    """``ethtool -K eth0 tx off`` on node 1. Kernels before ~6.11 refuse a GSO send there with EIO (the
    engine then says so once and sends datagram by datagram); newer ones checksum in software. A probe
    asks this kernel which it does, and the counters must show that path — and the bytes arrive intact.
    (The EIO path itself is also driven in-process: tests/test_fastpath.py, test_refused_sends_lose_nothing.)"""
    require(shutil.which("ethtool") is not None, "needs `ethtool` (./dev setup installs it)")

    def no_tx_checksum(nodes) -> None:
        nodes[1].run("ethtool", "-K", "eth0", "tx", "off")

    pair = Pair(lab, tmp_path, {1: "fast", 2: "fast"}, before_start=no_tx_checksum)
    kernel = pair.nodes[1].run(sys.executable, "-c", GSO_PROBE, str(pair.nodes[2].address)).stdout.strip()
    assert kernel in ("EIO", "software checksum"), kernel
    pair.transfer(1, 2, 50 * 1024 * 1024)
    counters = pair.stop()
    assert counters[1]["send_errors"] == 0 and counters[2]["drops"]["udp_to_tun"]["bad_checksum"] == 0
    if kernel == "EIO":
        assert counters[1]["udp_gso_fallbacks"] >= 1 and counters[1]["udp_gso_sends"] == 0
        assert pair.log(1).count("lacks checksum offload") == 1
    else:
        assert counters[1]["udp_gso_fallbacks"] == 0 and counters[1]["udp_gso_sends"] > 0


def test_without_tun_offloads_the_per_packet_engine_runs(lab: Lab, tmp_path: Path):
    pair = Pair(lab, tmp_path, {1: "fast", 2: "fast"}, args={1: ["--disable-offloads=tun_tso"]})
    assert "fast path:" not in pair.log(1) and "fast path:" in pair.log(2)
    pair.transfer(1, 2, 50 * 1024 * 1024)
    counters = pair.stop()
    assert counters[1]["tun_superpackets"] == 0 and counters[1]["batches"]["tun_read"] <= 1.0
