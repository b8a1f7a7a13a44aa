"""Helpers for the namespace tests: start udpflannel in a node, wait for things, run ping and TCP."""

from __future__ import annotations

import itertools
import os
import re
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from udpflannel.lab.cluster import log_lines
from udpflannel.lab.netns import Netns, Node

TOOLS = Path(__file__).parent / "tools"


def wait_for(predicate, *, timeout: float, interval: float = 0.05, what: str = "condition"):
    """Poll ``predicate`` until it returns a truthy value; fail with ``what`` after ``timeout`` s."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(interval)


def unused_subnet(etcd, prefix: str) -> str:
    """A /24 of 10.5.0.0/16 that no lease in ``etcd`` holds now, from the top down: a test that writes a
    lease of its own must not overwrite a node's (nodes draw their subnets at random)."""
    keys = etcd.ctl("get", "--prefix", f"{prefix}/subnets/", "--keys-only").split()
    held = {key.rsplit("/", 1)[-1].replace("-", "/") for key in keys}
    return next(s for s in (f"10.5.{i}.0/24" for i in range(250, 0, -1)) if s not in held)


def logged_at(cluster, index: int, message: str, *, timeout: float = 10, since: float = 0.0) -> float:
    """The wall-clock time node ``index``'s daemon logged ``message`` (its own timestamp, not when a
    test poll noticed), at or after ``since``, waiting for the line up to ``timeout`` seconds."""
    def find() -> float | None:
        return next((t for t, _, _, text in log_lines(cluster.nodes[index].log())
                     if t >= since and text.startswith(message)), None)
    return wait_for(find, timeout=timeout, what=f"node {index} logging {message!r}")


STOP_BUDGET = 2.0  # seconds from SIGTERM to exit (issue 17 item 6)


def flannel_rules(node: Netns) -> list[str]:
    """The node's iptables rules flanneld's comments mark (masquerade and forward)."""
    return [line for line in node.run("iptables-save").stdout.splitlines() if "flanneld" in line]


def sigterm_cleanly(cluster, index: int) -> float:
    """SIGTERM node ``index``'s daemon and check the exit: status 0 within STOP_BUDGET, no task left
    running, its rules left in place exactly once (for a restart, as flanneld leaves them) and naming no
    subnet but the network and its own. Returns the seconds it took."""
    n = cluster.nodes[index]
    env = n.env() if n.subnet_file.exists() else {}
    rules = flannel_rules(n.node)
    t0 = time.monotonic()
    code = cluster.stop_node(index, signal.SIGTERM, timeout=10)
    elapsed = time.monotonic() - t0
    log = n.log()
    assert code == 0, log[-3000:]
    assert elapsed < STOP_BUDGET, f"node {index} took {elapsed:.2f} s to stop"
    assert "stopped: no task left running" in log and "task(s) still running" not in log, log[-3000:]
    after = flannel_rules(n.node)
    assert after == rules and len(set(after)) == len(after), (rules, after)
    own = {env["FLANNEL_SUBNET"].replace(".1/", ".0/")} if env else set()
    named = set(re.findall(r"\d+\.\d+\.\d+\.\d+/\d+", "\n".join(after))) - {env.get("FLANNEL_NETWORK"), "224.0.0.0/4"}
    assert named <= own, f"rules for subnets that are not this node's: {named - own}"
    return elapsed


def start_udpflannel(node: Node, args: list[str], log_dir: Path, *, ready_file: Path | None = None) -> subprocess.Popen:
    """Run ``python -m udpflannel ARGS`` inside ``node``; wait until ``ready_file`` exists."""
    log_path = log_dir / f"{node.name}.log"
    log = open(log_path, "ab")
    proc = node.popen([sys.executable, "-m", "udpflannel", *args], stdout=log, stderr=subprocess.STDOUT,
                      env={**os.environ, "PYTHONUNBUFFERED": "1"})
    log.close()
    proc.log_path = log_path  # type: ignore[attr-defined]
    if ready_file is not None:
        def ready() -> bool:
            if proc.poll() is not None:
                raise AssertionError(f"udpflannel in {node.name} exited {proc.returncode}:\n{log_path.read_text()}")
            return ready_file.exists()
        wait_for(ready, timeout=20, what=f"{ready_file} from udpflannel in {node.name}")
    return proc


def ping(ns: Netns, target: str, *, count: int = 1, ttl: int | None = None, timeout: float = 2) -> subprocess.CompletedProcess:
    args = ["ping", "-n", "-c", str(count), "-W", str(timeout), "-i", "0.2"]
    if ttl is not None:
        args += ["-t", str(ttl)]
    return ns.run(*args, target, check=False, timeout=count * (timeout + 1) + 5)


def tcp_transfer(sender: Netns, receiver: Netns, receiver_ip: str, nbytes: int, port: int = 5201) -> tuple[str, str]:
    """Move ``nbytes`` sender → receiver over TCP; return (sha256 sent, sha256 received)."""
    recv = receiver.popen([sys.executable, str(TOOLS / "tcpxfer.py"), "recv", str(port)], stdout=subprocess.PIPE, text=True)
    assert recv.stdout is not None
    assert recv.stdout.readline().strip() == "listening"
    sent = sender.run(sys.executable, str(TOOLS / "tcpxfer.py"), "send", receiver_ip, str(port), str(nbytes), timeout=120)
    out, _ = recv.communicate(timeout=60)
    sent_hash, sent_len = sent.stdout.split()
    recv_hash, recv_len = out.split()
    assert int(sent_len) == int(recv_len) == nbytes, (sent_len, recv_len)
    return sent_hash, recv_hash


class Pinger:
    """``ping`` in the background at a short interval, each reply time-stamped (``-D``), so the longest
    gap in the replies can be read afterwards (how long traffic stopped during a restart, say)."""

    REPLY = re.compile(r"^\[(\d+\.\d+)\] \d+ bytes from .*icmp_seq=(\d+)")

    def __init__(self, src: Netns, dst_ip: str, *, interval: float = 0.01) -> None:
        self.interval = interval
        self._out = tempfile.TemporaryFile("w+")  # not a pipe: nobody reads one while ping runs, and a full one stops it
        self.proc = src.popen(["ping", "-D", "-n", "-i", str(interval), "-W", "1", dst_ip],
                              stdout=self._out, stderr=subprocess.STDOUT, text=True)
        self.replies: list[tuple[float, int]] = []  # (wall-clock time, icmp_seq)
        self.output = ""

    def replies_so_far(self) -> int:
        """Replies in the output up to now (the process keeps running)."""
        with open(f"/proc/self/fd/{self._out.fileno()}") as out:  # its own offset: ping's stays where it is
            return sum(1 for line in out if self.REPLY.match(line))

    def stop(self) -> Pinger:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
        self.proc.wait(timeout=10)
        self._out.seek(0)
        self.output = self._out.read()
        self._out.close()
        self.replies = [(float(m[1]), int(m[2])) for m in map(self.REPLY.match, self.output.splitlines()) if m]
        return self

    @property
    def lost(self) -> int:
        """Requests that got no reply though a later one did: the gaps in the answered sequence numbers
        (from 1). Those sent after the last reply are not counted: SIGINT comes at any moment, and the
        last request may still be in flight then (a test that wants replies to the end checks the
        last reply's time). With no reply at all, every request sent."""
        seqs = {seq for _, seq in self.replies}
        if seqs:
            return max(seqs) - len(seqs)
        sent = re.search(r"(\d+) packets transmitted", self.output)
        return int(sent[1]) if sent else -1

    def longest_gap(self) -> tuple[float, float]:
        """(seconds between two consecutive replies, wall-clock time the gap began)."""
        stamps = [t for t, _ in self.replies]
        if len(stamps) < 2:
            raise AssertionError(f"too few replies to measure a gap:\n{self.output[-2000:]}")
        return max((b - a, a) for a, b in itertools.pairwise(stamps))


class BackgroundTransfer:
    """A TCP transfer (tools/tcpxfer.py) that runs while the test does other things; ``finish()``
    returns the SHA-256 each end saw (a reset ends either side with an error, which fails here)."""

    def __init__(self, sender: Netns, receiver: Netns, receiver_ip: str, nbytes: int, *, rate: float,
                 port: int = 5202, seed: int = 2026) -> None:
        self.nbytes = nbytes
        self.recv = receiver.popen([sys.executable, str(TOOLS / "tcpxfer.py"), "recv", str(port)],
                                   stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        assert self.recv.stdout is not None and self.recv.stdout.readline().strip() == "listening"
        self.send = sender.popen([sys.executable, str(TOOLS / "tcpxfer.py"), "send", receiver_ip, str(port),
                                  str(nbytes), str(rate), str(seed)], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                 text=True)

    def finish(self, timeout: float = 120) -> tuple[str, str]:
        sent, _ = self.send.communicate(timeout=timeout)
        received, _ = self.recv.communicate(timeout=60)
        assert self.send.returncode == 0, f"sender failed:\n{sent}"
        assert self.recv.returncode == 0, f"receiver failed:\n{received}"
        (sent_hash, sent_len), (recv_hash, recv_len) = sent.split(), received.split()
        assert int(sent_len) == int(recv_len) == self.nbytes, (sent_len, recv_len)
        return sent_hash, recv_hash


def parallel_transfers(moves: list[tuple[Netns, Netns, str]], nbytes: int, *, port: int = 5300) -> None:
    """TCP transfers all at once, one per (sender, receiver, receiver IP), each ``nbytes`` of its own
    bytes (its own seed) on its own port, unpaced; fails unless every one arrives with its SHA-256."""
    transfers = [BackgroundTransfer(s, r, ip, nbytes, rate=0.0, port=port + k, seed=k) for k, (s, r, ip) in enumerate(moves)]
    results = [t.finish() for t in transfers]
    bad = [k for k, (sent, received) in enumerate(results) if sent != received]
    assert not bad, f"SHA-256 differs for transfers {bad} of {len(moves)}"
    assert len({sent for sent, _ in results}) == len(moves)  # each its own bytes
