"""flanneld's etcd subnet manager, the one implementation of :class:`lease.protocol.SubnetManager`
today: acquire and keep a lease, stream route events. Acquisition is :mod:`lease.acquire`, the watch
loop :mod:`lease.watch`; here are renewal, the own-key watch and the peers' watch, and the tasks that
run them, in one :class:`asyncio.TaskGroup`.

Usage::

    sm = EtcdSubnetManager(EtcdOptions("http://10.0.0.1:2379"), public_ip="192.168.1.10", previous_subnet=prev)
    config = await sm.get_config()         # the daemon retries this while it raises
    lease = await sm.acquire()             # Lease(subnet=10.5.35.0/24, ...)
    async for event in sm.events():        # LeaseAcquired, Snapshot, PeerAdded, PeerRemoved, LeaseLost...
        ...
    await sm.release()                     # optional: delete our key (flanneld never does)
    await sm.close()

**Records** are flanneld's, byte for byte (:mod:`lease.records`, acquired as :mod:`lease.acquire` says).

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
import logging
import random
import time
from collections.abc import AsyncIterator, Iterable
from ipaddress import IPv4Address, IPv4Network

from aetcd.utils import prefix_range_end

from lease.acquire import Acquirer
from lease.config import NetworkConfig
from lease.errors import ConfigError, ControlPlaneError, EtcdUnavailable, LeaseError
from lease.etcd import Backoff, EtcdSession
from lease.events import ControlEvent, LeaseLost
from lease.lifecycle import RENEW, Lease, LeaseLifecycle, State
from lease.options import DEFAULT_PREFIX, EtcdOptions
from lease.peers import PeerTable
from lease.records import LeaseAttrs, clean_prefix, decode_lease_value
from lease.watch import Put, follow

log = logging.getLogger(__name__)

SUBNET_TTL = 24 * 3600
_DELETE = 1  # mvccpb.Event.DELETE
_CLOSED = object()

__all__ = ["DEFAULT_PREFIX", "SUBNET_TTL", "Lease", "EtcdSubnetManager"]


class EtcdSubnetManager:
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
        self._acquirer = Acquirer(self._session, self.prefix, self.public_ip, ttl=lease_ttl,
                                  rng=rng if rng is not None else random.SystemRandom())
        self._previous = previous_subnet
        self._lifecycle = LeaseLifecycle(renew_margin=renew_margin * 60, retry_interval=renew_retry)
        self._peers = PeerTable(self.prefix, own_ip=self.public_ip)
        self._queue: asyncio.Queue[object] = asyncio.Queue()
        self._own_rev = 0  # mod revision of our key as we last wrote or saw it
        self._runner: asyncio.Task[None] | None = None  # the TaskGroup: keeping the lease, watching the peers
        self._watch_peers_now = asyncio.Event()  # events() is being iterated: start the peers' watch
        self._closed = False

    # -- public API (lease.protocol.SubnetManager) ---------------------------------------------------------

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
        return await self._acquirer.get_config()

    async def acquire(self) -> Lease:
        """Lease a subnet (once; afterwards the manager renews and re-acquires it on its own).

        Raises ConfigError, EtcdUnavailable, OutOfSubnets or LeaseError; it may be called again then.
        """
        if self._closed:
            raise LeaseError("the subnet manager is closed")
        if self._lifecycle.state is State.IDLE:
            self._lifecycle.start()
        elif self._lifecycle.state is not State.ACQUIRING or self._runner is not None:
            raise LeaseError("acquire() was already called: the manager keeps the lease by itself")
        lease, self._own_rev = await self._acquirer.acquire(self._previous)
        self._hold(lease)
        self._runner = asyncio.create_task(self._run(), name="udpflannel-lease")
        self._runner.add_done_callback(_log_crash)
        return lease

    async def events(self) -> AsyncIterator[ControlEvent]:
        """The control events for the dataplane, until close(). Iterate it once, after acquire()."""
        if self._lifecycle.lease is None:
            raise LeaseError("call acquire() before events()")
        if self._watch_peers_now.is_set():
            raise LeaseError("events() can only be iterated once")
        self._watch_peers_now.set()
        while True:
            event = await self._queue.get()
            if event is _CLOSED:
                return
            yield event  # type: ignore[misc]

    async def release(self) -> None:
        """Stop keeping the lease and delete our key (if it is still ours); reservations stay."""
        lease = self._lifecycle.lease
        await self._stop()
        if self._lifecycle.state is not State.CLOSED:
            self._lifecycle.close()
        if lease is None:
            return
        await self._acquirer.release(lease, self._own_rev)
        if lease.lease_id:
            log.info("released lease %s", lease.subnet)

    async def close(self) -> None:
        """Stop all background work and the etcd connection; ends the events() iterator."""
        if self._closed:
            return
        self._closed = True
        await self._stop()
        if self._lifecycle.state is not State.CLOSED:
            self._lifecycle.close()
        await self._session.close()
        self._queue.put_nowait(_CLOSED)

    async def __aenter__(self) -> EtcdSubnetManager:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    # -- the tasks ---------------------------------------------------------------------------------------

    async def _run(self) -> None:
        """Keep the lease, and once events() is iterated watch the peers too; one cancels both."""
        async with asyncio.TaskGroup() as tasks:
            tasks.create_task(self._keep(), name="udpflannel-lease-keeper")
            await self._watch_peers_now.wait()
            tasks.create_task(self._watch_peers(), name="udpflannel-lease-watch")

    async def _stop(self) -> None:
        """Cancel the tasks and wait for them (without swallowing a cancellation of the caller)."""
        runner, self._runner = self._runner, None
        if runner is not None and not runner.done():
            runner.cancel()
            await asyncio.wait([runner])

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
            async with asyncio.TaskGroup() as tasks:
                watch = tasks.create_task(self._watch_own(lease, self._own_rev + 1, losses))
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
                watch.cancel()
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
                lease, self._own_rev = await self._acquirer.acquire(previous)
                return lease
            except (ConfigError, ControlPlaneError) as e:
                delay = backoff.next()
                log.warning("re-acquiring a lease failed (again in %.1f s): %s", delay, e)
                await asyncio.sleep(delay)

    # -- watching our own key ----------------------------------------------------------------------------

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
            return None if judge(Put(kv)) else kv.header.revision + 1

        await follow(self._session, "own lease watch", key, None, rev, reread, judge)

    # -- the peers ---------------------------------------------------------------------------------------

    async def _watch_peers(self) -> None:
        prefix = self._acquirer.subnets.encode()

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

        await follow(self._session, "lease watch", prefix, prefix_range_end(prefix), None, relist, apply)


def _log_crash(task: asyncio.Task) -> None:
    if not task.cancelled() and task.exception() is not None:
        log.critical("%s crashed; the lease is no longer kept", task.get_name(), exc_info=task.exception())
