"""Acquisition: lease a subnet in etcd once, as flanneld does, with flanneld's records byte for byte.

Records (:mod:`lease.records`) are created with the ``Version(key) == 0`` transaction on an etcd lease
of ``ttl`` (86400 s, like flanneld). A lost creation race is retried with a fresh listing (flanneld
exits). Order (:mod:`lease.allocate`): the record holding our PublicIP, else the previous subnet from
subnet.env, else uniformly any free subnet. Reusing our record after a restart keeps its existing
etcd lease alive with a KeepAlive (no write when the value is already ours); a reservation (a key
without an etcd lease, set by an operator) is reused as a reservation.
"""

from __future__ import annotations

import asyncio
import logging
import random
from collections.abc import Iterable
from ipaddress import IPv4Address, IPv4Network

from lease.allocate import Existing, Reuse, plan_acquire
from lease.config import NetworkConfig, parse_network_config
from lease.errors import ConfigError, EtcdUnavailable, LeaseError
from lease.etcd import EtcdSession
from lease.lifecycle import Lease
from lease.records import (
    LeaseAttrs,
    Malformed,
    config_key,
    decode_lease_value,
    encode_lease_value,
    make_subnet_key,
    parse_subnet_key,
    subnets_dir,
)

log = logging.getLogger(__name__)

RACE_RETRIES = 50


class Acquirer:
    """Acquires, and on request releases, this node's subnet under ``prefix`` (already clean)."""

    def __init__(self, session: EtcdSession, prefix: str, public_ip: IPv4Address, *, ttl: int,
                 rng: random.Random) -> None:
        self._session, self.prefix, self.public_ip, self._ttl, self._rng = session, prefix, public_ip, ttl, rng
        self.subnets = subnets_dir(prefix)  # <prefix>/subnets, where every node's record lives

    async def get_config(self) -> NetworkConfig:
        """Read and validate ``<prefix>/config``: ConfigError if missing or invalid, EtcdUnavailable."""
        key = config_key(self.prefix)
        kv = await self._session.call(lambda c: c.get(key.encode()))
        if kv is None:
            raise ConfigError(
                "config",
                f"{key} not found in etcd; create it with the v3 API, e.g. "
                f"etcdctl put {key} '{{\"Network\": \"10.5.0.0/16\", \"Backend\": {{\"Type\": \"udp\"}}}}'",
            )
        return parse_network_config(kv.value)


    async def acquire(self, previous: IPv4Network | None) -> tuple[Lease, int]:
        """Lease a subnet: the lease, and the mod revision of our key as written (for the own-key watch
        and a release). Raises ConfigError, EtcdUnavailable, OutOfSubnets or LeaseError."""
        config = await self.get_config()
        prefix = self.subnets.encode()
        for attempt in range(1, RACE_RETRIES + 1):
            listing = await self._session.call(lambda c: c.get_prefix(prefix))
            found = {kv.key.decode(errors="replace"): kv for kv in listing}
            plan = plan_acquire(
                config, list(self._existing(found)), public_ip=self.public_ip, previous=previous, rng=self._rng
            )
            for stale in plan.stale:
                await self._delete_stale(found[stale.key], config)
            if isinstance(plan, Reuse):
                target = plan.existing.subnet
                held = await self._reuse(config, found[plan.existing.key], target)
            else:
                target = plan.subnet
                if plan.why == "previous":
                    log.info("Found previously leased subnet (%s), reusing", target)
                else:
                    log.info("Picking subnet in range %s ... %s", config.subnet_min, config.subnet_max)
                held = await self._create(config, target)
            if held is not None:
                return held
            log.info("subnet %s was taken meanwhile (attempt %d); trying again", target, attempt)
            await asyncio.sleep(self._rng.randrange(50) / 1000 * min(attempt, 5))
        raise LeaseError(f"lost the race for a subnet {RACE_RETRIES} times in a row; is etcd overloaded?")

    def _existing(self, found: dict) -> Iterable[Existing]:
        for name, kv in found.items():
            parsed = parse_subnet_key(self.prefix, name)
            if isinstance(parsed, Malformed):
                log.warning("Ignoring bad subnet node: %s", parsed.reason)
                continue
            attrs = decode_lease_value(kv.value)
            yield Existing(
                key=name,
                subnet=parsed.subnet,
                canonical=not (parsed.host_bits or parsed.dual_stack),
                public_ip=attrs.public_ip if isinstance(attrs, LeaseAttrs) else None,
            )

    async def _create(self, config: NetworkConfig, subnet: IPv4Network) -> tuple[Lease, int] | None:
        key = make_subnet_key(self.prefix, subnet)
        value = encode_lease_value(self.public_ip)
        grant = await self._session.call(lambda c: c.lease(self._ttl))
        try:
            ok, responses = await self._session.call(
                lambda c: c.transaction(
                    compare=[c.transactions.version(key.encode()) == 0],
                    success=[c.transactions.put(key.encode(), value, lease=grant.id)],
                    failure=[],
                )
            )
        except EtcdUnavailable:
            await self.revoke_quietly(grant.id)
            raise
        if not ok:
            await self.revoke_quietly(grant.id)
            return None
        log.info("Allocated lease (ip: %s) to current node (%s)", subnet, self.public_ip)
        return Lease(subnet, self.public_ip, config, key, grant.id, grant.ttl), responses[0].response_put.header.revision

    async def _reuse(self, config: NetworkConfig, kv, subnet: IPv4Network) -> tuple[Lease, int] | None:
        """Keep the record that holds our PublicIP: KeepAlive its etcd lease, rewrite the value if needed."""
        log.info("Found lease (ip: %s) for current IP (%s), reusing", subnet, self.public_ip)
        key = kv.key.decode()
        value = encode_lease_value(self.public_ip)
        lease_id, ttl, granted = kv.lease, None, False
        if lease_id:
            ttl = await self._session.keepalive(lease_id)
            if ttl <= 0:  # expired meanwhile: attach a fresh lease
                grant = await self._session.call(lambda c: c.lease(self._ttl))
                lease_id, ttl, granted = grant.id, grant.ttl, True
        if kv.value == value and not granted:
            return Lease(subnet, self.public_ip, config, key, lease_id, ttl), kv.mod_revision
        ok, responses = await self._session.call(
            lambda c: c.transaction(
                compare=[c.transactions.mod(kv.key) == kv.mod_revision],
                success=[c.transactions.put(kv.key, value, lease=lease_id)],
                failure=[],
            )
        )
        if not ok:
            if granted:
                await self.revoke_quietly(lease_id)
            return None
        return Lease(subnet, self.public_ip, config, key, lease_id, ttl), responses[0].response_put.header.revision

    async def _delete_stale(self, kv, config: NetworkConfig) -> None:
        log.warning(
            "lease %s holds our PublicIP but is not compatible with the config (%s/%d), deleting",
            kv.key.decode(errors="replace"), config.network, config.subnet_len,
        )
        await self._session.call(
            lambda c: c.transaction(
                compare=[c.transactions.mod(kv.key) == kv.mod_revision],
                success=[c.transactions.delete(kv.key)],
                failure=[],
            )
        )

    async def release(self, lease: Lease, rev: int) -> None:
        """Delete our key if it is still ours (its mod revision is still ``rev``) and revoke its etcd
        lease; a reservation (no etcd lease) stays."""
        if lease.lease_id == 0:
            return
        key = lease.key.encode()
        await self._session.call(
            lambda c: c.transaction(
                compare=[c.transactions.mod(key) == rev], success=[c.transactions.delete(key)], failure=[]
            )
        )
        await self.revoke_quietly(lease.lease_id)

    async def revoke_quietly(self, lease_id: int) -> None:
        try:
            await self._session.call(lambda c: c.revoke_lease(lease_id))
        except EtcdUnavailable as e:
            log.debug("could not revoke etcd lease %x: %s", lease_id, e)
