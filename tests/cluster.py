"""Helpers for the namespace tests: start udpflannel in a node, wait for things, run ping and TCP."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

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
