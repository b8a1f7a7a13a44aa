"""EnableNFTables: the iptables mode's masquerade and forward rules in flannel's nftables table, and
their effect in a real cluster (mirrors tests/test_masq.py)."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import time
from ipaddress import IPv4Network
from pathlib import Path

import pytest

from tests.cluster import wait_for
from tests.conftest import require
from tests.lease_moves import move_lease
from udpflannel.errors import SetupError
from udpflannel.lab.cluster import Cluster
from udpflannel.lab.netns import HUB_ADDRESS, Lab, Netns
from udpflannel.nft import (
    chain_state,
    delete_tables_script,
    forward_chain,
    load_binding,
    masq_chain,
    parse_tables,
    ruleset_script,
)

CLUSTER, POD = IPv4Network("10.5.0.0/16"), IPv4Network("10.5.35.0/24")
CONFIG = {"Network": "10.5.0.0/16", "Backend": {"Type": "udp"}}
NFT_CONFIG = {**CONFIG, "EnableNFTables": True}

# flannel's table and chains; the iptables mode's rules (reference §8), one nft transaction
EXPECTED_SCRIPT = """\
add table ip flannel-ipv4 { comment "rules for flannel-ipv4" ; }
add chain ip flannel-ipv4 postrtg { type nat hook postrouting priority srcnat ; comment "chain to manage traffic masquerading by flannel" ; }
flush chain ip flannel-ipv4 postrtg
add rule ip flannel-ipv4 postrtg meta mark & 0x4000 == 0x4000 return
add rule ip flannel-ipv4 postrtg ip saddr 10.5.35.0/24 ip daddr 10.5.0.0/16 return
add rule ip flannel-ipv4 postrtg ip saddr 10.5.0.0/16 ip daddr 10.5.35.0/24 return
add rule ip flannel-ipv4 postrtg ip saddr != 10.5.0.0/16 ip daddr 10.5.35.0/24 return
add rule ip flannel-ipv4 postrtg ip saddr 10.5.0.0/16 ip daddr != 224.0.0.0/4 masquerade fully-random
add rule ip flannel-ipv4 postrtg ip saddr != 10.5.0.0/16 ip daddr 10.5.0.0/16 masquerade fully-random
add chain ip flannel-ipv4 forward { type filter hook forward priority filter ; comment "chain to accept flannel traffic" ; }
flush chain ip flannel-ipv4 forward
add rule ip flannel-ipv4 forward ip saddr 10.5.0.0/16 accept
add rule ip flannel-ipv4 forward ip daddr 10.5.0.0/16 accept
"""


# -- pure ---------------------------------------------------------------------------------------------------

def test_script_is_the_iptables_rule_set_in_flannels_table():
    assert ruleset_script([masq_chain(CLUSTER, POD), forward_chain(CLUSTER)]) == EXPECTED_SCRIPT


def test_fully_random_can_be_disabled():
    rules = masq_chain(CLUSTER, POD, fully_random=False).rules
    assert [r for r in rules if "masquerade" in r] == [
        "ip saddr 10.5.0.0/16 ip daddr != 224.0.0.0/4 masquerade",
        "ip saddr != 10.5.0.0/16 ip daddr 10.5.0.0/16 masquerade",
    ]


def test_clean_up_deletes_only_flannels_tables_that_exist():
    listing = "table ip filter\ntable ip flannel-ipv4\ntable inet firewalld\n"
    assert parse_tables(listing) == {("ip", "filter"), ("ip", "flannel-ipv4"), ("inet", "firewalld")}
    assert delete_tables_script(parse_tables(listing)) == "delete table ip flannel-ipv4\n"
    assert delete_tables_script({("ip6", "flannel-ipv6"), ("ip", "flannel-ipv4")}) == (
        "delete table ip flannel-ipv4\ndelete table ip6 flannel-ipv6\n")
    assert delete_tables_script(set()) == ""


def test_chain_state_ignores_handles_and_foreign_chains():
    def listing(handle: int) -> str:
        rule = {"family": "ip", "table": "flannel-ipv4", "chain": "forward", "handle": handle,
                "expr": [{"accept": None}]}
        other = {**rule, "chain": "theirs", "handle": handle + 1}
        chain = {"family": "ip", "table": "flannel-ipv4", "name": "forward", "handle": handle + 2,
                 "type": "filter", "hook": "forward", "prio": 0, "policy": "accept"}
        return json.dumps({"nftables": [{"metainfo": {}}, {"chain": chain}, {"rule": rule}, {"rule": other}]})

    assert chain_state(listing(4), ["forward"]) == chain_state(listing(40), ["forward"])
    assert len(chain_state(listing(4), ["forward"])) == 2


def test_missing_binding_names_the_debian_package(monkeypatch, tmp_path: Path):
    monkeypatch.setitem(sys.modules, "nftables", None)  # ``import nftables`` raises ImportError
    monkeypatch.setattr("udpflannel.nft.DEBIAN_PACKAGE_DIR", tmp_path / "nftables")
    with pytest.raises(SetupError, match=r"apt-get install python3-nftables"):
        load_binding()


# -- in namespaces ------------------------------------------------------------------------------------------

def nft_available() -> bool:
    try:
        load_binding()
    except SetupError:
        return False
    return shutil.which("nft") is not None


@pytest.fixture
def nft_tools(root_lab_tools) -> None:
    require(nft_available(), "needs nft and Debian's python3-nftables (./dev setup installs them)")


APPLY_TWICE = """
import sys
from ipaddress import IPv4Network as N
from udpflannel.nft import Nftables, forward_chain, masq_chain
STRUCTURE = ("table", "chain", "comment", "type", "}")
nft = Nftables()
chains = [masq_chain(N("10.5.0.0/16"), N("10.5.35.0/24")), forward_chain(N("10.5.0.0/16"))]
nft.apply(chains)
first = nft.run("list ruleset")
nft.apply(chains)
rules = [line for line in first.splitlines() if line.strip() and not line.strip().startswith(STRUCTURE)]
print(first == nft.run("list ruleset"), nft.all_present(chains), len(rules))
"""


def test_applying_twice_gives_the_same_ruleset(lab: Lab, nft_tools):
    ns = lab.add_netns("nft")
    same, intact, rules = ns.run(sys.executable, "-c", APPLY_TWICE).stdout.split()
    assert (same, intact, rules) == ("True", "True", "8")  # 6 masquerade + 2 forward rules, not doubled


def nft_list(ns: Netns, *what: str) -> str:
    return ns.run("nft", "list", *what, check=False).stdout


def source_seen_by(listener: Netns, sender: Netns, address: str, port: int = 7777) -> str:
    """Send one UDP datagram ``sender`` → ``address:port``; the source address ``listener`` saw."""
    code = (f"import socket;s=socket.socket(2,2);s.bind(('0.0.0.0',{port}));s.settimeout(5);"
            "print('ready',flush=True);print(s.recvfrom(64)[1][0])")
    proc = listener.popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    assert proc.stdout is not None and proc.stdout.readline().strip() == "ready"
    sender.run(sys.executable, "-c", f"import socket;socket.socket(2,2).sendto(b'x',('{address}',{port}))")
    return proc.communicate(timeout=10)[0].strip()


@pytest.fixture
def nft_cluster(lab: Lab, tmp_path: Path, nft_tools):
    with Cluster(lab, tmp_path) as c:
        c.put_config(NFT_CONFIG)
        c.start_node(1, "--ip-masq", "--iptables-resync=1")
        c.start_node(2, "--ip-masq", "--ip-masq-fully-random-disable")
        for i in (1, 2):
            c.wait_ready(i)
            c.add_pod(i, cni=False)  # flannel's own rules only: no bridge-plugin masquerade
        yield c


def test_nftables_masquerade_in_a_cluster(nft_cluster: Cluster):
    c = nft_cluster
    n1, n2 = c.nodes[1], c.nodes[2]
    assert n1.env()["FLANNEL_IPMASQ"] == "true"
    # leaving the overlay, a pod is seen from outside as its node
    assert source_seen_by(c.hub, n1.pod, str(HUB_ADDRESS)) == str(n1.node.address)
    assert source_seen_by(c.hub, n2.pod, str(HUB_ADDRESS)) == str(n2.node.address)
    # pod to pod, the source is the pod's own address, both ways
    assert source_seen_by(n2.pod, n1.pod, str(n2.pod.address)) == str(n1.pod.address)
    assert source_seen_by(n1.pod, n2.pod, str(n1.pod.address)) == str(n2.pod.address)
    # the rules live in nftables only, fully-random where not disabled
    chain1, chain2 = nft_list(n1.node, "chain", "ip", "flannel-ipv4", "postrtg"), nft_list(n2.node, "chain", "ip", "flannel-ipv4", "postrtg")
    assert chain1.count("masquerade fully-random") == 2
    assert chain2.count("masquerade") == 2 and "fully-random" not in chain2
    assert n1.node.run("iptables", "-t", "nat", "-S", "FLANNEL-POSTRTG", check=False).returncode != 0
    for n in (n1, n2):
        assert "ip saddr 10.5.0.0/16 accept" in nft_list(n.node, "chain", "ip", "flannel-ipv4", "forward")


def test_nftables_rule_deleted_behind_our_back_comes_back(nft_cluster: Cluster):
    node = nft_cluster.nodes[1].node
    listing = node.run("nft", "-a", "list", "chain", "ip", "flannel-ipv4", "postrtg").stdout
    victim = next(line for line in listing.splitlines() if "masquerade" in line)
    handle = victim.rsplit("# handle ", 1)[1]
    node.run("nft", "delete", "rule", "ip", "flannel-ipv4", "postrtg", "handle", handle)
    rule = victim.split(" # handle")[0].strip()
    assert rule not in nft_list(node, "chain", "ip", "flannel-ipv4", "postrtg")
    wait_for(lambda: rule in nft_list(node, "chain", "ip", "flannel-ipv4", "postrtg"), timeout=5,
             what="the resync restoring the masquerade rule")
    assert nft_list(node, "chain", "ip", "flannel-ipv4", "postrtg").count("masquerade") == 2


def restart(cluster: Cluster, index: int, config: dict) -> None:
    n = cluster.nodes[index]
    cluster.stop_node(index)
    n.subnet_file.unlink()  # wait_ready waits for a fresh one
    cluster.put_config(config)
    cluster.start_node(index)
    cluster.wait_ready(index)


def test_each_mode_removes_the_other_modes_rules_at_start_up(lab: Lab, tmp_path: Path, nft_tools):
    with Cluster(lab, tmp_path) as c:
        node = c.add_node(1).node
        node.run("nft", "add", "table", "ip", "flannel-ipv4")  # as flanneld's nftables mode leaves them
        node.run("nft", "add", "table", "ip6", "flannel-ipv6")
        c.put_config(CONFIG)
        c.start_node(1, "--ip-masq")
        c.wait_ready(1)
        assert "flannel" not in nft_list(node, "tables")
        assert "FLANNEL-POSTRTG" in node.run("iptables", "-t", "nat", "-S", "POSTROUTING").stdout

        restart(c, 1, NFT_CONFIG)
        for table, builtin, chain in (("nat", "POSTROUTING", "FLANNEL-POSTRTG"), ("filter", "FORWARD", "FLANNEL-FWD")):
            assert node.run("iptables", "-t", table, "-S", chain, check=False).returncode != 0
            assert chain not in node.run("iptables", "-t", table, "-S", builtin).stdout
        assert "chain postrtg" in nft_list(node, "table", "ip", "flannel-ipv4")

        restart(c, 1, CONFIG)
        assert "flannel" not in nft_list(node, "tables")
        assert "FLANNEL-FWD" in node.run("iptables", "-S", "FORWARD").stdout


@pytest.mark.parametrize("mode", ["iptables", "nftables"])
def test_lease_change_moves_the_masquerade_rules(lab: Lab, tmp_path: Path, nft_tools, mode: str):
    def rules() -> str:
        if mode == "nftables":
            return nft_list(node, "chain", "ip", "flannel-ipv4", "postrtg")
        return node.run("iptables", "-t", "nat", "-S", "FLANNEL-POSTRTG").stdout

    with Cluster(lab, tmp_path) as c:
        c.put_config(NFT_CONFIG if mode == "nftables" else CONFIG)
        node = c.start_node(1, "--ip-masq", "--iptables-resync=1").node
        c.wait_ready(1)
        old, new = move_lease(c, 1)
        wait_for(lambda: str(new) in rules(), timeout=10, what=f"masquerade rules for {new}")
        time.sleep(3)  # three resync periods: the resync must not bring the old subnet's rules back
        assert str(new) in rules() and str(old) not in rules()
