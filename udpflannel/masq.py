"""``--ip-masq`` and the forward rules, as flanneld installs them with iptables (reference §8).

The rule sets are computed by pure functions; ``Iptables`` applies them in one
``iptables-restore --noflush --wait`` transaction per table and checks them with ``iptables -C``.
Like flanneld: our chain is created or flushed, the jump from the built-in chain is appended once,
rules are re-checked every ``--iptables-resync`` seconds (``udpflannel.resync``) and re-applied in
order if any is missing, and nothing is removed on exit (pods keep working across a daemon restart).
In nftables mode (``udpflannel.nft``) the daemon removes these chains at start-up (``Iptables.remove``).
"""

from __future__ import annotations

import shutil
import subprocess
from dataclasses import dataclass
from ipaddress import IPv4Network

from udpflannel.errors import SetupError

KUBE_PROXY_MARK = "0x4000/0x4000"  # kube-proxy's masquerade mark/mask (flannel's trafficmngr.KubeProxyMark)
MULTICAST = "224.0.0.0/4"
MAX_JUMPS = 16  # how many copies of our jump rule ``remove`` deletes at most
MASQ_COMMENT = "flanneld masq"
FORWARD_COMMENT = "flanneld forward"


@dataclass(frozen=True)
class Rule:
    table: str
    chain: str
    spec: tuple[str, ...]


@dataclass(frozen=True)
class RuleSet:
    """Rules that live in ``own_chain`` (flushed on set-up) plus the jump into it from a built-in chain."""

    table: str
    own_chain: str
    rules: tuple[Rule, ...]


def masq_rules(cluster: IPv4Network, pod: IPv4Network, *, random_fully: bool = True) -> RuleSet:
    """Don't NAT pod↔cluster traffic; NAT what leaves the cluster, except multicast."""
    c, p = str(cluster), str(pod)
    comment = ("-m", "comment", "--comment", MASQ_COMMENT)
    masq = ("-j", "MASQUERADE", *(("--random-fully",) if random_fully else ()))
    chain = "FLANNEL-POSTRTG"
    specs = [
        ("POSTROUTING", (*comment, "-j", chain)),
        (chain, ("-m", "mark", "--mark", KUBE_PROXY_MARK, *comment, "-j", "RETURN")),
        (chain, ("-s", p, "-d", c, *comment, "-j", "RETURN")),
        (chain, ("-s", c, "-d", p, *comment, "-j", "RETURN")),
        (chain, ("!", "-s", c, "-d", p, *comment, "-j", "RETURN")),
        (chain, ("-s", c, "!", "-d", MULTICAST, *comment, *masq)),
        (chain, ("!", "-s", c, "-d", c, *comment, *masq)),
    ]
    return RuleSet("nat", chain, tuple(Rule("nat", ch, spec) for ch, spec in specs))


def forward_rules(cluster: IPv4Network) -> RuleSet:
    """Accept forwarded overlay traffic even where the FORWARD policy is DROP (Docker sets that)."""
    comment = ("-m", "comment", "--comment", FORWARD_COMMENT)
    chain = "FLANNEL-FWD"
    specs = [
        ("FORWARD", (*comment, "-j", chain)),
        (chain, ("-s", str(cluster), *comment, "-j", "ACCEPT")),
        (chain, ("-d", str(cluster), *comment, "-j", "ACCEPT")),
    ]
    return RuleSet("filter", chain, tuple(Rule("filter", ch, spec) for ch, spec in specs))


def _restore_args(spec: tuple[str, ...]) -> str:
    """iptables-restore's quoting: double quotes around arguments with spaces (our comments), nothing else."""
    return " ".join(f'"{arg}"' if " " in arg else arg for arg in spec)


def restore_payload(ruleset: RuleSet, existing: set[Rule]) -> str:
    """One transaction: delete what exists (so order is restored), then append everything."""
    lines = [f"*{ruleset.table}"]
    for rule in ruleset.rules:
        if rule in existing:
            lines.append(f"-D {rule.chain} {_restore_args(rule.spec)}")
        lines.append(f"-A {rule.chain} {_restore_args(rule.spec)}")
    lines.append("COMMIT")
    return "\n".join(lines) + "\n"


class Iptables:
    """The I/O half: runs the iptables binaries of the current network namespace."""

    def __init__(self, binary: str = "iptables") -> None:
        path = shutil.which(binary)
        if path is None:
            raise SetupError(f"{binary} not found: install iptables (Debian: apt-get install iptables)")
        self.binary = path
        self.restore = shutil.which(binary + "-restore") or binary + "-restore"

    def _run(self, *args: str, input: str | None = None) -> subprocess.CompletedProcess:
        return subprocess.run([self.binary, "--wait", *args], capture_output=True, text=True, timeout=30, input=input)

    def has_random_fully(self) -> bool:
        """``--random-fully`` needs iptables ≥ 1.6.2."""
        version = subprocess.run([self.binary, "--version"], capture_output=True, text=True, timeout=10).stdout
        try:
            numbers = tuple(int(x) for x in version.split()[1].lstrip("v").split(".")[:3])
        except (IndexError, ValueError):
            return False
        return numbers >= (1, 6, 2)

    def exists(self, rule: Rule) -> bool:
        return self._run("-t", rule.table, "-C", rule.chain, *rule.spec).returncode == 0

    def apply(self, ruleset: RuleSet) -> None:
        """Create or flush our chain, then (re)append every rule in order, atomically per table."""
        if self._run("-t", ruleset.table, "-S", ruleset.own_chain).returncode == 0:
            self._run("-t", ruleset.table, "-F", ruleset.own_chain)
        else:
            result = self._run("-t", ruleset.table, "-N", ruleset.own_chain)
            if result.returncode != 0:
                raise SetupError(f"iptables -t {ruleset.table} -N {ruleset.own_chain}: {result.stderr.strip()}")
        existing = {rule for rule in ruleset.rules if rule.chain != ruleset.own_chain and self.exists(rule)}
        result = subprocess.run([self.restore, "--noflush", "--wait"], input=restore_payload(ruleset, existing),
                                capture_output=True, text=True, timeout=30)
        if result.returncode != 0:
            raise SetupError(f"iptables-restore for {ruleset.own_chain} failed: {result.stderr.strip()}")

    def all_present(self, ruleset: RuleSet) -> bool:
        return all(self.exists(rule) for rule in ruleset.rules)

    def remove(self, ruleset: RuleSet) -> bool:
        """Undo ``apply``: unhook our chain from the built-in one, flush it, delete it. True if any of it was there.

        flanneld's nftables mode tries this too but leaves the jump (so ``-X`` fails) and looks for
        FLANNEL-FWD in ``nat`` instead of ``filter``; we remove both chains for real.
        """
        found = False
        for rule in ruleset.rules:
            if rule.chain == ruleset.own_chain:
                continue
            for _ in range(MAX_JUMPS):
                if self._run("-t", rule.table, "-D", rule.chain, *rule.spec).returncode != 0:
                    break
                found = True
        if self._run("-t", ruleset.table, "-F", ruleset.own_chain).returncode == 0:
            found = True
            result = self._run("-t", ruleset.table, "-X", ruleset.own_chain)
            if result.returncode != 0:
                raise SetupError(f"iptables -t {ruleset.table} -X {ruleset.own_chain}: {result.stderr.strip()}")
        return found

