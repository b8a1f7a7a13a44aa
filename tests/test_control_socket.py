"""Two daemons on one host (two network namespaces, one control-socket path), as a new user would
try it (issue 17 item 7): the second is refused while the first runs, a stale socket is replaced, an
exiting daemon removes only its own socket, and a simultaneous start leaves one running, the other
refused (no EADDRINUSE).

No etcd is needed: the daemon serves its control socket before it reaches etcd, and waits for a
network config meanwhile (etcd's address on the hub answers nothing)."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from tests.cluster import wait_for
from udpflannel.httpapi import get
from udpflannel.lab.netns import HUB_ADDRESS, Lab

pytestmark = [pytest.mark.netns, pytest.mark.timeout(120)]


class Daemons:
    def __init__(self, lab: Lab, tmp: Path) -> None:
        self.lab, self.tmp = lab, tmp
        self.socket = tmp / "run" / "udpflannel.sock"  # the same path for both, as the default would be
        self.nodes = {i: lab.add_node(i) for i in (1, 2)}

    def start(self, index: int) -> subprocess.Popen:
        log = open(self.tmp / f"daemon{index}.log", "ab")
        proc = self.nodes[index].popen(
            [sys.executable, "-m", "udpflannel", f"--etcd-endpoints=http://{HUB_ADDRESS}:2379", "--iface=eth0",
             f"--subnet-file={self.tmp}/subnet{index}.env", f"--control-socket={self.socket}"],
            stdout=log, stderr=subprocess.STDOUT, env={**os.environ, "PYTHONUNBUFFERED": "1"})
        log.close()
        return proc

    def log(self, index: int) -> str:
        return (self.tmp / f"daemon{index}.log").read_text(errors="replace")

    def answers(self) -> bool:
        try:
            return asyncio.run(get("/healthz", unix_socket=str(self.socket), timeout=2))[0] == 200
        except OSError:
            return False

    def status_from(self, index: int) -> subprocess.CompletedProcess:
        """``udpflannel status`` as the user runs it on the node."""
        return self.nodes[index].run(sys.executable, "-m", "udpflannel", "status", f"--control-socket={self.socket}",
                                     check=False)

    def wait_serving(self, proc: subprocess.Popen, index: int) -> None:
        def serving() -> bool:
            assert proc.poll() is None, f"daemon {index} exited {proc.returncode}:\n{self.log(index)}"
            return self.answers()
        wait_for(serving, timeout=30, what=f"daemon {index} serving {self.socket}")


def stop(proc: subprocess.Popen, sig: int = signal.SIGTERM) -> int:
    os.killpg(proc.pid, sig)
    return proc.wait(timeout=10)


@pytest.fixture
def daemons(lab: Lab, tmp_path: Path) -> Daemons:
    return Daemons(lab, tmp_path)


def test_second_daemon_is_refused_while_the_first_runs_and_the_first_keeps_its_socket(daemons: Daemons):
    first = daemons.start(1)
    daemons.wait_serving(first, 1)
    identity = daemons.socket.stat().st_ino
    second = daemons.start(2)
    assert second.wait(timeout=30) == 1
    refusal = daemons.log(2)
    assert str(daemons.socket) in refusal and "--control-socket" in refusal and "running daemon" in refusal
    # the refused daemon removed nothing: the first one's socket is still there and answers
    assert daemons.socket.stat().st_ino == identity
    status = daemons.status_from(1)
    assert status.returncode == 0 and "no daemon answers" not in status.stderr, status.stderr
    assert stop(first) == 0
    assert not daemons.socket.exists(), "the first daemon removes its own socket on exit"
    assert "no daemon answers" in daemons.status_from(1).stderr


def test_a_stale_socket_left_by_a_killed_daemon_is_replaced(daemons: Daemons):
    first = daemons.start(1)
    daemons.wait_serving(first, 1)
    assert stop(first, signal.SIGKILL) == -signal.SIGKILL
    assert daemons.socket.exists() and not daemons.answers()  # stale: nothing listens
    second = daemons.start(2)
    daemons.wait_serving(second, 2)
    assert "removed the stale control socket" in daemons.log(2)
    assert stop(second) == 0
    assert not daemons.socket.exists()


def test_exiting_daemon_leaves_a_socket_that_is_not_its_own(daemons: Daemons):
    first = daemons.start(1)
    daemons.wait_serving(first, 1)
    daemons.socket.rename(daemons.socket.with_name("moved.sock"))  # moved away by hand
    second = daemons.start(2)
    daemons.wait_serving(second, 2)
    assert stop(first) == 0
    assert daemons.answers(), "the first daemon removed the second one's socket on exit"
    assert stop(second) == 0
    assert not daemons.socket.exists()


def test_two_daemons_started_at_the_same_moment_leave_one_serving_and_one_refused(daemons: Daemons):
    procs = {1: daemons.start(1), 2: daemons.start(2)}
    loser = wait_for(lambda: next((i for i, p in procs.items() if p.poll() is not None), None), timeout=30,
                     what="one of the two daemons to give up")
    winner = 3 - loser
    assert procs[loser].returncode == 1, daemons.log(loser)
    assert "running daemon" in daemons.log(loser) and "--control-socket" in daemons.log(loser)
    daemons.wait_serving(procs[winner], winner)
    assert all("Address already in use" not in daemons.log(i) for i in procs)
    assert stop(procs[winner]) == 0
    assert not daemons.socket.exists()
