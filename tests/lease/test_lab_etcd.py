"""udpflannel.lab.etcd: the lab etcd keeps its data across a restart and never outlives its owner."""

from __future__ import annotations

import os
import time

import pytest

from udpflannel.lab.etcd import EtcdServer

pytestmark = [pytest.mark.etcd, pytest.mark.timeout(60)]


def alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split()[2] != "Z"
    except FileNotFoundError:
        return False


def test_restart_keeps_data_and_close_kills_even_a_paused_etcd(fresh_etcd):
    etcd = fresh_etcd
    etcd.ctl("put", "/k", "v")
    rev = etcd.revision()
    etcd.kill()
    assert not etcd.running
    etcd.start()
    assert etcd.ctl("get", "/k", "--print-value-only").strip() == "v"
    assert etcd.compact() == rev
    pid, tmp = etcd.proc.pid, etcd.log_path.parent
    etcd.pause()
    assert not etcd.healthy()
    etcd.close()
    deadline = time.monotonic() + 5
    while alive(pid) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not alive(pid) and not os.path.exists(tmp)


def test_failed_start_says_why(fresh_etcd):
    with pytest.raises(Exception, match="etcd exited"):
        EtcdServer(port=fresh_etcd.port).start(timeout=10)  # the port is taken
