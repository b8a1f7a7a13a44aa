"""udpflannel-cni: the flannel CNI contract, pure and against Debian's real bridge/host-local plugins."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from ipaddress import IPv4Network
from pathlib import Path

import pytest

from tests.conftest import require
from udpflannel.cni import CniError, delegate_config, read_subnet_env
from udpflannel.lab.cluster import CNI_PATH, HOST_LOCAL_DIR, cni_plugin_command
from udpflannel.lab.netns import Lab

FENV = {"network": IPv4Network("10.5.0.0/16"), "subnet": IPv4Network("10.5.35.0/24"), "mtu": 1472, "ipmasq": False}
SUBNET_ENV = "FLANNEL_NETWORK=10.5.0.0/16\nFLANNEL_SUBNET=10.5.35.1/24\nFLANNEL_MTU=1472\nFLANNEL_IPMASQ=false\n"


def test_defaults_delegate_to_bridge():
    conf = delegate_config({"cniVersion": "0.3.1", "name": "cbr0", "type": "flannel"}, FENV)
    assert conf == {
        "name": "cbr0", "type": "bridge", "ipMasq": True, "mtu": 1472, "isGateway": True, "cniVersion": "0.3.1",
        "ipam": {"type": "host-local", "subnet": "10.5.35.0/24", "routes": [{"dst": "10.5.0.0/16", "gw": "10.5.35.1"}]},
    }


def test_delegate_values_win_and_other_types_get_no_gateway():
    conf = delegate_config({"name": "n", "delegate": {"type": "ipvlan", "mtu": 1400, "ipMasq": False},
                            "runtimeConfig": {"portMappings": []}}, {**FENV, "ipmasq": True})
    assert conf["mtu"] == 1400 and conf["ipMasq"] is False and "isGateway" not in conf
    assert conf["runtimeConfig"] == {"portMappings": []}


@pytest.mark.parametrize("delegate", [{"name": "x"}, {"ipam": {}}, {"type": 7}])
def test_refused_delegates(delegate):
    with pytest.raises(CniError) as err:
        delegate_config({"name": "n", "delegate": delegate}, FENV)
    assert err.value.code == 7


def test_subnet_env_problems(tmp_path: Path):
    with pytest.raises(CniError) as err:
        read_subnet_env(str(tmp_path / "missing.env"))
    assert err.value.code == 11  # try again later: the daemon may still be starting
    (tmp_path / "partial.env").write_text("FLANNEL_NETWORK=10.5.0.0/16\n")
    with pytest.raises(CniError) as err:
        read_subnet_env(str(tmp_path / "partial.env"))
    assert "FLANNEL_SUBNET" in err.value.msg and "FLANNEL_MTU" in err.value.msg


def plugin(command: str, netconf: dict | str, **env: str) -> tuple[int, str]:
    proc = subprocess.run(cni_plugin_command(), input=netconf if isinstance(netconf, str) else json.dumps(netconf),
                          capture_output=True, text=True, timeout=30,
                          env={**os.environ, "CNI_COMMAND": command, "CNI_PATH": CNI_PATH, **env})
    return proc.returncode, proc.stdout


def test_version_and_error_json():
    code, out = plugin("VERSION", "")
    assert code == 0 and "0.3.1" in json.loads(out)["supportedVersions"]
    code, out = plugin("ADD", "{not json", CNI_CONTAINERID="c1")
    assert code == 1 and json.loads(out)["code"] == 6
    code, out = plugin("ADD", {"cniVersion": "9.9.9", "name": "n"}, CNI_CONTAINERID="c1")
    assert code == 1 and json.loads(out)["code"] == 1


def test_add_check_del_with_the_real_bridge_plugin(lab: Lab, tmp_path: Path):
    require(shutil.which("bridge", path=CNI_PATH) is not None, "needs the CNI bridge/host-local plugins (./dev setup)")
    node = lab.add_node(1)
    pod = lab.add_netns("n1p2")
    (tmp_path / "subnet.env").write_text(SUBNET_ENV)
    network = f"{lab.tag}-cbr0"
    netconf = {"cniVersion": "1.0.0", "name": network, "type": "flannel", "subnetFile": str(tmp_path / "subnet.env"),
               "dataDir": str(tmp_path / "cni"), "delegate": {"isDefaultGateway": True}}
    env = {"CNI_CONTAINERID": pod.name, "CNI_NETNS": f"/var/run/netns/{pod.name}", "CNI_IFNAME": "eth0"}

    def run(command: str) -> tuple[int, str]:
        proc = subprocess.run(["ip", "netns", "exec", node.name, *cni_plugin_command()], input=json.dumps(netconf),
                              capture_output=True, text=True, timeout=30,
                              env={**os.environ, "CNI_COMMAND": command, "CNI_PATH": CNI_PATH, **env})
        return proc.returncode, proc.stdout + proc.stderr

    try:
        code, out = run("ADD")
        assert code == 0, out
        result = json.loads(out)
        assert result["ips"][0]["address"] == "10.5.35.2/24"
        assert "10.5.35.1/24" in node.ip("addr", "show", "cni0").stdout
        assert "mtu 1472" in pod.ip("link", "show", "eth0").stdout
        routes = pod.ip("route").stdout
        assert "default via 10.5.35.1" in routes and "10.5.0.0/16 via 10.5.35.1" in routes
        assert pod.run("ping", "-c", "1", "-W", "2", "10.5.35.1", check=False).returncode == 0
        saved = json.loads((tmp_path / "cni" / pod.name).read_text())
        assert saved["type"] == "bridge" and saved["ipMasq"] is True
        netconf["prevResult"] = result  # what a runtime passes to CHECK
        code, out = run("CHECK")
        assert code == 0, out  # the bridge plugin finds the pod as ADD left it (see delegate_config's routes)
        code, out = run("DEL")
        assert code == 0, out
        assert "eth0" not in pod.ip("link", "show").stdout
        assert not (tmp_path / "cni" / pod.name).exists()
        assert run("DEL")[0] == 0  # idempotent, as the spec requires
        code, out = run("CHECK")
        assert code == 1 and json.loads(out)["code"] == 7  # nothing saved for this container any more
    finally:
        shutil.rmtree(Path(HOST_LOCAL_DIR) / network, ignore_errors=True)
