"""The packet trace's shell: who is listening, and a bounded queue for each.

Off and free by default: the engine's ``tracer`` is ``None`` unless a client is attached (or the daemon
runs with ``--trace``, which logs every packet), and the movers read it once per wake-up or batch,
never per packet. With clients attached, every packet is offered to :meth:`TraceHub.outbound` /
:meth:`TraceHub.inbound`; each client's :class:`~udpflannel.tracing.TraceFilter` decides, and an event
(``udpflannel.tracing``) is built once for all who want it. A client gets events through its own queue
of at most ``limit`` events: when it is full (the client reads too slowly) the event is dropped for
that client and counted, and the count is sent to it with the next events. The dataplane never waits
for a client.

The control socket serves ``GET /trace?host=&proto=&port=&peer=&drops=&count=&bytes=`` as a stream of
JSON lines (:meth:`TraceClient.lines`); ``udpflannel trace`` (``udpflannel/traceclient.py``) reads it.
"""

from __future__ import annotations

import asyncio
import base64
import json
import logging
import socket
import time
from collections import deque
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING

from udpflannel.routes import NextHop
from udpflannel.tracing import OUTER_NOTE, TraceEvent, TraceFilter, inbound_event, outbound_event

if TYPE_CHECKING:
    from udpflannel.engine import Engine

log = logging.getLogger("udpflannel.trace")

QUEUE_LIMIT = 256  # events waiting for one client; more are dropped for it (and counted)


class TraceClient:
    """One listener: its filter, its bounded queue, and what it lost to it."""

    def __init__(self, flt: TraceFilter, *, limit: int = QUEUE_LIMIT, count: int = 0, with_bytes: bool = False,
                 about: dict | None = None) -> None:
        self.filter = flt
        self.about = about or {}  # the node, for the stream's first line
        self.limit = limit
        self.count = count  # stop after this many events (0: never)
        self.with_bytes = with_bytes
        self.queue: deque[TraceEvent] = deque()
        self.dropped = 0
        self.sent = 0
        self._wake = asyncio.Event()

    def offer(self, event: TraceEvent) -> None:
        """Queue ``event`` unless the queue is full (then count it lost). Never blocks."""
        if len(self.queue) >= self.limit:
            self.dropped += 1
            return
        self.queue.append(event)
        if not self._wake.is_set():
            self._wake.set()

    async def lines(self) -> AsyncIterator[bytes]:
        """The stream: a ``hello`` line, then one JSON line per event and, once the queue is drained, a
        ``dropped`` line if the count of lost events grew; ends after ``count`` events. (Events are only
        lost while the queue is full, so a growth is always reported after the next drain.)"""
        yield _line({"hello": "udpflannel trace", **self.about, "filter": self.filter.as_query(),
                     "queue_limit": self.limit, "outer_headers": OUTER_NOTE})
        reported = 0

        def done() -> bool:
            return bool(self.count) and self.sent >= self.count

        while not done():
            self._wake.clear()
            while self.queue and not done():
                self.sent += 1
                yield _line(event_json(self.queue.popleft(), self.with_bytes))
            if self.dropped != reported:
                reported = self.dropped
                yield _line({"dropped": reported})
            if not self.queue and not done():
                await self._wake.wait()
        yield _line({"end": self.sent, "dropped": self.dropped})


def _line(value: dict) -> bytes:
    return json.dumps(value, separators=(",", ":")).encode() + b"\n"


def event_json(event: TraceEvent, with_bytes: bool) -> dict:
    out: dict = {"t": event.time_us, "dir": event.direction, "verdict": event.verdict,
                 "steps": [list(step) for step in event.steps]}
    if with_bytes:
        out["inner"] = base64.b64encode(event.inner).decode()
        out["outer"] = [base64.b64encode(d).decode() for d in event.outer()]
    return out


class TraceHub:
    """The node's trace: attach and detach clients, and the two calls the movers make."""

    def __init__(self, engine: Engine, *, tun_name: str = "flannel0", log_every_packet: bool = False) -> None:
        self.engine = engine
        self.tun_name = tun_name
        self.local: NextHop = engine.udp.getsockname()[:2]
        self.clients: list[TraceClient] = []
        self.log_every_packet = log_every_packet  # --trace: one log line per packet
        self._update()

    def _update(self) -> None:
        self.engine.tracer = self if self.clients or self.log_every_packet else None

    def attach(self, client: TraceClient) -> TraceClient:
        self.clients.append(client)
        self._update()
        return client

    def detach(self, client: TraceClient) -> None:
        if client in self.clients:
            self.clients.remove(client)
        self._update()

    async def stream(self, query: dict[str, str]) -> AsyncIterator[bytes]:
        """A client for the control socket's ``/trace`` (ValueError for a bad parameter, before anything
        is sent): attached when its stream starts, detached when it ends or the peer goes."""
        flt = TraceFilter.from_query(query)
        count = query.get("count", "0")
        if not count.isdigit():
            raise ValueError(f"count: {count!r} is not a whole number")
        about = {"tun": self.tun_name, "local": f"{self.local[0]}:{self.local[1]}", "node": socket.gethostname()}
        client = TraceClient(flt, count=int(count), with_bytes=query.get("bytes", "") == "1", about=about)
        return self._lines(client)

    async def _lines(self, client: TraceClient) -> AsyncIterator[bytes]:
        self.attach(client)  # here, not before: a stream never started never attaches (nor detaches)
        try:
            async for line in client.lines():
                yield line
        finally:
            self.detach(client)

    # -- from the movers (on the dataplane's loop) -------------------------------------------------------
    def _wanted(self, buf, n: int, peer: str | None, verdict: int) -> list[TraceClient]:
        return [c for c in self.clients if c.filter.matches(buf, n, peer, verdict)]

    def wants(self, buf, n: int, peer: str | None, verdict: int) -> bool:
        """Whether anyone (a client, or the ``--trace`` log) wants this packet."""
        return self.log_every_packet or any(c.filter.matches(buf, n, peer, verdict) for c in self.clients)

    def _deliver(self, wanted: list[TraceClient], event: TraceEvent) -> None:
        for client in wanted:
            client.offer(event)
        if self.log_every_packet:
            log.debug("%s", event.one_line())

    def outbound(self, buf, n: int, verdict: int, hop: NextHop | None, *, gso: tuple[int, int] | None = None,
                 cut: tuple | None = None) -> None:
        """A packet read from the TUN and decided. ``cut``: (buffer, start, count, size, last) of the
        datagrams a super-packet was cut into."""
        wanted = self._wanted(buf, n, hop[0] if hop else None, verdict)
        if not wanted and not self.log_every_packet:
            return
        segments: tuple[bytes, ...] = ()
        if cut is not None:
            mv, start, count, size, last = cut
            segments = tuple(bytes(mv[start + i * size:start + i * size + (size if i < count - 1 else last)])
                             for i in range(count))
        e = self.engine
        self._deliver(wanted, outbound_event(buf, n, verdict, hop, routes=e.routes, local=self.local,
                                             tun_name=self.tun_name, gso=gso, segments=segments,
                                             time_us=time.time_ns() // 1000))

    def inbound(self, buf, n: int, verdict: int, peer: NextHop, *, merged: int = 0) -> None:
        """A datagram (or a GRO run of ``merged`` datagrams, merged into ``buf``) received and decided."""
        wanted = self._wanted(buf, n, peer[0], verdict)
        if not wanted and not self.log_every_packet:
            return
        e = self.engine
        self._deliver(wanted, inbound_event(buf, n, verdict, peer, routes=e.routes, local=self.local,
                                            tun_mtu=e.tun_mtu, tun_name=self.tun_name, merged=merged,
                                            time_us=time.time_ns() // 1000))
