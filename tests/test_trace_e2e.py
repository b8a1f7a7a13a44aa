"""``udpflannel trace`` against running daemons in namespaces (issue 19): the journey of one ping step
by step on both paths, a pcap read back by tshark with the inner echo and its outer :8285 datagram, and
a client that stops reading while the dataplane goes on forwarding."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.cluster import ping, tcp_transfer, wait_for
from tests.conftest import require
from tests.test_fastpath_e2e import Pair
from udpflannel.lab.cluster import Cluster
from udpflannel.lab.netns import Lab, Netns

pytestmark = [pytest.mark.netns, pytest.mark.timeout(240)]

CONFIG = {"Network": "10.5.0.0/16", "Backend": {"Type": "udp"}}


class Trace:
    """``udpflannel trace ARGS`` running in namespace ``ns``; returns once it is attached."""

    def __init__(self, ns: Netns, control_socket: Path, tmp: Path, *args: str, name: str = "trace") -> None:
        self.out, self.err = tmp / f"{name}.out", tmp / f"{name}.err"
        with open(self.out, "wb") as out, open(self.err, "wb") as err:
            self.proc = ns.popen([sys.executable, "-m", "udpflannel", "trace", "--control-socket", str(control_socket),
                                  "--seconds", "120", *args], stdout=out, stderr=err,
                                 env={**os.environ, "PYTHONUNBUFFERED": "1"})

        def attached() -> bool:
            assert self.proc.poll() is None, f"trace exited {self.proc.returncode}: {self.err.read_text()}"
            return "tracing" in self.err.read_text()
        wait_for(attached, timeout=30, what="udpflannel trace attached")

    def wait(self, timeout: float = 30) -> str:
        assert self.proc.wait(timeout=timeout) == 0, self.err.read_text()
        return self.out.read_text()

    def interrupt(self) -> str:
        os.killpg(self.proc.pid, signal.SIGINT)
        return self.wait()


def journeys(text: str) -> list[tuple[str, dict[str, str]]]:
    """The client's output as (heading, {step: text}) per packet."""
    out = []
    for block in text.strip().split("\n\n"):
        lines = block.splitlines()
        steps = dict(re.match(r"\s+\d+\. (\S+(?: \S+)?)\s{2,}(.*)$", line).groups() for line in lines[1:])
        out.append((lines[0], steps))
    return out


@pytest.mark.parametrize("mode", ["fast", "slow"])
def test_trace_shows_each_step_of_one_ping_on_both_paths_through_a_socket_path_longer_than_107_bytes(
        lab: Lab, tmp_path: Path, mode: str):
    deep = tmp_path / ("d" * 50) / ("e" * 50)  # as in a deep CI working directory: past sun_path's 107 bytes
    deep.mkdir(parents=True)
    sockets = {i: deep / f"ctl-{i}.sock" for i in (1, 2)}
    assert all(len(str(path)) > 107 for path in sockets.values())
    pair = Pair(lab, tmp_path, {1: mode, 2: mode}, {i: ["--control-socket", str(sockets[i])] for i in (1, 2)})
    assert ("fast path: tun tso on" in pair.log(1)) == (mode == "fast")
    pod1, pod2 = str(pair.pods[1].address), str(pair.pods[2].address)
    trace = Trace(pair.nodes[1], sockets[1], tmp_path, "--host", pod2, "--proto", "icmp", "--count", "2")
    assert ping(pair.pods[1], pod2).returncode == 0
    (out_head, out), (in_head, back) = journeys(trace.wait())
    assert "out (flannel0 → peer): FORWARD" in out_head and "in (peer → flannel0): FORWARD" in in_head
    assert re.fullmatch(rf"flannel0 → daemon: {pod1} > {pod2} icmp echo request id \d+ seq 1, 84 bytes", out["tun read"])
    assert out["route"] == f"{pod2} in 10.5.2.0/24 → node 198.18.0.2:8285"
    assert out["ttl"] == "63 → 62 (header checksum patched, RFC 1624)"  # pod 64, node 1's kernel 63
    assert out["encap"] == "UDP 198.18.0.1:8285 → 198.18.0.2:8285, datagram 112 bytes (IPv4 20 + UDP 8 + 84)"
    assert out["verdict"] == "FORWARD: sent to 198.18.0.2:8285"
    assert back["udp recv"] == "198.18.0.2:8285 → 198.18.0.1:8285, datagram 112 bytes (IPv4 20 + UDP 8 + 84); flannel0 MTU 1472"
    assert re.fullmatch(rf"inner {pod2} > {pod1} icmp echo reply id \d+ seq 1, 84 bytes", back["decap"])
    assert back["peer"] == f"198.18.0.2:8285 holds 10.5.2.0/24; inner source {pod2} inside it"
    assert back["checks"].endswith(": ok")
    assert back["ttl"] == "62 → 61 (header checksum patched, RFC 1624)"  # node 2's kernel and daemon took 2
    assert back["tun write"].startswith("daemon → flannel0, one write, 84 bytes")
    assert back["verdict"] == "FORWARD: written to flannel0"

    # a drop on the way out (no lease) and one on the way in (the TTL runs out at node 2's daemon)
    out_drops = Trace(pair.nodes[1], sockets[1], tmp_path, "--drops", "--count", "1", name="drops1")
    in_drops = Trace(pair.nodes[2], sockets[2], tmp_path, "--drops", "--count", "1", name="drops2")
    ping(pair.pods[1], "10.5.77.9")
    ping(pair.pods[1], pod2, ttl=3)
    [(head, steps)] = journeys(out_drops.wait())
    assert "out (flannel0 → peer): NO_ROUTE" in head and steps["route"] == "10.5.77.9 is in no leased subnet"
    assert steps["verdict"].startswith('NO_ROUTE: dropped, counted in udpflannel_drops_total{direction="tun_to_udp"')
    assert steps["verdict"].endswith(f"ICMP net-unreachable sent to {pod1}")
    [(head, steps)] = journeys(in_drops.wait())
    assert "in (peer → flannel0): TTL_EXPIRED" in head and steps["ttl"] == "1: cannot be forwarded"
    assert steps["verdict"].endswith(f"ICMP time-exceeded sent to {pod1}")


def tshark_frames(path: Path) -> list[dict]:
    """Each frame of the pcap as tshark decodes it: interface, IP fields, raw bytes."""
    out = subprocess.run(["tshark", "-r", str(path), "-T", "json", "-x"], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    frames = []
    for item in json.loads(out.stdout):
        layers = item["_source"]["layers"]
        frame, ip = layers["frame"], layers.get("ip", {})
        frames.append({"interface": int(frame["frame.interface_id"]), "src": ip.get("ip.src"), "dst": ip.get("ip.dst"),
                       "udp_dport": layers.get("udp", {}).get("udp.dstport"),
                       "icmp_type": layers.get("icmp", {}).get("icmp.type"),
                       "raw": bytes.fromhex(layers["frame_raw"][0])})
    return frames


def test_trace_pcap_holds_the_inner_echo_and_its_outer_datagram_read_back_by_tshark(lab: Lab, tmp_path: Path):
    require(shutil.which("tshark") is not None, "needs tshark (./dev setup installs it)")
    with Cluster(lab, tmp_path) as cluster:
        cluster.put_config(CONFIG)
        for i in (1, 2):
            cluster.start_node(i)
        for i in (1, 2):
            cluster.wait_ready(i)
        pods = {i: cluster.add_pod(i) for i in (1, 2)}
        node1 = cluster.nodes[1]
        pcap = tmp_path / "trace.pcapng"
        trace = Trace(node1.node, node1.control_socket, tmp_path, "--host", str(pods[2].address), "--pcap", str(pcap))
        assert ping(pods[1], str(pods[2].address)).returncode == 0
        sent, received = tcp_transfer(pods[1], pods[2], str(pods[2].address), 2 * 1024 * 1024)
        assert sent == received
        summary = trace.interrupt()
        assert "echo request" in summary and re.search(r":5201 tcp, \d+ bytes", summary)
    frames = tshark_frames(pcap)
    inner = [f for f in frames if f["interface"] == 0]
    outer = [f for f in frames if f["interface"] == 1]
    [echo] = [f for f in inner if f["icmp_type"] == "8" and f["dst"] == str(pods[2].address)]
    carriers = [f for f in outer if f["udp_dport"] == "8285" and f["raw"][28 + 12:28 + 20] == echo["raw"][12:20]
                and f["raw"][28 + 20:] == echo["raw"][20:]]
    assert len(carriers) == 1, [f["raw"][:48].hex() for f in outer[:5]]
    datagram = carriers[0]["raw"]
    assert (datagram[12:16], datagram[16:20]) == (socket.inet_aton("198.18.0.1"), socket.inet_aton("198.18.0.2"))
    payload = datagram[28:]
    # the inner packet as on flannel0, and as carried: the same bytes but the TTL the daemon took (and its checksum)
    assert payload[:8] == echo["raw"][:8] and payload[8] == echo["raw"][8] - 1 and payload[12:] == echo["raw"][12:]
    assert any(f["src"] == "198.18.0.1" and f["udp_dport"] == "8285" and len(f["raw"]) > 1000 for f in outer)  # TCP data


def test_a_client_that_stops_reading_slows_nothing_and_is_told_what_it_lost(lab: Lab, tmp_path: Path):
    sockets = {i: tmp_path / f"ctl-{i}.sock" for i in (1, 2)}
    pair = Pair(lab, tmp_path, {1: "fast", 2: "fast"}, {i: ["--control-socket", str(sockets[i])] for i in (1, 2)})
    stuck = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    stuck.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    stuck.connect(str(sockets[1]))
    try:
        stuck.sendall(b"GET /trace?bytes=1 HTTP/1.1\r\nHost: t\r\n\r\n")  # every packet, with its bytes; then never read
        watcher = Trace(pair.nodes[1], sockets[1], tmp_path, "--host", str(pair.pods[2].address), "--proto", "icmp",
                        "--count", "1", name="watcher")  # a second client at the same time
        pair.transfer(1, 2, 20 * 1024 * 1024)
        assert ping(pair.pods[1], str(pair.pods[2].address)).returncode == 0
        assert "echo request" in watcher.wait()
        stuck.settimeout(10)
        seen, deadline = b"", time.monotonic() + 30
        while b'"dropped":' not in seen and time.monotonic() < deadline:  # now read: the lost events are reported
            chunk = stuck.recv(1 << 20)
            assert chunk, "the daemon closed the stuck client's stream"
            seen = seen[-100:] + chunk
        dropped = int(re.search(rb'"dropped":(\d+)', seen)[1])
        assert dropped > 0
    finally:
        stuck.close()
    counters = pair.stop()
    assert counters[1]["sent_packets"] > 10_000 and counters[2]["delivered_packets"] > 10_000
