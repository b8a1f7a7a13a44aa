"""``--ip-masq`` and the forward rules in nftables, for a network config with ``"EnableNFTables": true``.

flannel ≥ v0.25 (``pkg/trafficmngr/nftables``) keeps them in its own table ``ip flannel-ipv4``: a nat
chain ``postrtg`` (hook postrouting, priority srcnat) and a filter chain ``forward`` (hook forward,
priority filter), each flushed and refilled in one transaction. We use the same table, chains and
comments, with the **iptables mode's semantics** (``udpflannel.masq``): flannel's fourth nftables rule
(``ip saddr != <pod> ip daddr <cluster> return``) differs from iptables rule 5 and leaves its last rule
dead, and its mark test is exact where iptables masks; see docs/compat.md.

The rule set is a pure function of (cluster, pod, fully-random) rendered as an nft script
(``ruleset_script``); ``Nftables`` runs it through libnftables (Debian's ``python3-nftables``; the
README says why that binding), checks it, and deletes the tables at start-up in iptables mode.
"""

from __future__ import annotations

import importlib.util
import json
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from ipaddress import IPv4Network
from pathlib import Path
from types import ModuleType

from udpflannel.errors import SetupError
from udpflannel.masq import KUBE_PROXY_MARK, MULTICAST

TABLE = "flannel-ipv4"
FAMILY = "ip"
FLANNEL_TABLES = (("ip", "flannel-ipv4"), ("ip6", "flannel-ipv6"))  # what flanneld's CleanUp deletes
PROBE_CHAIN = "masqueradeTest"  # flannel's name for the fully-random probe chain
DEBIAN_PACKAGE_DIR = Path("/usr/lib/python3/dist-packages/nftables")
INSTALL_HINT = "install Debian's python3-nftables (apt-get install python3-nftables), which binds libnftables"


@dataclass(frozen=True)
class Chain:
    """One base chain of our table, flushed and refilled with ``rules`` (nft syntax) on every apply."""

    name: str
    type: str
    hook: str
    priority: str
    comment: str
    rules: tuple[str, ...]


def masq_chain(cluster: IPv4Network, pod: IPv4Network, *, fully_random: bool = True) -> Chain:
    """The iptables mode's FLANNEL-POSTRTG, rule for rule, in nft syntax."""
    c, p = str(cluster), str(pod)
    value, mask = KUBE_PROXY_MARK.split("/")
    masquerade = "masquerade fully-random" if fully_random else "masquerade"
    rules = (
        f"meta mark & {mask} == {value} return",  # kube-proxy marked it: kube-proxy masquerades
        f"ip saddr {p} ip daddr {c} return",  # pod -> cluster
        f"ip saddr {c} ip daddr {p} return",  # cluster -> pod
        f"ip saddr != {c} ip daddr {p} return",  # outside -> our pods (iptables rule 5, not flannel's nft rule)
        f"ip saddr {c} ip daddr != {MULTICAST} {masquerade}",  # pods -> outside
        f"ip saddr != {c} ip daddr {c} {masquerade}",  # host -> other nodes' pods
    )
    return Chain("postrtg", "nat", "postrouting", "srcnat", "chain to manage traffic masquerading by flannel", rules)


def forward_chain(cluster: IPv4Network) -> Chain:
    """Accept forwarded overlay traffic (within this table; see docs/compat.md for a DROP policy elsewhere)."""
    c = str(cluster)
    rules = (f"ip saddr {c} accept", f"ip daddr {c} accept")
    return Chain("forward", "filter", "forward", "filter", "chain to accept flannel traffic", rules)


def _chain_header(chain: Chain, table: str) -> str:
    return (f"add chain {FAMILY} {table} {chain.name} {{ type {chain.type} hook {chain.hook} "
            f'priority {chain.priority} ; comment "{chain.comment}" ; }}')


def ruleset_script(chains: Sequence[Chain], table: str = TABLE) -> str:
    """One nft transaction: create the table and chains if missing, flush each chain, add its rules."""
    lines = [f'add table {FAMILY} {table} {{ comment "rules for {table}" ; }}']
    for chain in chains:
        lines.append(_chain_header(chain, table))
        lines.append(f"flush chain {FAMILY} {table} {chain.name}")
        lines += [f"add rule {FAMILY} {table} {chain.name} {rule}" for rule in chain.rules]
    return "\n".join(lines) + "\n"


def fully_random_probe_script(table: str = TABLE) -> str:
    """flannel's probe: can the kernel take ``masquerade fully-random``? Run as a check, it leaves nothing."""
    probe = Chain(PROBE_CHAIN, "nat", "postrouting", "srcnat", "chain to test if masquerade random fully is supported",
                  ("ip saddr != 127.0.0.1 masquerade fully-random",))
    return ruleset_script([probe], table)


def delete_tables_script(present: set[tuple[str, str]]) -> str:
    """Delete those of flanneld's tables that exist (nft has no delete-if-exists before 1.0.8's ``destroy``)."""
    return "".join(f"delete table {family} {name}\n" for family, name in FLANNEL_TABLES if (family, name) in present)


def parse_tables(listing: str) -> set[tuple[str, str]]:
    """``nft list tables`` output (``table ip flannel-ipv4`` lines) as (family, name) pairs."""
    return {(words[1], words[2]) for words in (line.split() for line in listing.splitlines())
            if len(words) >= 3 and words[0] == "table"}


def chain_state(listing_json: str, names: Sequence[str]) -> list[tuple]:
    """What the kernel holds for our chains, from ``nft -j list table``: hooks and rules in listing order, no handles."""
    state: list[tuple] = []
    for item in json.loads(listing_json).get("nftables", []):
        if "chain" in item and item["chain"]["name"] in names:
            ch = item["chain"]
            state.append(("chain", ch["name"], ch.get("type"), ch.get("hook"), ch.get("prio"), ch.get("policy")))
        elif "rule" in item and item["rule"]["chain"] in names:
            state.append(("rule", item["rule"]["chain"], json.dumps(item["rule"]["expr"], sort_keys=True)))
    return state


def load_binding() -> ModuleType:
    """The ``nftables`` module: importable as is, else Debian's copy (python3-nftables) loaded alone.

    Debian installs it for Debian's own ``python3`` only; a venv on another interpreter (pyenv, say)
    cannot import it. The module is plain Python over ctypes (no compiled extension, so no interpreter
    ABI to match), so we load just that package from Debian's directory rather than putting all of
    Debian's dist-packages on ``sys.path``.
    """
    try:
        import nftables  # type: ignore[import-not-found]
        return nftables
    except ImportError:
        pass
    init = DEBIAN_PACKAGE_DIR / "__init__.py"
    if not init.exists():
        raise SetupError(f"EnableNFTables needs the nftables Python binding: {INSTALL_HINT}")
    spec = importlib.util.spec_from_file_location("nftables", init, submodule_search_locations=[str(DEBIAN_PACKAGE_DIR)])
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules["nftables"] = module  # its __init__ does ``from .nftables import *``
    try:
        spec.loader.exec_module(module)
    except Exception as exc:
        del sys.modules["nftables"]
        raise SetupError(f"could not load {DEBIAN_PACKAGE_DIR}: {exc}; {INSTALL_HINT}") from exc
    return module


class Nftables:
    """The I/O half: one libnftables context in the current network namespace.

    Not thread-safe: the daemon calls it from one worker thread at a time (under its resync lock).
    """

    def __init__(self, binding: ModuleType | None = None) -> None:
        module = binding or load_binding()
        try:
            self._nft = module.Nftables()
        except (OSError, AttributeError) as exc:  # libnftables.so.1 missing, or older than the binding
            raise SetupError(f"libnftables could not be loaded ({exc}): {INSTALL_HINT}") from exc
        self._applied: dict[tuple[str, ...], list[tuple]] = {}

    def run(self, script: str, *, check_only: bool = False, json_output: bool = False) -> str:
        """One transaction (``check_only``: sent to the kernel, then aborted, like ``nft --check``)."""
        self._nft.set_dry_run(check_only)
        self._nft.set_json_output(json_output)
        try:
            rc, output, error = self._nft.cmd(script)
        finally:
            self._nft.set_dry_run(False)
            self._nft.set_json_output(False)
        if rc != 0:
            raise SetupError(f"nft: {error.strip() or 'failed'} (in: {script.strip().splitlines()[0]} ...)")
        return output

    def has_fully_random(self) -> bool:
        try:
            self.run(fully_random_probe_script(), check_only=True)
        except SetupError:
            return False
        return True

    def state(self, chains: Sequence[Chain], table: str = TABLE) -> list[tuple] | None:
        """Our chains as the kernel has them now (None: the table is gone)."""
        try:
            listing = self.run(f"list table {FAMILY} {table}", json_output=True)
        except SetupError:
            return None
        return chain_state(listing, [chain.name for chain in chains])

    def apply(self, chains: Sequence[Chain], table: str = TABLE) -> None:
        """Flush and refill our chains atomically, then remember what the kernel made of them."""
        self.run(ruleset_script(chains, table))
        self._applied[tuple(chain.name for chain in chains)] = self.state(chains, table) or []

    def all_present(self, chains: Sequence[Chain], table: str = TABLE) -> bool:
        """Are our chains still exactly as the last ``apply`` left them (no rule deleted, added or changed)?"""
        applied = self._applied.get(tuple(chain.name for chain in chains))
        return applied is not None and self.state(chains, table) == applied

    def delete_flannel_tables(self) -> list[str]:
        """iptables mode's start-up clean-up (flanneld's ``CleanUp``): delete ``flannel-ipv4``/``-ipv6``."""
        present = parse_tables(self.run("list tables"))
        script = delete_tables_script(present)
        if script:
            self.run(script)
        return [f"{family} {name}" for family, name in FLANNEL_TABLES if (family, name) in present]
