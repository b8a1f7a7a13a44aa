"""``udpflannel demo``: a local multi-node cluster on an embedded etcd, narrated.

Builds namespaces (a hub with etcd on the underlay bridge, N nodes, one pod per node), stores the
network config, starts one daemon per node with flanneld's flags, then shows: the lease records in
etcd, subnet.env, a ping between every pair of pods, one packet traced through both daemons, and
``udpflannel status``. Everything is removed at the end (or on Ctrl-C); ``--keep`` leaves it running
until Ctrl-C so you can explore with ``ip netns exec``.
"""

from __future__ import annotations

import argparse
import itertools
import os
import signal
import sys
import tempfile
import time
from pathlib import Path

from udpflannel.lab.cluster import PREFIX, Cluster
from udpflannel.lab.netns import Lab

CONFIG = '{"Network": "10.5.0.0/16", "Backend": {"Type": "udp", "Port": 8285}}'


def say(text: str = "") -> None:
    print(text, flush=True)


def step(title: str) -> None:
    say(f"\n== {title}")


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="udpflannel demo", description=__doc__.split("\n\n")[0])
    p.add_argument("--nodes", type=int, default=3, help="how many nodes (2-20, default %(default)s)")
    p.add_argument("--keep", action="store_true", help="keep the cluster running until Ctrl-C")
    args = p.parse_args(argv)
    if not 2 <= args.nodes <= 20:
        p.error("--nodes must be between 2 and 20")
    if os.geteuid() != 0:
        say("udpflannel demo needs root (network namespaces, TUN devices): sudo ./dev demo")
        return 1
    signal.signal(signal.SIGTERM, lambda *_: (_ for _ in ()).throw(KeyboardInterrupt()))
    workdir = Path(tempfile.mkdtemp(prefix="udpflannel-demo-"))
    try:
        with Lab() as lab, Cluster(lab, workdir) as cluster:
            run_demo(lab, cluster, args)
    except KeyboardInterrupt:
        say("\ninterrupted: everything the demo created has been removed")
        return 130
    say(f"\nAll namespaces removed. Logs and subnet.env files are in {workdir}")
    return 0


def run_demo(lab: Lab, cluster: Cluster, args: argparse.Namespace) -> None:
    """The demo's script, step by step as the user reads it on the terminal (long as a script is)."""
    step(f"etcd is running in namespace {cluster.hub.name} at {cluster.endpoint} (underlay bridge br0)")
    cluster.put_config(CONFIG)
    say(f"etcdctl put {PREFIX}/config '{CONFIG}'")

    step(f"starting udpflannel on {args.nodes} nodes (node 1 with --trace)")
    for i in range(1, args.nodes + 1):
        cluster.start_node(i, *(["--trace"] if i == 1 else []))
    t0 = time.monotonic()
    for i in range(1, args.nodes + 1):
        env = cluster.wait_ready(i)
        n = cluster.nodes[i]
        say(f"node {i} ({n.node.name}, eth0 {n.node.address}): FLANNEL_SUBNET={env['FLANNEL_SUBNET']} FLANNEL_MTU={env['FLANNEL_MTU']}")
    say(f"all nodes ready in {time.monotonic() - t0:.1f} s")

    step("the lease records in etcd (byte-compatible with flanneld's)")
    for key, value in sorted(cluster.leases().items()):
        say(f"{key}  {value}")

    step("subnet.env on node 1")
    say(cluster.nodes[1].subnet_file.read_text().rstrip())

    step("a pod on every node, added by udpflannel-cni (bridge cni0 + host-local IPAM from subnet.env)")
    for i in cluster.nodes:
        pod = cluster.add_pod(i)
        say(f"pod {pod.name}: {pod.address}")

    step("ping between every pair of pods")
    ok = 0
    pairs = list(itertools.permutations(cluster.nodes, 2))
    for a, b in pairs:
        src, dst = cluster.nodes[a].pod, cluster.nodes[b].pod
        assert src is not None and dst is not None
        result = src.run("ping", "-n", "-c", "1", "-W", "2", str(dst.address), check=False)
        line = next((ln for ln in result.stdout.splitlines() if "bytes from" in ln), "no reply")
        ok += result.returncode == 0
        say(f"pod {a} -> pod {b}: {line}")
    say(f"{ok}/{len(pairs)} pairs answered")

    step("one packet, traced: pod 1 pings pod 2 once (node 1 runs with --trace)")
    first, second = cluster.nodes[1], cluster.nodes[2]
    mark = len(first.log())
    assert first.pod is not None and second.pod is not None
    first.pod.run("ping", "-n", "-c", "1", "-W", "2", str(second.pod.address), check=False)
    time.sleep(0.2)
    for line in first.log()[mark:].splitlines():
        if "udpflannel.trace" in line and (str(second.pod.address) in line or str(first.pod.address) in line):
            say("  " + line.split("udpflannel.trace: ", 1)[-1])
    say("(tun>udp: read from flannel0, TTL-1, sent as a bare IPv4 packet in one UDP datagram to the peer's :8285;"
        " udp>tun: the reply, checked, TTL-1, written into flannel0)")

    step("ICMP from the overlay: an unleased address, and a TTL that runs out")
    for args_ in (["10.5.0.77"], ["-t", "2", str(second.pod.address)]):
        result = first.pod.run("ping", "-n", "-c", "1", "-W", "2", *args_, check=False)
        say(next((ln for ln in result.stdout.splitlines() if ln.startswith("From")), "(no ICMP)"))

    step("udpflannel status on node 1")
    status = first.node.run(sys.executable, "-m", "udpflannel", "status", "--control-socket", str(first.control_socket), check=False)
    say(status.stdout.rstrip() or status.stderr)

    if args.keep:
        step("the cluster stays up; try for example:")
        say(f"  sudo ip netns exec {first.pod.name} ping {second.pod.address}")
        say(f"  sudo ip netns exec {first.node.name} {sys.executable} -m udpflannel status --control-socket {first.control_socket}")
        say(f"  sudo ip netns exec {first.node.name} curl -s localhost:8286/metrics")
        say("Ctrl-C removes everything.")
        try:
            while all(n.proc is not None and n.proc.poll() is None for n in cluster.nodes.values()):
                time.sleep(1)
        except KeyboardInterrupt:
            pass
