"""``udpflannel-cni``: the flannel CNI meta-plugin, for pods on a udpflannel node.

A container runtime runs it with ``"type": "flannel"`` in its network config (install it as
``/opt/cni/bin/flannel``, or use ``"type": "udpflannel-cni"``). It reads the node's subnet.env,
fills in a configuration for a real plugin (``bridge`` with ``host-local`` IPAM by default), saves
it for DEL, and runs that plugin — the same contract as flannel's own CNI plugin:

- ``delegate.type`` defaults to ``bridge``; ``name`` and ``ipam`` are set by us (refused if given);
- ``mtu`` = FLANNEL_MTU, ``ipMasq`` = not FLANNEL_IPMASQ (if flannel doesn't masquerade, the bridge
  does), ``isGateway`` = true for bridge, unless the delegate sets them;
- IPAM: ``host-local`` on FLANNEL_SUBNET with one route to FLANNEL_NETWORK.

Errors are reported as CNI error JSON on stdout with a non-zero exit, as the spec asks.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from ipaddress import IPv4Network
from pathlib import Path

from lease.subnetenv import DEFAULT_SUBNET_FILE, parse_env

DEFAULT_DATA_DIR = "/var/lib/cni/flannel"
SUPPORTED_VERSIONS = ["0.1.0", "0.2.0", "0.3.0", "0.3.1", "0.4.0", "1.0.0"]

# CNI error codes (spec: "Well-known Error Codes")
ERR_INCOMPATIBLE_VERSION = 1
ERR_INVALID_ENV = 4
ERR_DECODE = 6
ERR_INVALID_CONFIG = 7
ERR_TRY_LATER = 11


class CniError(Exception):
    def __init__(self, code: int, msg: str, details: str = "") -> None:
        super().__init__(msg)
        self.code, self.msg, self.details = code, msg, details


def read_subnet_env(path: str) -> dict[str, object]:
    """The four values the plugin needs; a missing file is 'try later' (the daemon is starting)."""
    try:
        env = parse_env(Path(path).read_text())
    except FileNotFoundError as exc:
        raise CniError(ERR_TRY_LATER, f"{path} not found: is udpflannel running on this node?") from exc
    missing = [k for k in ("FLANNEL_NETWORK", "FLANNEL_SUBNET", "FLANNEL_MTU", "FLANNEL_IPMASQ") if k not in env]
    if missing:
        raise CniError(ERR_INVALID_CONFIG, f"{path} is missing {', '.join(missing)}")
    try:
        return {
            "network": IPv4Network(env["FLANNEL_NETWORK"], strict=False),
            "subnet": IPv4Network(env["FLANNEL_SUBNET"], strict=False),
            "mtu": int(env["FLANNEL_MTU"]),
            "ipmasq": env["FLANNEL_IPMASQ"] == "true",
        }
    except ValueError as exc:
        raise CniError(ERR_INVALID_CONFIG, f"{path}: {exc}") from exc


def delegate_config(netconf: dict, fenv: dict[str, object]) -> dict:
    """Pure: the configuration handed to the real plugin."""
    delegate = dict(netconf.get("delegate") or {})
    if "type" in delegate and not isinstance(delegate["type"], str):
        raise CniError(ERR_INVALID_CONFIG, "'delegate' dictionary, if present, must have (string) 'type' field")
    for reserved in ("name", "ipam"):
        if reserved in delegate:
            raise CniError(ERR_INVALID_CONFIG, f"'delegate' dictionary must not have '{reserved}' field, it is set from subnet.env")
    if netconf.get("runtimeConfig") is not None:
        delegate["runtimeConfig"] = netconf["runtimeConfig"]
    delegate["name"] = netconf.get("name", "")
    delegate.setdefault("type", "bridge")
    delegate.setdefault("ipMasq", not fenv["ipmasq"])
    delegate.setdefault("mtu", fenv["mtu"])
    if delegate["type"] == "bridge":
        delegate.setdefault("isGateway", True)
    if netconf.get("cniVersion"):
        delegate["cniVersion"] = netconf["cniVersion"]
    # The overlay route names its gateway (host-local's default one, the subnet's first address), where
    # flannel's plugin leaves it out: the pod gets the same route either way, but the bridge plugin's CHECK
    # compares the result's routes with the pod's, and a route without its gateway never matches.
    gateway = str(fenv["subnet"].network_address + 1)  # type: ignore[attr-defined]
    delegate["ipam"] = {"type": "host-local", "subnet": str(fenv["subnet"]),
                        "routes": [{"dst": str(fenv["network"]), "gw": gateway}]}
    return delegate


def find_plugin(name: str, cni_path: str) -> str:
    for directory in cni_path.split(":"):
        candidate = Path(directory) / name
        if directory and candidate.is_file() and os.access(candidate, os.X_OK):
            return str(candidate)
    raise CniError(ERR_INVALID_ENV, f"failed to find plugin {name!r} in path {cni_path!r}")


def invoke(plugin_type: str, conf: dict, environ: dict[str, str]) -> str:
    """Run the delegate with our CNI_* environment; its stdout is our result (or its error)."""
    binary = find_plugin(plugin_type, environ.get("CNI_PATH", ""))
    proc = subprocess.run([binary], input=json.dumps(conf).encode(), capture_output=True, env=environ, timeout=60)
    if proc.returncode != 0:
        try:
            err = json.loads(proc.stdout)
            raise CniError(int(err.get("code", 999)), f"{plugin_type}: {err.get('msg', '')}", err.get("details", ""))
        except (ValueError, AttributeError):
            raise CniError(999, f"{plugin_type} failed: {proc.stderr.decode(errors='replace').strip()}") from None
    return proc.stdout.decode()


def run(command: str, netconf: dict, environ: dict[str, str]) -> str:
    if command == "VERSION":
        return json.dumps({"cniVersion": "1.0.0", "supportedVersions": SUPPORTED_VERSIONS})
    container = environ.get("CNI_CONTAINERID", "")
    if not container or "/" in container or container.startswith("."):
        raise CniError(ERR_INVALID_ENV, f"CNI_CONTAINERID {container!r} is missing or not a plain name")
    scratch = Path(netconf.get("dataDir") or DEFAULT_DATA_DIR) / container
    if command == "ADD":
        conf = delegate_config(netconf, read_subnet_env(netconf.get("subnetFile") or DEFAULT_SUBNET_FILE))
        scratch.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        scratch.write_text(json.dumps(conf))
        scratch.chmod(0o600)
        return invoke(conf["type"], conf, environ)
    if command in ("DEL", "CHECK"):
        try:
            conf = json.loads(scratch.read_text())
        except FileNotFoundError:
            if command == "DEL":
                return ""  # already gone: DEL must succeed
            raise CniError(ERR_INVALID_CONFIG, f"no saved configuration for container {container}") from None
        for passed in ("runtimeConfig", "prevResult"):  # the runtime's, for this call (CHECK needs prevResult)
            if netconf.get(passed) is not None:
                conf[passed] = netconf[passed]
        out = invoke(conf["type"], conf, environ)
        if command == "DEL":
            scratch.unlink(missing_ok=True)
        return out
    raise CniError(ERR_INVALID_ENV, f"unknown CNI_COMMAND {command!r}")


def main() -> int:
    environ = dict(os.environ)
    command = environ.get("CNI_COMMAND", "")
    version = "1.0.0"
    try:
        raw = sys.stdin.read() if command != "VERSION" else "{}"
        try:
            netconf = json.loads(raw or "{}")
        except ValueError as exc:
            raise CniError(ERR_DECODE, f"failed to load netconf: {exc}") from exc
        if not isinstance(netconf, dict):
            raise CniError(ERR_DECODE, "netconf must be a JSON object")
        version = netconf.get("cniVersion") or version
        if version not in SUPPORTED_VERSIONS:
            raise CniError(ERR_INCOMPATIBLE_VERSION, f"cniVersion {version} is not supported", ", ".join(SUPPORTED_VERSIONS))
        sys.stdout.write(run(command, netconf, environ))
        return 0
    except CniError as exc:
        sys.stdout.write(json.dumps({"cniVersion": version, "code": exc.code, "msg": exc.msg, "details": exc.details}))
        return 1


if __name__ == "__main__":
    raise SystemExit(main())
