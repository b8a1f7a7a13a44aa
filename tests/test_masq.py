"""--ip-masq: flanneld's iptables rules, byte for byte, and their effect in a real cluster."""

from __future__ import annotations

import subprocess
import sys
import time
from ipaddress import IPv4Network
from pathlib import Path

import pytest

from tests.cluster import ping, wait_for
from udpflannel.lab.cluster import Cluster
from udpflannel.lab.netns import Lab
from udpflannel.masq import Rule, forward_rules, masq_rules, restore_payload

CLUSTER, POD = IPv4Network("10.5.0.0/16"), IPv4Network("10.5.35.0/24")

# reference §8, as iptables-restore sees them
EXPECTED_MASQ = """\
*nat
-A POSTROUTING -m comment --comment "flanneld masq" -j FLANNEL-POSTRTG
-A FLANNEL-POSTRTG -m mark --mark 0x4000/0x4000 -m comment --comment "flanneld masq" -j RETURN
-A FLANNEL-POSTRTG -s 10.5.35.0/24 -d 10.5.0.0/16 -m comment --comment "flanneld masq" -j RETURN
-A FLANNEL-POSTRTG -s 10.5.0.0/16 -d 10.5.35.0/24 -m comment --comment "flanneld masq" -j RETURN
-A FLANNEL-POSTRTG ! -s 10.5.0.0/16 -d 10.5.35.0/24 -m comment --comment "flanneld masq" -j RETURN
-A FLANNEL-POSTRTG -s 10.5.0.0/16 ! -d 224.0.0.0/4 -m comment --comment "flanneld masq" -j MASQUERADE --random-fully
-A FLANNEL-POSTRTG ! -s 10.5.0.0/16 -d 10.5.0.0/16 -m comment --comment "flanneld masq" -j MASQUERADE --random-fully
COMMIT
"""


def test_masq_rules_are_flanneld_rules():
    assert restore_payload(masq_rules(CLUSTER, POD), set()) == EXPECTED_MASQ


def test_existing_jump_is_deleted_then_appended():
    rules = forward_rules(CLUSTER)
    payload = restore_payload(rules, {rules.rules[0]}).splitlines()
    assert payload[1] == '-D FORWARD -m comment --comment "flanneld forward" -j FLANNEL-FWD'
    assert payload[2] == '-A FORWARD -m comment --comment "flanneld forward" -j FLANNEL-FWD'
    assert payload[-1] == "COMMIT"


def test_random_fully_can_be_disabled():
    rules = masq_rules(CLUSTER, POD, random_fully=False)
    assert all("--random-fully" not in r.spec for r in rules.rules)
    assert isinstance(rules.rules[0], Rule)


@pytest.fixture
def masq_cluster(lab: Lab, tmp_path: Path):
    import shutil

    from tests.conftest import require
    require(shutil.which("iptables") is not None, "needs iptables (./dev setup installs it)")
    with Cluster(lab, tmp_path) as c:
        c.put_config({"Network": "10.5.0.0/16", "Backend": {"Type": "udp"}})
        c.start_node(1, "--ip-masq", "--iptables-resync=1")
        c.start_node(2)
        for i in (1, 2):
            c.wait_ready(i)
            c.add_pod(i, cni=False)  # flannel's own rules only: no bridge-plugin masquerade
        yield c


def test_masquerade_in_a_cluster(masq_cluster: Cluster):
    c = masq_cluster
    n1, n2 = c.nodes[1], c.nodes[2]
    assert n1.env()["FLANNEL_IPMASQ"] == "true" and n2.env()["FLANNEL_IPMASQ"] == "false"
    # the hub (outside the overlay, no route back to 10.5/16) answers only masqueraded pods
    assert ping(n1.pod, "198.18.0.254").returncode == 0
    assert ping(n2.pod, "198.18.0.254").returncode != 0
    # pod-to-pod traffic keeps its source address
    code = "import socket;s=socket.socket(2,2);s.bind(('0.0.0.0',7777));s.settimeout(5);print(s.recvfrom(64)[1][0])"
    listener = n2.pod.popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    time.sleep(0.3)
    n1.pod.run(sys.executable, "-c", f"import socket;socket.socket(2,2).sendto(b'x',('{n2.pod.address}',7777))")
    assert listener.communicate(timeout=10)[0].strip() == str(n1.pod.address)
    # a rule removed behind our back comes back within the resync period
    chain = n1.node.run("iptables", "-t", "nat", "-S", "FLANNEL-POSTRTG").stdout
    victim = next(line for line in chain.splitlines() if "MASQUERADE" in line)
    n1.node.run("sh", "-c", f"iptables -t nat {victim.replace('-A ', '-D ', 1)}")
    assert victim not in n1.node.run("iptables", "-t", "nat", "-S", "FLANNEL-POSTRTG").stdout
    wait_for(lambda: victim in n1.node.run("iptables", "-t", "nat", "-S", "FLANNEL-POSTRTG").stdout,
             timeout=5, what="the resync restoring the MASQUERADE rule")
    # forward rules are installed by default on both nodes
    for n in (n1, n2):
        assert "-A FLANNEL-FWD -s 10.5.0.0/16" in n.node.run("iptables", "-S", "FLANNEL-FWD").stdout
