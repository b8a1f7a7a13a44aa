"""The asyncio subnet manager the daemon uses: acquire and keep a lease, stream route events.

Usage::

    sm = SubnetManager(EtcdOptions("http://10.0.0.1:2379"), public_ip="192.168.1.10", previous_subnet=prev)
    config = await sm.get_config()         # the daemon retries this while it raises
    lease = await sm.acquire()             # Lease(subnet=10.5.35.0/24, ...)
    async for event in sm.events():        # LeaseAcquired, Snapshot, PeerAdded, PeerRemoved, LeaseLost...
        ...
    await sm.release()                     # optional: delete our key (flanneld never does)
    await sm.close()

**Records** are flanneld's, byte for byte (:mod:`lease.records`), created with the ``Version(key) == 0``
transaction on an etcd lease of ``lease_ttl`` (86400 s, like flanneld). A lost creation race is retried
with a fresh listing (flanneld exits). Acquisition order: the record holding our PublicIP, else the
previous subnet from subnet.env, else uniformly any free subnet (:mod:`lease.allocate`).

**Renewal uses etcd KeepAlive, once per period, not flanneld's re-grant.** The key keeps its etcd lease,
whose TTL stays 86400 s: a dead node's key still lingers 24 h exactly as with flanneld, but a renewal
writes nothing, so peers see no PUT event and no orphaned etcd lease is left behind each day (flanneld
grants a new lease per renewal and never revokes the old one). The KeepAlive is sent at
``expiry - renew_margin`` (``--subnet-lease-renew-margin``, 60 min by default: ~23 h after the grant);
a failed one is retried every minute until the lease would expire. A KeepAlive answered with TTL 0
means etcd no longer knows the lease: it counts as lost. Reusing our record after a restart also keeps
its existing etcd lease alive with a KeepAlive (no write when the value is already ours). A reservation
(a key without an etcd lease, set by an operator) is reused as a reservation and never renewed.

**Own key.** A watch on our key notices when it is deleted (expired, revoked, by hand) or overwritten by
someone else (another etcd lease or another PublicIP). Then ``LeaseLost`` is emitted and the manager
re-acquires (forever, with backoff), preferring the same subnet, and emits ``LeaseAcquired``. flanneld
exits with status 0 instead, and misses takeovers.

**Peers.** :meth:`SubnetManager.events` lists ``<prefix>/subnets/`` (a :class:`Snapshot`), then watches
from the listing's revision + 1 (:class:`PeerAdded`, :class:`PeerRemoved`); on a broken stream it
reconnects from the last revision seen, with backoff 100 ms doubling to 5 s; on compaction it re-lists
and emits a new Snapshot. Our own subnet is never a peer. Malformed records are logged and skipped, they
never remove routes (:mod:`lease.peers`). An unreachable etcd never raises out of the iterator: it waits.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable
from ipaddress import IPv4Address, IPv4Network

from aetcd.utils import prefix_range_end

from lease.allocate import Existing, Reuse, plan_acquire
from lease.config import NetworkConfig, parse_network_config
from lease.errors import ConfigError, ControlPlaneError, EtcdUnavailable, LeaseError
from lease.etcd import Backoff, Compacted, EtcdSession
from lease.events import ControlEvent, LeaseLost
from lease.lifecycle import RENEW, Lease, LeaseLifecycle, State
from lease.options import DEFAULT_PREFIX, EtcdOptions
from lease.peers import PeerTable
from lease.records import (
    LeaseAttrs,
    Malformed,
    clean_prefix,
    config_key,
    decode_lease_value,
    encode_lease_value,
    make_subnet_key,
    parse_subnet_key,
    subnets_dir,
)

log = logging.getLogger(__name__)

SUBNET_TTL = 24 * 3600
RACE_RETRIES = 50
_DELETE = 1  # mvccpb.Event.DELETE
_CLOSED = object()

__all__ = ["DEFAULT_PREFIX", "SUBNET_TTL", "Lease", "SubnetManager"]


class SubnetManager:
    """flanneld's etcd subnet manager for one node; see the module docstring for the semantics.

    ``etcd``: how to reach etcd (endpoints, TLS, auth, request timeout). ``renew_margin`` is in minutes
    like ``--subnet-lease-renew-margin``; ``rng`` (``random.Random``-like) drives the subnet draw and
    the race jitter. ``lease_ttl`` and ``renew_retry`` (seconds between failed renewals) exist for tests
    and unusual set-ups.
    """

    def __init__(
        self,
        etcd: EtcdOptions,
        prefix: str = DEFAULT_PREFIX,
        *,
        public_ip: IPv4Address | str,
        previous_subnet: IPv4Network | None = None,
        renew_margin: float = 60,
        rng: random.Random | None = None,
        lease_ttl: int = SUBNET_TTL,
        renew_retry: float = 60.0,
    ) -> None:
        try:
            self.public_ip = IPv4Address(public_ip)
        except ValueError:
            raise ConfigError("public-ip", f"{public_ip!r} is not an IPv4 address") from None
        if not 0 < renew_margin * 60 < lease_ttl:
            raise ConfigError(
                "subnet-lease-renew-margin",
                f"must be above 0 and below the lease TTL ({lease_ttl // 60} minutes), got {renew_margin}",
            )
        self._session = EtcdSession(etcd)
        self.prefix = clean_prefix(prefix)
        self._subnets = subnets_dir(self.prefix)
        self._previous = previous_subnet
        self._rng = rng if rng is not None else random.SystemRandom()
        self._ttl = lease_ttl
        self._lifecycle = LeaseLifecycle(renew_margin=renew_margin * 60, retry_interval=renew_retry)
        self._peers = PeerTable(self.prefix, own_ip=self.public_ip)
        self._queue: asyncio.Queue[object] = asyncio.Queue()
        self._own_rev = 0  # mod revision of our key as we last wrote or saw it
        self._keeper: asyncio.Task[None] | None = None
        self._watcher: asyncio.Task[None] | None = None
        self._closed = False

    # -- public API --------------------------------------------------------------------------------------

    @property
    def lease(self) -> Lease | None:
        """The lease held now (None before acquire() and while re-acquiring)."""
        return self._lifecycle.lease if self._lifecycle.state in (State.HELD, State.RENEWING) else None

    @property
    def expires_at_unix(self) -> float | None:
        """Wall-clock expiry of our etcd lease as last renewed (None: not held, or a reservation)."""
        expires = self._lifecycle.expires_at
        if self.lease is None or expires is None:
            return None
        return time.time() + (expires - self._now())

    @property
    def state(self) -> State:
        return self._lifecycle.state

    @property
    def etcd_endpoint(self) -> str:
        """The etcd endpoint in use (or to be tried next)."""
        return str(self._session.endpoint)

    @property
    def etcd_requests(self) -> dict[str, int]:
        """What this manager has asked etcd so far, by kind (see ``EtcdSession.requests``)."""
        return dict(self._session.requests)

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

    async def acquire(self) -> Lease:
        """Lease a subnet (once; afterwards the manager renews and re-acquires it on its own).

        Raises ConfigError, EtcdUnavailable, OutOfSubnets or LeaseError; it may be called again then.
        """
        if self._closed:
            raise LeaseError("the subnet manager is closed")
        if self._lifecycle.state is State.IDLE:
            self._lifecycle.start()
        elif self._lifecycle.state is not State.ACQUIRING or self._keeper is not None:
            raise LeaseError("acquire() was already called: the manager keeps the lease by itself")
        lease = await self._acquire_once(self._previous)
        self._hold(lease)
        self._keeper = asyncio.create_task(self._keep(), name="udpflannel-lease-keeper")
        self._keeper.add_done_callback(_log_crash)
        return lease

    async def events(self) -> AsyncIterator[ControlEvent]:
        """The control events for the dataplane, until close(). Iterate it once, after acquire()."""
        if self._lifecycle.lease is None:
            raise LeaseError("call acquire() before events()")
        if self._watcher is not None:
            raise LeaseError("events() can only be iterated once")
        self._watcher = asyncio.create_task(self._watch_peers(), name="udpflannel-lease-watch")
        while True:
            event = await self._queue.get()
            if event is _CLOSED:
                return
            yield event  # type: ignore[misc]

    async def release(self) -> None:
        """Stop keeping the lease and delete our key (if it is still ours); reservations stay."""
        lease = self._lifecycle.lease
        await _cancel(self._keeper)
        self._keeper = None
        if self._lifecycle.state is not State.CLOSED:
            self._lifecycle.close()
        if lease is None or lease.lease_id == 0:
            return
        key, rev = lease.key.encode(), self._own_rev
        await self._session.call(
            lambda c: c.transaction(
                compare=[c.transactions.mod(key) == rev], success=[c.transactions.delete(key)], failure=[]
            )
        )
        await self._revoke_quietly(lease.lease_id)
        log.info("released lease %s", lease.subnet)

    async def close(self) -> None:
        """Stop all background work and the etcd connection; ends the events() iterator."""
        if self._closed:
            return
        self._closed = True
        await _cancel(self._keeper)
        await _cancel(self._watcher)
        if self._lifecycle.state is not State.CLOSED:
            self._lifecycle.close()
        await self._session.close()
        self._queue.put_nowait(_CLOSED)

    async def __aenter__(self) -> SubnetManager:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    # -- acquisition -------------------------------------------------------------------------------------

    async def _acquire_once(self, previous: IPv4Network | None) -> Lease:
        config = await self.get_config()
        prefix = self._subnets.encode()
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
                lease = await self._reuse(config, found[plan.existing.key], target)
            else:
                target = plan.subnet
                if plan.why == "previous":
                    log.info("Found previously leased subnet (%s), reusing", target)
                else:
                    log.info("Picking subnet in range %s ... %s", config.subnet_min, config.subnet_max)
                lease = await self._create(config, target)
            if lease is not None:
                return lease
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

    async def _create(self, config: NetworkConfig, subnet: IPv4Network) -> Lease | None:
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
            await self._revoke_quietly(grant.id)
            raise
        if not ok:
            await self._revoke_quietly(grant.id)
            return None
        self._own_rev = responses[0].response_put.header.revision
        log.info("Allocated lease (ip: %s) to current node (%s)", subnet, self.public_ip)
        return Lease(subnet, self.public_ip, config, key, grant.id, grant.ttl)

    async def _reuse(self, config: NetworkConfig, kv, subnet: IPv4Network) -> Lease | None:
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
            self._own_rev = kv.mod_revision
            return Lease(subnet, self.public_ip, config, key, lease_id, ttl)
        ok, responses = await self._session.call(
            lambda c: c.transaction(
                compare=[c.transactions.mod(kv.key) == kv.mod_revision],
                success=[c.transactions.put(kv.key, value, lease=lease_id)],
                failure=[],
            )
        )
        if not ok:
            if granted:
                await self._revoke_quietly(lease_id)
            return None
        self._own_rev = responses[0].response_put.header.revision
        return Lease(subnet, self.public_ip, config, key, lease_id, ttl)

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

    async def _revoke_quietly(self, lease_id: int) -> None:
        try:
            await self._session.call(lambda c: c.revoke_lease(lease_id))
        except EtcdUnavailable as e:
            log.debug("could not revoke etcd lease %x: %s", lease_id, e)

    # -- keeping the lease -------------------------------------------------------------------------------

    def _now(self) -> float:
        return asyncio.get_running_loop().time()

    def _emit(self, events: Iterable[ControlEvent]) -> None:
        for event in events:
            self._queue.put_nowait(event)

    def _flush_lifecycle(self) -> None:
        while (event := self._lifecycle.next_event()) is not None:
            log.log(logging.WARNING if isinstance(event, LeaseLost) else logging.INFO, "%s", event)
            self._emit([event])

    def _hold(self, lease: Lease) -> None:
        self._lifecycle.acquired(lease, now=self._now())
        self._flush_lifecycle()
        self._emit(self._peers.set_own(lease.subnet))

    async def _keep(self) -> None:
        """Renew on the lifecycle's timer; on loss, tell the dataplane and re-acquire."""
        while True:
            lease = self._lifecycle.lease
            assert lease is not None
            losses: asyncio.Queue[str] = asyncio.Queue()
            watch = asyncio.create_task(self._watch_own(lease, self._own_rev + 1, losses))
            try:
                while self._lifecycle.state in (State.HELD, State.RENEWING):
                    timer = self._lifecycle.get_timer()
                    timeout = None if timer is None else max(0.0, timer - self._now())
                    try:
                        reason = await asyncio.wait_for(losses.get(), timeout)
                    except TimeoutError:
                        if self._lifecycle.handle_timer(now=self._now()) == RENEW:
                            await self._renew(lease)
                    else:
                        self._lifecycle.gone(reason, now=self._now())
                    self._flush_lifecycle()
            finally:
                await _cancel(watch)
            # The lost subnet stays excluded from the peers until we hold a lease again: our own record
            # (re-created meanwhile) must never become a route to ourselves.
            self._lifecycle.start()
            self._hold(await self._reacquire(lease.subnet))

    async def _renew(self, lease: Lease) -> None:
        try:
            ttl = await self._session.keepalive(lease.lease_id)
        except EtcdUnavailable as e:
            log.warning("Error renewing lease (trying again in %.0f s): %s", self._lifecycle.retry_interval, e)
            self._lifecycle.renew_failed(now=self._now())
            return
        if ttl <= 0:
            self._lifecycle.gone("etcd no longer knows our lease (expired or revoked)", now=self._now())
        else:
            self._lifecycle.renewed(ttl, now=self._now())
            log.info("Lease renewed, new expiration in %d s", ttl)

    async def _reacquire(self, previous: IPv4Network) -> Lease:
        backoff = Backoff()
        while True:
            try:
                return await self._acquire_once(previous)
            except (ConfigError, ControlPlaneError) as e:
                delay = backoff.next()
                log.warning("re-acquiring a lease failed (again in %.1f s): %s", delay, e)
                await asyncio.sleep(delay)

    def _loss_reason(self, lease: Lease, event) -> str | None:
        """Why a watch event on our own key means we lost it, or None if the key is still ours."""
        if event.type == _DELETE:
            return "own key deleted (lease expired or revoked, or deleted by hand)"
        attrs = decode_lease_value(event.kv.value)
        if event.kv.lease != lease.lease_id or not isinstance(attrs, LeaseAttrs) or attrs.public_ip != lease.public_ip:
            return f"own key taken over: now {event.kv.value.decode(errors='replace')} on etcd lease {event.kv.lease:x}"
        self._own_rev = event.kv.mod_revision
        return None

    async def _watch_own(self, lease: Lease, rev: int, losses: asyncio.Queue[str]) -> None:
        key = lease.key.encode()

        def judge(event) -> bool:
            reason = self._loss_reason(lease, event)
            if reason is not None:
                losses.put_nowait(reason)
            return reason is not None

        async def reread() -> int | None:  # after a compaction: judge the key as it is now
            kv = await self._session.call(lambda c: c.get(key))
            if kv is None:
                losses.put_nowait("own key deleted")
                return None
            return None if judge(_Put(kv)) else kv.header.revision + 1

        await self._follow("own lease watch", key, None, rev, reread, judge)

    # -- peers -------------------------------------------------------------------------------------------

    async def _watch_peers(self) -> None:
        prefix = self._subnets.encode()

        async def relist() -> int:
            listing = await self._session.call(lambda c: c.get_prefix(prefix))
            self._emit([self._peers.reset((kv.key, kv.value) for kv in listing)])
            return listing.header.revision + 1

        def apply(event) -> bool:
            if event.type == _DELETE:
                self._emit(self._peers.delete(event.kv.key))
            else:
                self._emit(self._peers.put(event.kv.key, event.kv.value))
            return False

        await self._follow("lease watch", prefix, prefix_range_end(prefix), None, relist, apply)

    async def _follow(
        self,
        what: str,
        key: bytes,
        range_end: bytes | None,
        rev: int | None,
        resync: Callable[[], Awaitable[int | None]],
        handle: Callable[[object], bool],
    ) -> None:
        """Watch from ``rev`` forever, calling ``handle`` per event until it returns True.

        ``resync`` runs first when ``rev`` is None and again after a compaction; it returns the revision
        to watch from, or None to stop. A failed stream or request is retried with :class:`Backoff`,
        from the last revision seen, so no event is lost across reconnects.
        """
        backoff = Backoff()
        while True:
            try:
                if rev is None:
                    rev = await resync()
                    if rev is None:
                        return
                    backoff.reset()
                async with contextlib.aclosing(
                    self._session.watch(key, range_end=range_end, start_revision=rev)
                ) as stream:
                    async for resp in stream:
                        backoff.reset()
                        for event in resp.events:
                            if handle(event):
                                return
                        rev = _advance(rev, resp)
            except Compacted as e:
                log.warning("%s: %s; resyncing", what, e)
                rev = None
            except EtcdUnavailable as e:
                delay = backoff.next()
                log.warning("%s: %s; reconnecting from rev %s in %.1f s", what, e, rev, delay)
                await asyncio.sleep(delay)
            except Exception:
                log.exception("%s failed; restarting it", what)
                await asyncio.sleep(backoff.next())


class _Put:
    """A PUT watch event rebuilt from a read, to judge our key with the same rule."""

    type = 0

    def __init__(self, kv) -> None:
        self.kv = kv


def _advance(rev: int, resp) -> int:
    """The revision to resume from after ``resp``: past its last event, or past a progress notification."""
    if resp.events:
        return max(rev, resp.events[-1].kv.mod_revision + 1)
    if not resp.created and resp.header.revision:
        return max(rev, resp.header.revision + 1)
    return rev


async def _cancel(task: asyncio.Task | None) -> None:
    """Cancel ``task`` and wait for it (without swallowing a cancellation of the caller)."""
    if task is None or task.done():
        return
    task.cancel()
    await asyncio.wait([task])


def _log_crash(task: asyncio.Task) -> None:
    if not task.cancelled() and task.exception() is not None:
        log.critical("%s crashed; the lease is no longer kept", task.get_name(), exc_info=task.exception())
