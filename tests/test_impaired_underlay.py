"""The dataplane on a bad wire: loss, reordering, duplication and corruption under a 200 MB TCP transfer.

The underlay between the two nodes is no bridge here but tools/impair.py, a userspace wire in a
namespace of its own that decides per frame (this kernel has no netem). Every frame on it is one
datagram, as on a real wire: the nodes checksum and segment in software (``tx off``) and their
receive side runs GRO in a threaded NAPI (``gro on``, ``threaded``), so the fast path still gets GRO
batches — now with gaps, duplicates and reordered rows in them. Each impairment, and all of them together, on the fast path,
the per-packet path and kernel VXLAN (the reference, measured in the same run): the bytes arrive
intact, no daemon errs, and the coalescer never merges across a gap (its property test is
``test_coalesce_never_merges_across_a_gap_a_reordering_or_a_duplicate`` in tests/test_gso.py).
"""

from __future__ import annotations

import json
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from benchmarks.rows import KernelVxlan
from benchmarks.topology import SUBNETS, Topology
from tests.cluster import TOOLS, start_udpflannel, tcp_transfer
from tests.conftest import require
from udpflannel.lab.netns import UNDERLAY, Lab, Node

NETWORK = "10.5.0.0/16"
BIG = 200 * 1024 * 1024
IMPAIRMENTS = {
    "loss-1%": ["loss=0.01"],
    "reorder-25%": ["reorder=0.25", "delay=0.001"],
    "duplicate-1%": ["duplicate=0.01"],
    "corrupt-0.1%": ["corrupt=0.001"],
    "all": ["loss=0.01", "reorder=0.25", "delay=0.001", "duplicate=0.01", "corrupt=0.001"],
}
PATHS = ("fast", "per-packet", "vxlan")
COUNTERS = re.compile(r"stopping; counters (\{.*\})")


def wired_nodes(lab: Lab, impairment: list[str], seed: int) -> tuple[dict[int, Node], subprocess.Popen]:
    """Two nodes whose eth0 meet in a ``wire`` namespace, bridged there by tools/impair.py."""
    wire = lab.add_netns("wire")
    nodes = {}
    for i in (1, 2):
        address = UNDERLAY.network_address + i
        node = lab.add_netns(f"n{i}", Node, address=address)
        wire.ip("link", "add", f"w{i}", "type", "veth", "peer", "name", "eth0", "netns", node.name)
        wire.ip("link", "set", f"w{i}", "up")
        node.ip("addr", "add", f"{address}/{UNDERLAY.prefixlen}", "dev", "eth0")
        node.ip("link", "set", "eth0", "up")
        # one datagram a frame (software checksums and segmentation), and GRO on receive: in a NAPI thread, so
        # frames queue up between polls as behind a real NIC's interrupt coalescing, and GRO has batches to make
        node.run("ethtool", "-K", "eth0", "tx", "off", "gro", "off")
        node.run("ethtool", "-K", "eth0", "gro", "on")
        node.run("sh", "-c", "echo 1 > /sys/class/net/eth0/threaded")
        node.sysctl("net.ipv4.ip_forward", "1")
        nodes[i] = node
    wire.run("ethtool", "-K", "w1", "gro", "off", "tx", "off")
    wire.run("ethtool", "-K", "w2", "gro", "off", "tx", "off")
    proc = wire.popen([sys.executable, str(TOOLS / "impair.py"), "w1", "w2", str(seed), *impairment],
                      stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    assert proc.stdout is not None and proc.stdout.readline().strip() == "ready"
    return nodes, proc


def wire_report(proc: subprocess.Popen) -> dict:
    proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=10)
    return json.loads(out.strip().splitlines()[-1])


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("impairment", IMPAIRMENTS)
def test_200mb_cross_a_bad_wire_intact_with_no_daemon_error(lab: Lab, tmp_path: Path, impairment: str, path: str):
    require(subprocess.run(["which", "ethtool"], capture_output=True).returncode == 0, "needs ethtool")
    nodes, wire = wired_nodes(lab, IMPAIRMENTS[impairment], seed=sorted(IMPAIRMENTS).index(impairment))
    daemons = {}
    if path == "vxlan":
        vxlan = KernelVxlan()
        vxlan.setup(Topology(lab=lab, nodes=nodes, workdir=tmp_path))
        mtu = vxlan.pod_mtu
    else:
        for i, node in nodes.items():
            env = tmp_path / f"subnet-{i}.env"
            args = ["static", "--iface", "eth0", "--subnet", str(SUBNETS[i]), "--network", NETWORK,
                    "--route", f"{SUBNETS[3 - i]}={nodes[3 - i].address}", "--subnet-file", str(env)]
            daemons[i] = start_udpflannel(node, [*args, *(["--no-fast-path"] if path == "per-packet" else [])],
                                          tmp_path, ready_file=env)
        mtu = 1472
    pods = {i: lab.add_pod(nodes[i], f"{SUBNETS[i].network_address + 1}/24", mtu=mtu) for i in (1, 2)}
    retrans_before = pods[1].snmp()["TcpRetransSegs"]
    t0 = time.monotonic()
    sent, received = tcp_transfer(pods[1], pods[2], str(pods[2].address), BIG)
    seconds = time.monotonic() - t0
    assert sent == received
    retransmitted = pods[1].snmp()["TcpRetransSegs"] - retrans_before
    done = wire_report(wire)
    assert done["frames"] > 100_000 and not any(k.startswith("send_") for k in done), json.dumps(done)
    counters = {}
    for i, proc in daemons.items():
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=10) == 0
        log = Path(proc.log_path).read_text()  # type: ignore[attr-defined]
        assert not re.search(r"^\S+ \S+ [EW] |Traceback", log, re.MULTILINE), log[-3000:]
        counters[i] = json.loads(COUNTERS.findall(log)[-1])
        assert counters[i]["tun_write_errors"] == 0 and counters[i]["send_errors"] == 0, counters[i]
    extra = ""
    if path == "fast":
        c1, c2 = counters[1], counters[2]
        assert c1["udp_gso_sends"] > 0 and c2["udp_gro_recvs"] > 0 and c2["tun_gso_writes"] > 0, (c1, c2)
        extra = (f", receiver: {c2['udp_gro_datagrams'] / c2['udp_gro_recvs']:.1f} datagrams per GRO batch, "
                 f"{c2['tun_gso_segments'] / c2['tun_gso_writes']:.1f} segments per TUN write, "
                 f"drops {json.dumps({k: v for k, v in c2['drops']['udp_to_tun'].items() if v})}")
    print(f"\nIMPAIRED {impairment:13} {path:10} {seconds:6.2f} s  {BIG * 8 / seconds / 1e9:5.2f} Gb/s  "
          f"{retransmitted:6d} retransmitted  wire {json.dumps(done)}{extra}")
