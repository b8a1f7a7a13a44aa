"""A TCP proxy that can cut a client off its server: every connection dropped at once, new ones
refused, until restored. The tests put it between a node and etcd.

In-process (asyncio)::

    proxy = await TcpProxy("127.0.0.1", 2379).start()    # listens on 127.0.0.1:<free port>
    proxy.cut(); ...; proxy.restore(); await proxy.close()

In a namespace, as a process (``Netns.popen``): it prints ``listening`` once bound; SIGUSR1 cuts,
SIGUSR2 restores, SIGTERM ends it::

    python -m udpflannel.lab.tcpproxy LISTEN_HOST LISTEN_PORT TARGET_HOST TARGET_PORT
"""

from __future__ import annotations

import asyncio
import contextlib
import signal
import sys


class TcpProxy:
    """``listen_host``:<port> -> ``host``:``port``. ``cut()`` drops every connection and refuses new ones
    until ``restore()``."""

    def __init__(self, host: str, port: int, *, listen_host: str = "127.0.0.1", listen_port: int = 0) -> None:
        self.target = (host, port)
        self.listen_host = listen_host
        self.port = listen_port
        self._cut = False
        self._writers: set[asyncio.StreamWriter] = set()
        self._server: asyncio.Server | None = None

    @property
    def endpoint(self) -> str:
        return f"http://{self.listen_host}:{self.port}"

    async def start(self) -> TcpProxy:
        self._server = await asyncio.start_server(self._handle, self.listen_host, self.port)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if self._cut:
            writer.transport.abort()
            return
        try:
            up_reader, up_writer = await asyncio.open_connection(*self.target)
        except OSError:
            writer.transport.abort()
            return
        self._writers |= {writer, up_writer}

        async def pipe(src: asyncio.StreamReader, dst: asyncio.StreamWriter) -> None:
            with contextlib.suppress(OSError):
                while data := await src.read(65536):
                    dst.write(data)
                    await dst.drain()
            dst.transport.abort()

        await asyncio.gather(pipe(reader, up_writer), pipe(up_reader, writer))
        self._writers -= {writer, up_writer}

    def cut(self) -> None:
        self._cut = True
        for w in list(self._writers):
            w.transport.abort()

    def restore(self) -> None:
        self._cut = False

    async def close(self) -> None:
        self.cut()
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()


async def _serve(listen_host: str, listen_port: int, host: str, port: int) -> None:
    proxy = await TcpProxy(host, port, listen_host=listen_host, listen_port=listen_port).start()
    loop = asyncio.get_running_loop()
    stop = loop.create_future()
    loop.add_signal_handler(signal.SIGUSR1, proxy.cut)
    loop.add_signal_handler(signal.SIGUSR2, proxy.restore)
    loop.add_signal_handler(signal.SIGTERM, lambda: stop.done() or stop.set_result(None))
    print("listening", flush=True)
    try:
        await stop
    finally:
        await proxy.close()


if __name__ == "__main__":
    if len(sys.argv) != 5:
        raise SystemExit(__doc__)
    asyncio.run(_serve(sys.argv[1], int(sys.argv[2]), sys.argv[3], int(sys.argv[4])))
