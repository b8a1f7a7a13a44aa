"""The masquerade and forward rules in the mode the network config asks for (flanneld's trafficmngr).

iptables (``udpflannel.masq``) by default, nftables (``udpflannel.nft``) with ``"EnableNFTables": true``.
At start-up the *other* mode's leftovers are removed first, as flanneld does, so a node switched from
one mode to the other never masquerades twice. ``install`` is called again when the lease moves, and
returns what the resync (``udpflannel.resync``) keeps in place.
"""

from __future__ import annotations

import logging
from functools import partial
from ipaddress import IPv4Network

from udpflannel.errors import SetupError
from udpflannel.masq import Iptables, forward_rules, masq_rules
from udpflannel.nft import TABLE, Nftables, forward_chain, masq_chain
from udpflannel.resync import Kept

log = logging.getLogger(__name__)


class TrafficRules:
    """One mode's rules for this node. Blocking (iptables, libnftables): call it from a worker thread."""

    def __init__(self, *, nftables: bool, ip_masq: bool, forward: bool, fully_random_disable: bool) -> None:
        self.nftables_mode = nftables
        self.ip_masq = ip_masq
        self.forward = forward
        self.fully_random_disable = fully_random_disable
        self._iptables: Iptables | None = None
        self._nft: Nftables | None = None
        self._fully_random: bool | None = None

    # -- start-up clean-up of the unused mode -------------------------------------------------------------
    def clean_up_other_mode(self, network: IPv4Network, subnet: IPv4Network) -> None:
        """Never fatal: flanneld logs a failed clean-up and goes on (it only needs to be tried)."""
        try:
            if self.nftables_mode:
                self._remove_iptables_chains(network, subnet)
            else:
                self._delete_nft_tables()
        except SetupError as exc:
            log.warning("could not clean up the unused traffic mode: %s", exc)

    def _remove_iptables_chains(self, network: IPv4Network, subnet: IPv4Network) -> None:
        try:
            iptables = Iptables()
        except SetupError:
            log.debug("no iptables binary: no iptables chains to clean up")
            return
        for ruleset in (masq_rules(network, subnet), forward_rules(network)):
            if iptables.remove(ruleset):
                log.info("nftables mode: removed the iptables chain %s left by iptables mode", ruleset.own_chain)

    def _delete_nft_tables(self) -> None:
        try:
            nft = Nftables()
        except SetupError as exc:
            log.debug("no nftables binding (%s): no nftables tables to clean up", exc)
            return
        for table in nft.delete_flannel_tables():
            log.info("iptables mode: deleted the nftables table %s left by nftables mode", table)

    # -- the rules -----------------------------------------------------------------------------------------
    def install(self, network: IPv4Network, subnet: IPv4Network) -> list[Kept]:
        """Masquerade rules (with --ip-masq), then forward rules; returns what the resync keeps."""
        if not (self.ip_masq or self.forward):
            return []
        if self.nftables_mode:
            return self._install_nftables(network, subnet)
        return self._install_iptables(network, subnet)

    def _install_iptables(self, network: IPv4Network, subnet: IPv4Network) -> list[Kept]:
        if self._iptables is None:
            try:
                self._iptables = Iptables()
            except SetupError:
                if self.ip_masq:
                    raise
                log.warning("iptables not found: FORWARD accept rules not installed (--iptables-forward-rules=false silences this)")
                return []
            self._fully_random = self._iptables.has_random_fully() and not self.fully_random_disable
        iptables = self._iptables
        rulesets = []
        if self.ip_masq:
            rulesets.append(masq_rules(network, subnet, random_fully=bool(self._fully_random)))
        if self.forward:
            rulesets.append(forward_rules(network))
        for ruleset in rulesets:
            iptables.apply(ruleset)
            log.info("iptables: %s in place (%d rules)", ruleset.own_chain, len(ruleset.rules))
        return [Kept(f"iptables chain {r.own_chain}", partial(iptables.all_present, r), partial(iptables.apply, r))
                for r in rulesets]

    def _install_nftables(self, network: IPv4Network, subnet: IPv4Network) -> list[Kept]:
        if self._nft is None:
            self._nft = Nftables()  # a SetupError here names the package to install
            if self.ip_masq and not self.fully_random_disable:
                self._fully_random = self._nft.has_fully_random()
                if not self._fully_random:
                    log.warning("nftables: masquerade fully-random is not supported by this kernel; using plain masquerade")
        nft = self._nft
        chains = []
        if self.ip_masq:
            chains.append(masq_chain(network, subnet, fully_random=bool(self._fully_random)))
        if self.forward:
            chains.append(forward_chain(network))
        nft.apply(chains)  # one transaction, the masquerade chain first
        log.info("nftables: table ip %s in place (%s)", TABLE, ", ".join(f"{c.name}: {len(c.rules)} rules" for c in chains))
        return [Kept(f"nftables table ip {TABLE}", partial(nft.all_present, chains), partial(nft.apply, chains))]
