"""``udpflannel demo`` run as a user without a terminal would run it (issue 19): it asks nothing, ends
by itself with exit 0, says what it showed, and leaves no namespace, process or CNI state behind; only
its work directory (logs, subnet.env, the traced ping's pcap) stays, and tcpdump reads that pcap."""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from udpflannel.lab.cluster import HOST_LOCAL_DIR
from udpflannel.lab.netns import leftover_namespaces

pytestmark = [pytest.mark.netns, pytest.mark.timeout(300)]


def processes_mentioning(text: str) -> list[str]:
    found = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if text in cmdline:
            found.append(f"{pid}: {cmdline}")
    return found


def test_demo_runs_unattended_to_its_summary_and_leaves_nothing_behind(root_lab_tools):
    proc = subprocess.Popen([sys.executable, "-m", "udpflannel", "demo", "--nodes", "2"], stdin=subprocess.DEVNULL,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "PYTHONUNBUFFERED": "1"})
    try:
        out, err = proc.communicate(timeout=240)
    except subprocess.TimeoutExpired:
        proc.send_signal(signal.SIGTERM)  # the demo removes what it built on SIGTERM, as on Ctrl-C
        out, err = proc.communicate(timeout=30)
        raise AssertionError(f"the demo did not end within 240 s:\n{out[-4000:]}") from None
    workdir = re.search(r"^All namespaces removed\. .* are in (\S+)$", out, re.MULTILINE)
    tag = re.search(r"etcd is running in namespace (\S+)-hub ", out)
    try:
        assert proc.returncode == 0, out[-4000:] + err[-4000:]
        assert workdir and tag, out[-2000:]
        assert "2/2 pairs answered" in out
        assert "Destination Net Unreachable" in out and "Time to live exceeded" in out
        # the traced ping: both journeys, step by step, and how to see it again
        assert re.search(r"out \(flannel0 → peer\): FORWARD\n  1\. tun read .* icmp echo request", out), out[-3000:]
        assert "FORWARD: sent to 198.18.0.2:8285" in out and "FORWARD: written to flannel0" in out
        pcap = Path(workdir[1]) / "ping.pcapng"
        assert f"wireshark {pcap}" in out
        node1 = f"{tag[1]}-n1"
        assert f"sudo ip netns exec {node1} tcpdump -n -i flannel0 icmp" in out
        assert f"sudo ip netns exec {node1} tcpdump -n -i eth0 udp port 8285" in out
        if shutil.which("tcpdump"):
            assert "ICMP echo request" in out.split("$ tcpdump -n -i flannel0 icmp", 1)[1]
            assert "198.18.0.1.8285 > 198.18.0.2.8285: UDP" in out.split("$ tcpdump -n -i eth0 udp port 8285", 1)[1]
            read = subprocess.run(["tcpdump", "-n", "-r", str(pcap)], capture_output=True, text=True, timeout=30)
            assert read.returncode == 0 and "ICMP echo request" in read.stdout and ".8285: UDP" in read.stdout
        # nothing left: namespaces, processes started for the demo, the CNI network's leases
        assert leftover_namespaces(tag[1]) == []
        assert processes_mentioning(workdir[1]) == []
        assert not Path(HOST_LOCAL_DIR, f"{tag[1]}-cbr0").exists()
    finally:
        if workdir:
            shutil.rmtree(workdir[1], ignore_errors=True)
