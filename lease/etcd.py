"""The etcd connection: which member to use, and every RPC through it, on top of aetcd (the endpoints,
TLS files and the channel itself are built by :mod:`lease.channel`).

With :mod:`lease.channel`, this is the only module of ``lease/`` that talks gRPC. :class:`EtcdSession`
runs single RPCs through :meth:`~EtcdSession.call`: every failure (refused, timed out, unauthenticated, ...) becomes
:class:`~lease.errors.EtcdUnavailable`, and the channel is dropped so that the next call starts a fresh
one (fresh channels also re-authenticate, which renews an expired auth token).

**Failover.** A fresh channel goes to a member that answers *and knows a leader*: every endpoint is
asked for its status (Maintenance.Status) at once, and one that answers with a leader is used. A
killed member (refused), a hung one (no answer within the probe timeout) and one cut off from the
majority (no leader) are thus all skipped in one step, instead of one failed request each; with no
member fit, the caller gets EtcdUnavailable and retries with its backoff. Each session starts its turn
at a random endpoint, so the nodes of a cluster spread their watches over the members. Each switch
is logged (``etcd: using <endpoint>``) with the member and leader IDs.

Watches use etcd's Watch RPC directly (:meth:`~EtcdSession.watch`), not aetcd's watcher, because we need
what aetcd hides: header revisions of progress notifications, the compaction revision, and an error
(not silence) when the server ends the stream. gRPC keepalive pings notice a server that stops answering.
"""

from __future__ import annotations

import asyncio
import logging
import random
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import TypeVar

import aetcd
import aetcd.exceptions
import grpc
import grpc.aio
from aetcd import rpc

from lease.channel import CHANNEL_OPTIONS, Client, Endpoint, parse_endpoints, tls_credentials
from lease.errors import ConfigError, EtcdUnavailable
from lease.options import EtcdOptions

log = logging.getLogger(__name__)

T = TypeVar("T")

PROBE_TIMEOUT = 2.0  # seconds a member may take to report its status before another one is used
PREFER_GRACE = 0.2  # seconds a fit member waits for an earlier one in the turn to answer


class CancelledByGrpc(Exception):
    """grpc.aio ended a call by cancelling it itself, and said so with ``asyncio.CancelledError``.

    A stream call whose request writer fails (say, the call already ended with an error, as etcd's
    LeaseKeepAlive does on a member without a leader) is cancelled locally by grpc.aio, and its reads
    then raise CancelledError. Let through, that CancelledError ended the task awaiting it, silently:
    the lease keeper died and the lease was never renewed again.
    """


_RPC_ERRORS = (aetcd.exceptions.ClientError, grpc.RpcError, asyncio.TimeoutError, OSError, CancelledByGrpc)


class Compacted(EtcdUnavailable):
    """A watch's start revision was compacted away: the watcher must re-list (resync)."""

    def __init__(self, revision: int) -> None:
        super().__init__(f"watch revision compacted (etcd compacted up to {revision})")
        self.revision = revision




class EtcdSession:
    """One logical connection to the etcd cluster, failing over between endpoints.

    ``requests`` counts what this session asked etcd, by kind: ``status`` probes, ``unary`` requests
    (lease refreshes included), ``keepalive`` lease refreshes, ``watch`` streams opened: an operator's
    (and a test's) view of the load one daemon puts on etcd.
    """

    def __init__(self, options: EtcdOptions) -> None:
        self.endpoints = parse_endpoints(options.endpoints)
        username, password = options.username, options.password
        if bool(username) != bool(password):
            raise ConfigError("etcd-password" if username else "etcd-username",
                              "--etcd-username and --etcd-password must be given together")
        self._credentials = tls_credentials(
            options.keyfile, options.certfile, options.cafile, https=any(e.tls for e in self.endpoints)
        )
        if self._credentials is None:
            log.info("connecting to etcd with http (no TLS)")
        self._username = username or None
        self._password = password or None
        self.timeout = options.timeout
        self.probe_timeout = min(options.timeout, PROBE_TIMEOUT)
        self.requests: Counter[str] = Counter()
        self._index = random.randrange(len(self.endpoints))  # where the turn starts: nodes spread over members
        self._used: Endpoint | None = None
        self._client: Client | None = None
        self._connecting = asyncio.Lock()
        self._closed = False

    @property
    def endpoint(self) -> Endpoint:
        return self.endpoints[self._index]

    async def _current(self) -> Client:
        async with self._connecting:
            if self._closed:
                raise EtcdUnavailable("the etcd session is closed")
            if self._client is None:
                self._client, self._index = await self._select()
            return self._client

    async def _select(self) -> tuple[Client, int]:
        """Probe every endpoint at once; keep the one that answers with a leader, close the others.

        Endpoints are preferred in turn from ``_index`` (a random one at first, so nodes spread over the
        members); a fit one later in the turn is taken when the earlier ones have failed, or have not
        answered within ``PREFER_GRACE`` of it.
        """
        n = len(self.endpoints)
        order = [(self._index + k) % n for k in range(n)]
        probes = {asyncio.ensure_future(self._probe(self.endpoints[i])): i for i in order}
        rank = {task: order.index(i) for task, i in probes.items()}
        pending = set(probes)
        fit: list[asyncio.Future] = []
        reasons: dict[int, str] = {}
        chosen: asyncio.Future | None = None
        loop = asyncio.get_running_loop()
        give_up_waiting: float | None = None
        try:
            while pending:
                timeout = None if give_up_waiting is None else max(0.0, give_up_waiting - loop.time())
                done, pending = await asyncio.wait(pending, timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
                for task in done:
                    if task.exception() is not None:
                        reasons[probes[task]] = _describe(task.exception())
                    elif task.result()[1].leader:
                        fit.append(task)
                    else:
                        reasons[probes[task]] = "no leader (cut off from the majority, or an election is under way)"
                if fit:
                    best = min(fit, key=rank.get)
                    if all(rank[t] > rank[best] for t in pending) or (give_up_waiting and loop.time() >= give_up_waiting):
                        break
                    give_up_waiting = give_up_waiting or loop.time() + PREFER_GRACE
            chosen = min(fit, key=rank.get) if fit else None
        finally:
            for task in probes:
                if task is not chosen:
                    _discard_probe(task)
        if chosen is None:
            self._index = (self._index + 1) % n
            detail = "; ".join(f"{self.endpoints[i]}: {reasons.get(i, 'no answer')}" for i in order)
            raise EtcdUnavailable(f"no etcd member answers with a leader ({detail})")
        client, status = chosen.result()
        index = probes[chosen]
        ep = self.endpoints[index]
        log.log(logging.INFO if ep != self._used or n > 1 else logging.DEBUG,
                "etcd: using %s (member %x, leader %x, raft term %d)", ep, status.header.member_id, status.leader,
                status.raftTerm)
        self._used = ep
        return client, index

    async def _probe(self, ep: Endpoint) -> tuple[Client, rpc.StatusResponse]:
        """A connected channel to ``ep`` and its status; closes the channel on any failure or cancellation."""
        client = Client(
            credentials=self._credentials,
            host=ep.host,
            port=ep.port,
            username=self._username,
            password=self._password,
            timeout=self.timeout,
            options=CHANNEL_OPTIONS,
        )
        try:
            await _bounded(client.connect(), self.timeout)
            self.requests["status"] += 1
            status = await _bounded(
                client.maintenancestub.Status(rpc.StatusRequest(), timeout=self.probe_timeout, metadata=client.metadata),
                self.probe_timeout + 0.5,
            )
        except BaseException:
            await _close_quietly(client)
            raise
        return client, status

    async def _drop(self, client: Client) -> None:
        """Forget ``client`` (if still current) and move to the next endpoint."""
        if self._client is client:
            self._client = None
            self._index = (self._index + 1) % len(self.endpoints)
        await _close_quietly(client)

    async def call(self, fn: Callable[[aetcd.Client], Awaitable[T]]) -> T:
        """Run one request; any failure raises :class:`EtcdUnavailable` and drops the channel.

        An expired auth token (etcd forgets idle ones after ``--auth-token-ttl``, 5 min by default,
        and renewals are ~23 h apart) is renewed by logging in again, once, at once.
        """
        for attempt in (1, 2):
            client = await self._current()
            ep = self.endpoint
            self.requests["unary"] += 1
            try:
                return await _bounded(fn(client), self.timeout + 1)
            except _RPC_ERRORS as e:
                await self._drop(client)
                if attempt == 1 and "invalid auth token" in str(e):
                    continue
                raise EtcdUnavailable(f"etcd at {ep}: {_describe(e)}") from e
        raise AssertionError("unreachable")

    async def keepalive(self, lease_id: int) -> int:
        """Refresh an etcd lease once (LeaseKeepAlive); returns its new TTL, 0 or less if it is gone."""

        async def once(client: aetcd.Client) -> int:
            self.requests["keepalive"] += 1
            stream = client.leasestub.LeaseKeepAlive(
                iter([rpc.LeaseKeepAliveRequest(ID=lease_id)]), timeout=self.timeout, metadata=client.metadata
            )
            try:
                async for reply in stream:
                    return reply.TTL
                raise EtcdUnavailable("keepalive stream ended without an answer")
            finally:
                stream.cancel()

        return await self.call(once)

    async def watch(
        self, key: bytes, *, range_end: bytes | None = None, start_revision: int
    ) -> AsyncIterator[rpc.WatchResponse]:
        """Yield the raw responses of one watch; raises :class:`Compacted` or :class:`EtcdUnavailable`.

        Use with ``contextlib.aclosing`` (or cancel the consuming task) so the stream is always closed.
        """
        client = await self._current()
        ep = self.endpoint
        self.requests["watch"] += 1
        metadata = tuple(client.metadata or ()) + (("hasleader", "true"),)
        call = rpc.WatchStub(client.channel).Watch(metadata=metadata)
        create = rpc.WatchCreateRequest(key=key, start_revision=start_revision, progress_notify=True)
        if range_end is not None:
            create.range_end = range_end
        reader: asyncio.Future | None = None
        try:
            await _bounded(call.write(rpc.WatchRequest(create_request=create)), self.timeout, call.cancel)
            resp = await _bounded(call.read(), self.timeout, call.cancel)
            if resp is not grpc.aio.EOF and not resp.created:
                raise EtcdUnavailable(f"etcd at {ep} did not confirm the watch")
            responses: asyncio.Queue = asyncio.Queue()
            reader = asyncio.ensure_future(_read_ahead(call, responses))
            while True:
                if isinstance(resp, BaseException):
                    raise resp
                if resp is grpc.aio.EOF:
                    raise EtcdUnavailable(f"etcd at {ep} ended the watch stream")
                if resp.compact_revision:
                    raise Compacted(resp.compact_revision)
                if resp.canceled:
                    raise EtcdUnavailable(f"etcd at {ep} canceled the watch: {resp.cancel_reason or 'no reason'}")
                yield resp
                resp = await responses.get()
        except _RPC_ERRORS as e:
            await self._drop(client)
            raise EtcdUnavailable(f"etcd at {ep}: {_describe(e)}") from e
        finally:
            call.cancel()
            if reader is not None:
                reader.cancel()

    async def close(self) -> None:
        async with self._connecting:
            self._closed = True
            client, self._client = self._client, None
        if client is not None:
            await _close_quietly(client)


class Backoff:
    """Reconnect delays: 100 ms doubling to 5 s (§5.1), back to 100 ms after a success."""

    def __init__(self, first: float = 0.1, cap: float = 5.0) -> None:
        self.first, self.cap = first, cap
        self._next = first

    def next(self) -> float:
        delay, self._next = self._next, min(self._next * 2, self.cap)
        return delay

    def reset(self) -> None:
        self._next = self.first


async def _read_ahead(call, out: asyncio.Queue) -> None:
    """Read a stream's messages into ``out`` as they come, ending with EOF or the error.

    The next read is asked for as soon as a message is in, not when the consumer is done with it: on a
    loop kept busy by the data path each hop costs a full loop iteration, and one read per consumer
    step (a task for it, a wait, a wake-up) let a busy node fall seconds behind a churning watch.
    The consumer awaits ``out`` (always cancellable); this task ends when the call is cancelled.
    """
    try:
        while True:
            message = await call.read()
            out.put_nowait(message)
            if message is grpc.aio.EOF:
                return
    except asyncio.CancelledError:
        task = asyncio.current_task()
        if task is not None and task.cancelling():
            raise  # cancelled by the consumer, which no longer reads ``out``
        out.put_nowait(CancelledByGrpc("the watch stream was cancelled by gRPC"))
    except Exception as e:
        out.put_nowait(e)


async def _bounded(aw: Awaitable[T], timeout: float | None, on_abort: Callable[[], object] | None = None) -> T:
    """Await ``aw`` for at most ``timeout`` seconds (None: no limit), and stay cancellable meanwhile.

    grpc.aio does not always honour a task cancellation while a stream read is pending, so ``aw`` runs
    in a task of its own which is never awaited after a timeout or a cancellation of ours: it is
    cancelled and abandoned, after ``on_abort`` (typically the gRPC call's own ``cancel``) has run.
    """
    task = asyncio.ensure_future(aw)
    try:
        done, _ = await asyncio.wait({task}, timeout=timeout)
    except asyncio.CancelledError:
        _abandon(task, on_abort)
        raise
    if not done:
        _abandon(task, on_abort)
        raise TimeoutError
    if task.cancelled():  # not by us: we were not cancelled, and we never cancel a task we still await
        raise CancelledByGrpc("the call was cancelled by gRPC")
    return task.result()


def _abandon(task: asyncio.Future, on_abort: Callable[[], object] | None) -> None:
    if on_abort is not None:
        on_abort()
    task.cancel()
    task.add_done_callback(lambda t: t.cancelled() or t.exception())  # nobody will read it


_CLOSING: set[asyncio.Future] = set()  # channels of unused probes being closed (a reference keeps the task alive)


def _discard_probe(task: asyncio.Future) -> None:
    """An unused probe: cancel it if still running (it then closes its channel), else close its channel."""

    def close(t: asyncio.Future) -> None:
        if not t.cancelled() and t.exception() is None:
            closing = asyncio.ensure_future(_close_quietly(t.result()[0]))
            _CLOSING.add(closing)
            closing.add_done_callback(_CLOSING.discard)

    if task.done():
        close(task)
    else:
        task.cancel()
        task.add_done_callback(close)


async def _close_quietly(client: aetcd.Client) -> None:
    try:
        await _bounded(client.close(), 2)
    except Exception as e:  # closing a broken channel must not hide the original error
        log.debug("closing etcd channel: %r", e)


def _describe(e: BaseException) -> str:
    if isinstance(e, grpc.aio.AioRpcError):
        details = e.details() or ""
        if "Connection refused" in details:  # gRPC's long "failed to connect to all addresses; ..." form
            details = "connection refused"
        return f"{e.code().name}: {details}"
    if isinstance(e, asyncio.TimeoutError):
        return "timed out"
    return str(e) or type(e).__name__
