"""A path narrower than the interface: udpflannel.pmtu's table, then end to end — node 1 → router →
a 1400-byte link → node 2.

The router is the lab's hub (``Lab.add_routed_node``): node 1 sits on its bridge, node 2 behind its
interface ``r2`` with MTU 1400, so a DF packet larger than 1400 bytes gets ICMP frag-needed back, as
from any router. A pod behind ``cni0`` on each node. udpflannel (``static``) on both nodes, on each
path, must move 30 MB intact without a single fragment anywhere — it learns the path MTU, cuts or
refuses what does not fit, and tells the sending pod, whose route cache then holds MTU 1372 — and
must widen again once the path does. Kernel VXLAN as flannel configures it (outer DF unset) runs in
the same topology as the reference: there the router fragments every full-size datagram.
"""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import time
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from benchmarks.rows import KernelVxlan
from benchmarks.topology import Topology, add_pods
from tests.cluster import TOOLS, ping, start_udpflannel, tcp_transfer, wait_for
from tests.conftest import require
from tests.test_fastpath_e2e import Pair
from udpflannel.httpapi import get
from udpflannel.lab.netns import Lab, Netns
from udpflannel.pmtu import RECHECK_MAX, RECHECK_MIN, SMALLEST_INNER, PathMtus, inner_limit, recheck_interval

NETWORK = "10.5.0.0/16"
SUBNETS = {1: "10.5.1.0/24", 2: "10.5.2.0/24"}
NARROW = 1400  # the router's link towards node 2
INNER = NARROW - 28  # the largest inner packet that fits it: the frag-needed MTU the pod must learn
BIG = 30 * 1024 * 1024
FRAGMENT_COUNTERS = ("IpFragCreates", "IpFragOKs", "IpReasmReqds")
TIMES: dict[str, float] = {}  # transfer seconds per dataplane, printed for the record (no assertions)


# -- udpflannel.pmtu (sans-IO) ---------------------------------------------------------------------------


@given(st.floats(0, 1e7))
def test_recheck_interval_is_half_the_kernels_expiry_within_bounds(mtu_expires: float) -> None:
    interval = recheck_interval(mtu_expires)
    assert RECHECK_MIN <= interval <= RECHECK_MAX
    assert interval == mtu_expires / 2 or interval in (RECHECK_MIN, RECHECK_MAX)
    assert recheck_interval(600) == 60 and recheck_interval(2) == 1  # the kernel's default; the test's below


@given(st.integers(0, 70000), st.integers(68, 65507))
def test_inner_limit_is_the_path_mtu_less_28_only_below_the_tun_mtu(path_mtu: int, tun_mtu: int) -> None:
    fits = max(SMALLEST_INNER, path_mtu - 28)  # no path is believed narrower than IPv4's 68 bytes
    assert inner_limit(path_mtu, tun_mtu) == (None if fits >= tun_mtu else fits)


def test_the_table_narrows_and_widens_with_the_kernels_readings() -> None:
    table = PathMtus(tun_mtu=1472)
    hop, other = ("198.18.2.1", 8285), ("198.18.3.1", 8285)
    assert table.learn(hop, 1500) is None and table.limits == {}
    assert table.learn(hop, 1400) == 1372 and table.learn(other, 1280) == 1252
    assert table.limits == {hop: 1372, other: 1252}
    assert table.learn(hop, 1500) is None and table.limits == {other: 1252}
    table.forget(other)
    assert table.limits == {}


# -- end to end -----------------------------------------------------------------------------------------


class Routed(Pair):
    """The routed lab: ``hub`` (the router), ``nodes``, and once a ``start_...`` has run, ``pods`` (and
    the daemons: ``log`` and ``stop`` as for a ``Pair``)."""

    def __init__(self, lab: Lab, tmp: Path, *, mtu_expires: int | None = None) -> None:  # (not Pair's: its own lab)
        self.lab, self.tmp = lab, tmp
        self.nodes = {1: lab.add_node(1), 2: lab.add_routed_node(2, route_mtu=NARROW)}
        assert lab.hub is not None
        self.hub: Netns = lab.hub
        if mtu_expires is not None:  # before the daemons start: they read it
            self.nodes[1].sysctl("net.ipv4.route.mtu_expires", str(mtu_expires))
        self.daemons: dict[int, subprocess.Popen] = {}
        self.pods: dict = {}

    def start_udpflannel(self, mode: str) -> None:
        for i, node in self.nodes.items():
            other = self.nodes[3 - i]
            env_file = self.tmp / f"subnet-{i}.env"
            args = ["static", "--iface", "eth0", "--subnet", SUBNETS[i], "--network", NETWORK,
                    "--route", f"{SUBNETS[3 - i]}={other.address}", "--subnet-file", str(env_file),
                    "--control-socket", str(self.control(i))]
            if mode == "slow":
                args.append("--no-fast-path")
            self.daemons[i] = start_udpflannel(node, args, self.tmp, ready_file=env_file)
        mtu = int(dict(line.split("=", 1) for line in (self.tmp / "subnet-1.env").read_text().split())["FLANNEL_MTU"])
        self.pods = {i: self.lab.add_pod(self.nodes[i], SUBNETS[i].replace(".0/", ".1/"), mtu=mtu) for i in (1, 2)}

    def start_vxlan(self) -> None:
        topo = Topology(lab=self.lab, nodes=self.nodes, workdir=self.tmp)
        vxlan = KernelVxlan()
        vxlan.setup(topo)
        add_pods(topo, vxlan.pod_mtu)
        self.pods = topo.pods

    def control(self, i: int) -> Path:
        return self.tmp / f"ctl-{i}.sock"

    def status(self, i: int) -> dict:
        code, body = asyncio.run(get("/status", unix_socket=str(self.control(i))))
        assert code == 200, body
        return json.loads(body)

    def everyone(self) -> dict[str, Netns]:
        return {"router": self.hub, "node 1": self.nodes[1], "node 2": self.nodes[2], "pod 1": self.pods[1],
                "pod 2": self.pods[2]}

    def fragment_counters(self) -> dict[str, dict[str, int]]:
        return {name: {k: ns.snmp()[k] for k in FRAGMENT_COUNTERS} for name, ns in self.everyone().items()}

    def timed_transfer(self, nbytes: int, what: str | None = None) -> float:
        """pod 1 → pod 2, SHA-256 compared; the seconds it took (recorded under ``what``)."""
        started = time.monotonic()
        sent, received = tcp_transfer(self.pods[1], self.pods[2], str(self.pods[2].address), nbytes)
        elapsed = time.monotonic() - started
        assert sent == received, f"SHA-256 differs after {nbytes} bytes pod 1 -> pod 2"
        if what is not None:
            TIMES[what] = round(elapsed, 2)
            print(f"\n{what}: {nbytes >> 20} MB across the {NARROW}-byte path in {elapsed:.2f} s; so far {TIMES}")
        return elapsed


def fragmented(before: dict, after: dict) -> dict[str, dict[str, int]]:
    return {name: {k: after[name][k] - before[name][k] for k in FRAGMENT_COUNTERS
                   if after[name][k] != before[name][k]} for name in before if after[name] != before[name]}


@pytest.mark.parametrize("mode", ["fast", "slow"])
def test_30mb_across_a_narrower_path_arrive_unfragmented_and_the_pod_learns_its_mtu(lab: Lab, tmp_path: Path, mode: str):
    """The defect: the fast path black-holed here (the kernel knew MTU 1400 for the peer, every GSO
    send failed), and ``--no-fast-path`` had the kernel fragment every datagram."""
    routed = Routed(lab, tmp_path)
    routed.start_udpflannel(mode)
    assert ping(routed.pods[1], str(routed.pods[2].address)).returncode == 0
    before_icmp = routed.hub.snmp()["IcmpOutDestUnreachs"]
    before = routed.fragment_counters()
    routed.timed_transfer(BIG, f"udpflannel {mode}")
    assert fragmented(before, routed.fragment_counters()) == {}
    assert routed.hub.snmp()["IcmpOutDestUnreachs"] > before_icmp  # the router did say frag-needed
    route = routed.pods[1].ip("route", "get", str(routed.pods[2].address)).stdout
    assert f"mtu {INNER}" in route, route
    assert f"path MTU to {routed.nodes[2].address} is {NARROW}" in routed.log(1)
    counters = routed.stop()[1]
    print(f"{mode}: router frag-needed {routed.hub.snmp()['IcmpOutDestUnreachs'] - before_icmp}; node 1: "
          + ", ".join(f"{k} {counters[k]}" for k in ("pmtu_cuts", "pmtu_refits", "icmp_sent", "send_errors"))
          + f", too_big {counters['drops']['tun_to_udp']['too_big']}")
    assert counters["send_errors"] == 0, counters
    assert counters["icmp_sent"] > 0  # frag-needed to pod 1
    if mode == "fast":
        assert counters["pmtu_cuts"] > 0  # super-packets (or refused datagrams) cut to fit
    else:
        assert counters["drops"]["tun_to_udp"]["too_big"] > 0  # refused with frag-needed, as a router does
    assert counters["fragmented_packets"] == 0


def test_kernel_vxlan_as_flannel_sets_it_up_has_the_router_fragment(lab: Lab, tmp_path: Path):
    """The reference, in the same topology: flannel's VXLAN leaves the outer DF bit unset, so the
    transfer completes because the router fragments every full-size datagram (and node 2
    reassembles them); the pods never hear of the narrower path."""
    routed = Routed(lab, tmp_path)
    routed.start_vxlan()
    wait_for(lambda: ping(routed.pods[1], str(routed.pods[2].address)).returncode == 0, timeout=10,
             what="pod 2 reachable over VXLAN")
    before = routed.fragment_counters()
    routed.timed_transfer(BIG, "kernel vxlan")
    changed = fragmented(before, routed.fragment_counters())
    print(f"\nkernel vxlan: fragment counters that moved: {changed}")
    assert changed["router"]["IpFragCreates"] > 0 and changed["node 2"]["IpReasmReqds"] > 0, changed
    assert "mtu" not in routed.pods[1].ip("route", "get", str(routed.pods[2].address)).stdout


@pytest.mark.parametrize("mode", ["fast", "slow"])
def test_once_the_path_widens_again_full_size_datagrams_flow(lab: Lab, tmp_path: Path, mode: str):
    """Nothing pins the path low: the router's link goes back to 1500, node 1's kernel forgets the
    learnt MTU (``mtu_expires`` lowered to 2 s in node 1's namespace), udpflannel reads the kernel's
    value again and widens its own — and the next transfer's datagrams are larger than the narrow
    path could have carried."""
    require(Path("/proc/sys/net/ipv4/route/mtu_expires").exists(), "needs net.ipv4.route.mtu_expires")
    routed = Routed(lab, tmp_path, mtu_expires=2)
    per_namespace = routed.nodes[1].run("cat", "/proc/sys/net/ipv4/route/mtu_expires").stdout.strip() == "2"
    require(per_namespace, "net.ipv4.route.mtu_expires is not a per-namespace setting on this kernel")
    routed.start_udpflannel(mode)
    routed.timed_transfer(5 * 1024 * 1024)
    assert f"path MTU to {routed.nodes[2].address} is {NARROW}" in routed.log(1)

    routed.hub.ip("link", "set", "r2", "mtu", "1500")
    widened = time.monotonic()
    wait_for(lambda: routed.status(1)["peers"][0]["path_mtu"] is None, timeout=10,
             what="udpflannel on node 1 to widen the path again")
    print(f"\n{mode}: path widened in udpflannel {time.monotonic() - widened:.1f} s after the link did")
    assert f"path MTU to {routed.nodes[2].address} is back to 1500" in routed.log(1)

    routed.pods[1].ip("route", "flush", "cache")  # the pod's own learnt 1372 (600 s in its namespace)
    before1, before2 = routed.status(1)["counters"], routed.status(2)["counters"]
    before_icmp = routed.hub.snmp()["IcmpOutDestUnreachs"]
    routed.timed_transfer(10 * 1024 * 1024)
    after1, after2 = routed.status(1)["counters"], routed.status(2)["counters"]
    datagrams = after2["udp_packets"] - before2["udp_packets"]
    mean = (after2["udp_bytes"] - before2["udp_bytes"]) / datagrams
    assert mean > INNER, f"node 2 received {datagrams} datagrams of {mean:.0f} bytes on average"
    assert after1["pmtu_cuts"] == before1["pmtu_cuts"]
    assert routed.hub.snmp()["IcmpOutDestUnreachs"] == before_icmp


UDP_WITHOUT_DF = """
import socket, sys
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.setsockopt(socket.IPPROTO_IP, 10, 0)  # IP_MTU_DISCOVER = IP_PMTUDISC_DONT: no DF, no path-MTU discovery
for i in range(int(sys.argv[3])):
    s.sendto(bytes([i]) * int(sys.argv[2]), (sys.argv[1], 7000))
"""


@pytest.mark.parametrize("mode", ["fast", "slow"])
def test_frag_needed_reaches_a_pinging_pod_and_packets_without_df_are_fragmented_for_it(lab: Lab, tmp_path: Path,
                                                                                        mode: str):
    """Not TCP, so nothing to cut: a ping with DF too big for the path hears "frag needed, mtu 1372" from
    node 1's flannel0 address; UDP datagrams without DF (a sender that does no path-MTU discovery) are
    fragmented by udpflannel — not by any kernel on the way — and pod 2 gets every one of them whole."""
    routed = Routed(lab, tmp_path)
    routed.start_udpflannel(mode)
    pod1, pod2 = routed.pods[1], routed.pods[2]
    target = str(pod2.address)
    # the first one teaches node 1's kernel (the router answers it); then udpflannel answers
    result = pod1.run("ping", "-n", "-M", "do", "-s", "1400", "-c", "3", "-i", "0.3", "-W", "1", target, check=False)
    assert f"From {SUBNETS[1].split('/')[0]} icmp_seq=" in result.stdout and f"mtu = {INNER}" in result.stdout, result.stdout
    pod1.ip("route", "flush", "cache")  # pod 1 learnt 1372 from it: let it send full size again
    count, size = 20, 1400  # 1428-byte packets: larger than the 1372 that fit
    receiver = pod2.popen([sys.executable, str(TOOLS / "udpcount.py"), "7000", "3"], stdout=subprocess.PIPE, text=True)
    assert receiver.stdout is not None and receiver.stdout.readline().strip() == "listening"
    before = routed.fragment_counters()
    pod1.run(sys.executable, "-c", UDP_WITHOUT_DF, target, str(size), str(count))
    out, _ = receiver.communicate(timeout=30)
    assert out.split() == ["received", str(count)]
    moved = fragmented(before, routed.fragment_counters())
    assert moved == {"pod 2": {"IpReasmReqds": 2 * count}}, moved  # reassembled by the pod, created by no kernel
    counters = routed.stop()[1]
    assert counters["fragmented_packets"] == count and counters["send_errors"] == 0
