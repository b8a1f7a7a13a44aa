"""``udpflannel demo``: a local multi-node cluster on an embedded etcd, narrated.

Builds namespaces (a hub with etcd on the underlay bridge, N nodes, one pod per node), stores the
network config, starts one daemon per node with flanneld's flags, then shows: the lease records in
etcd, subnet.env, a ping between every pair of pods, ICMP errors from the overlay, ``udpflannel
status``, and last one ping followed with ``udpflannel trace`` (and tcpdump on flannel0 and eth0),
written to a pcap that stays behind. Everything else is removed at the end (or on Ctrl-C); ``--keep``
leaves it running until Ctrl-C so you can explore with ``ip netns exec``. Without ``--keep`` it asks
nothing and ends by itself (exit 0 once every pair answered).
"""

from __future__ import annotations

import argparse
import itertools
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from udpflannel.lab.cluster import PREFIX, Cluster, ClusterNode
from udpflannel.lab.netns import Lab

CONFIG = '{"Network": "10.5.0.0/16", "Backend": {"Type": "udp", "Port": 8285}}'
TRACE_TIMEOUT = 20.0  # seconds for the traced ping's two packets (and tcpdump's) to show


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
            all_answered = run_demo(lab, cluster, args)
    except KeyboardInterrupt:
        say("\ninterrupted: everything the demo created has been removed")
        return 130
    say(f"\nAll namespaces removed. Logs, subnet.env files and ping.pcapng are in {workdir}")
    if not all_answered:
        say("Some pods did not answer: the daemons' logs are in the directory above.")
    return 0 if all_answered else 1


def run_demo(lab: Lab, cluster: Cluster, args: argparse.Namespace) -> bool:
    """The demo's script, step by step as the user reads it on the terminal (long as a script is).
    True if every pair of pods answered."""
    step(f"etcd is running in namespace {cluster.hub.name} at {cluster.endpoint} (underlay bridge br0)")
    cluster.put_config(CONFIG)
    say(f"etcdctl put {PREFIX}/config '{CONFIG}'")

    step(f"starting udpflannel on {args.nodes} nodes")
    for i in range(1, args.nodes + 1):
        cluster.start_node(i)
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
    first, second = cluster.nodes[1], cluster.nodes[2]
    assert first.pod is not None and second.pod is not None

    step("ICMP from the overlay: an unleased address, and a TTL that runs out")
    for args_ in (["10.5.0.77"], ["-t", "2", str(second.pod.address)]):
        result = first.pod.run("ping", "-n", "-c", "1", "-W", "2", *args_, check=False)
        say(next((ln for ln in result.stdout.splitlines() if ln.startswith("From")), "(no ICMP)"))

    step("udpflannel status on node 1")
    status = first.node.run(sys.executable, "-m", "udpflannel", "status", "--control-socket", str(first.control_socket), check=False)
    say(status.stdout.rstrip() or status.stderr)

    trace_one_ping(first, second, cluster.workdir)

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
    return ok == len(pairs)


def trace_one_ping(first: ClusterNode, second: ClusterNode, workdir: Path) -> None:
    """``udpflannel trace`` on node 1 while pod 1 pings pod 2 once, with tcpdump on flannel0 and eth0
    beside it: the same packet three ways, and a pcap left behind to open."""
    assert first.pod is not None and second.pod is not None
    dst = str(second.pod.address)
    pcap = workdir / "ping.pcapng"
    step(f"one ping, traced: udpflannel trace on node 1 while pod 1 pings pod 2 ({dst}) once")
    command = [sys.executable, "-m", "udpflannel", "trace", "--control-socket", str(first.control_socket),
               "--host", dst, "--proto", "icmp", "--count", "2", "--seconds", str(TRACE_TIMEOUT), "--pcap", str(pcap)]
    say(f"$ udpflannel trace --control-socket {first.control_socket} --host {dst} --proto icmp --count 2 --pcap {pcap}")
    watchers = [Watcher(first.node, command, "tracing")]
    if shutil.which("tcpdump"):
        watchers += [Watcher(first.node, ["tcpdump", "-l", "-n", "-c", "2", "-i", tun, *expr], "listening")
                     for tun, expr in (("flannel0", ["icmp"]), ("eth0", ["udp", "port", "8285"]))]
    try:
        for w in watchers:
            w.wait_ready(TRACE_TIMEOUT)
        first.pod.run("ping", "-n", "-c", "1", "-W", "2", dst, check=False)
        outputs = [w.finish(TRACE_TIMEOUT) for w in watchers]
    finally:
        for w in watchers:
            w.stop()
    say(outputs[0].rstrip() or "(nothing traced)")
    if len(outputs) == 3:
        for title, text in (("tcpdump -n -i flannel0 icmp (the inner packets, on node 1's TUN)", outputs[1]),
                            ("tcpdump -n -i eth0 udp port 8285 (the same packets inside UDP, on node 1's underlay)",
                             outputs[2])):
            say(f"\n$ {title}")
            say("\n".join("  " + line for line in text.splitlines()) or "  (nothing captured)")
    say(f"""
The pcap keeps both sides: interface flannel0 (the inner packets) and the underlay (the UDP datagrams,
outer headers rebuilt by udpflannel trace). Open it with:
  wireshark {pcap}        (or: tshark -r {pcap}, tcpdump -n -r {pcap})
To watch the same packets live on a cluster kept with --keep, on node 1:
  sudo ip netns exec {first.node.name} tcpdump -n -i flannel0 icmp
  sudo ip netns exec {first.node.name} tcpdump -n -i eth0 udp port 8285
  sudo ip netns exec {first.node.name} {sys.executable} -m udpflannel trace --control-socket {first.control_socket}
A packet's journey, hop by hop, with the code that handles it: docs/how-it-works.md""")


class Watcher:
    """A command (``udpflannel trace``, tcpdump) running in a node while the demo pings; its output
    goes to a temporary file, and ``ready`` is what it prints (on either stream) once it listens."""

    def __init__(self, ns, command: list[str], ready: str) -> None:
        self.ready = ready
        self.out = tempfile.TemporaryFile("w+")
        self.proc = ns.popen(command, stdout=self.out, stderr=subprocess.STDOUT, text=True,
                             env={**os.environ, "PYTHONUNBUFFERED": "1"})

    def text(self) -> str:
        self.out.seek(0)
        return self.out.read()

    def wait_ready(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while self.ready not in self.text() and self.proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)

    def finish(self, timeout: float) -> str:
        """Its output, once it ends by itself (a count reached) or ``timeout`` s pass."""
        try:
            self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            pass
        return "\n".join(line for line in self.text().splitlines()
                         if not line.startswith(("tracing ", "listening on ", "tcpdump: verbose"))
                         and not line.endswith(("packets captured", "received by filter", "dropped by kernel")))

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
            try:
                self.proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=5)
        self.out.close()
