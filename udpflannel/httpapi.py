"""The daemon's small HTTP surface: ``/healthz``, ``/readyz`` (flanneld's texts), ``/metrics``, ``/status``,
and on the control socket ``/trace``.

Served on ``--healthz-ip:--healthz-port`` when the port is non-zero (flanneld's default is off), and
always on a unix control socket, which ``udpflannel status`` and ``udpflannel trace`` read. GET only,
one request per connection, bounded in size and time: this is a health endpoint, not a web server.
A :class:`Stream` route answers with lines for as long as it yields them, until the client hangs up
(``udpflannel trace``); streams still open when the server closes are cancelled.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import json
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from urllib.parse import parse_qsl

from udpflannel import ctlsocket

log = logging.getLogger(__name__)

MAX_REQUEST = 8192
REQUEST_TIMEOUT = 5.0


@dataclass
class Response:
    status: int
    body: bytes
    content_type: str = "text/plain; charset=utf-8"


@dataclass
class Stream:
    """A streaming route: ``open(query)`` returns the lines to send (ValueError: a bad request, with
    its message, before anything is sent)."""

    open: Callable[[dict[str, str]], Awaitable[AsyncIterator[bytes]]]
    content_type: str = "application/x-ndjson"


Handler = Callable[[], Response | Awaitable[Response]] | Stream
REASONS = {200: "OK", 404: "Not Found", 405: "Method Not Allowed", 400: "Bad Request", 503: "Service Unavailable"}


def json_response(value: object, status: int = 200) -> Response:
    return Response(status, json.dumps(value, indent=2, sort_keys=True).encode() + b"\n", "application/json")


class HttpApi:
    """Routes paths to handlers; start TCP and/or unix listeners; ``close()`` stops them."""

    def __init__(self, routes: dict[str, Handler], *, unix_only: frozenset[str] = frozenset()) -> None:
        """``unix_only``: paths served on the control socket only (not on the TCP health port)."""
        self.routes = routes
        self.unix_only = unix_only
        self.servers: list[asyncio.AbstractServer] = []
        self._unix_paths: list[tuple[str, tuple[int, int]]] = []
        self._streams: set[asyncio.Task] = set()

    async def serve_tcp(self, host: str, port: int) -> None:
        self.servers.append(await asyncio.start_server(functools.partial(self._handle, unix=False), host, port))
        log.info("health/metrics on http://%s:%d/", host, port)

    async def serve_unix(self, path: str) -> None:
        """Serve on ``path``; SetupError if a running daemon already answers there (see ctlsocket)."""
        sock, identity = ctlsocket.claim(path)
        try:
            self.servers.append(await asyncio.start_unix_server(self._handle, sock=sock))
        except BaseException:
            sock.close()
            ctlsocket.release(path, identity)
            raise
        self._unix_paths.append((path, identity))

    async def close(self) -> None:
        for server in self.servers:
            server.close()
        for task in list(self._streams):
            task.cancel()
        if self._streams:
            await asyncio.wait(list(self._streams), timeout=1)
        for server in self.servers:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(server.wait_closed(), 1)
        for path, identity in self._unix_paths:
            ctlsocket.release(path, identity)  # only our own socket, never one that replaced it
        self._unix_paths.clear()
        self.servers.clear()

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, *, unix: bool = True) -> None:
        try:
            head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), REQUEST_TIMEOUT)
            response = await self._respond(head[:MAX_REQUEST], unix)
        except (TimeoutError, asyncio.IncompleteReadError, asyncio.LimitOverrunError, ConnectionError):
            response = Response(400, b"bad request\n")
        try:
            if isinstance(response, Response):
                writer.write(
                    f"HTTP/1.1 {response.status} {REASONS.get(response.status, '')}\r\n"
                    f"Content-Type: {response.content_type}\r\nContent-Length: {len(response.body)}\r\n"
                    "Connection: close\r\n\r\n".encode() + response.body
                )
                await writer.drain()
            else:
                await self._stream(*response, reader, writer)
        except ConnectionError:
            pass
        finally:
            writer.close()

    async def _stream(self, content_type: str, lines: AsyncIterator[bytes], reader: asyncio.StreamReader,
                      writer: asyncio.StreamWriter) -> None:
        """Send ``lines`` until they end or the client hangs up (seen at once, even while no line is due)."""
        task = asyncio.current_task()
        assert task is not None
        self._streams.add(task)
        hangup = asyncio.ensure_future(reader.read())  # the client sends nothing more: EOF means it left

        def cancel_on_hangup(_: asyncio.Future) -> None:
            task.cancel()

        hangup.add_done_callback(cancel_on_hangup)
        try:
            writer.write(f"HTTP/1.1 200 OK\r\nContent-Type: {content_type}\r\nConnection: close\r\n\r\n".encode())
            async for line in lines:
                writer.write(line)
                await writer.drain()
        except asyncio.CancelledError:
            if not hangup.done() or hangup.cancelled():  # not the client leaving: the server closing
                raise
            task.uncancel()
        finally:
            hangup.remove_done_callback(cancel_on_hangup)
            hangup.cancel()
            await lines.aclose()  # type: ignore[attr-defined]
            self._streams.discard(task)

    async def _respond(self, head: bytes, unix: bool) -> Response | tuple[str, AsyncIterator[bytes]]:
        parts = head.split(b"\r\n", 1)[0].split()
        if len(parts) != 3:
            return Response(400, b"bad request\n")
        method, (target, _, query) = parts[0], parts[1].decode("latin-1").partition("?")
        handler = self.routes.get(target)
        if handler is None or (target in self.unix_only and not unix):
            return Response(404, b"not found\n")
        if method not in (b"GET", b"HEAD"):
            return Response(405, b"method not allowed\n")
        if isinstance(handler, Stream):
            try:
                return handler.content_type, await handler.open(dict(parse_qsl(query)))
            except ValueError as exc:
                return Response(400, f"{exc}\n".encode())
        result = handler()
        return await result if asyncio.iscoroutine(result) else result  # type: ignore[return-value]


async def get(path: str, *, unix_socket: str | None = None, host: str = "127.0.0.1", port: int = 0,
              timeout: float = 5.0) -> tuple[int, bytes]:
    """A minimal client for ``udpflannel status`` and the tests: (status code, body)."""
    if unix_socket:
        with ctlsocket.reachable(unix_socket) as address:
            reader, writer = await asyncio.wait_for(asyncio.open_unix_connection(address), timeout)
    else:
        reader, writer = await asyncio.wait_for(asyncio.open_connection(host, port), timeout)
    try:
        writer.write(f"GET {path} HTTP/1.1\r\nHost: udpflannel\r\nConnection: close\r\n\r\n".encode())
        await writer.drain()
        raw = await asyncio.wait_for(reader.read(), timeout)
    finally:
        writer.close()
    head, _, body = raw.partition(b"\r\n\r\n")
    return int(head.split()[1]), body
