"""An event loop on a thread of its own, for the control plane: etcd work that must not wait for the
data path.

On the daemon's loop every hop of an await chain waits for a whole loop iteration, and under full-speed
traffic an iteration is the data path's fd callbacks: 10-60 ms on a busy 2-core machine. A gRPC watch
needs several hops per message, so a node forwarding at full speed fell seconds behind 200 lease events
a second (a node without traffic kept up within 60 ms). On a loop of its own the control plane waits
only for the GIL, which the data path releases at each of its system calls; what it produces (route
events) is handed to the daemon's loop in batches with ``call_soon_threadsafe``.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Coroutine
from typing import Any, TypeVar

import uvloop

T = TypeVar("T")


class LoopThread:
    """``start()``, then ``await run(coro)`` from the caller's loop; ``stop()`` ends the thread."""

    def __init__(self, name: str) -> None:
        self.loop = uvloop.new_event_loop()
        self.leftover: list[str] = []  # tasks still running when the loop was stopped (a leak)
        self._thread = threading.Thread(target=self._serve, name=name, daemon=True)

    def start(self) -> LoopThread:
        self._thread.start()
        return self

    def _serve(self) -> None:
        asyncio.set_event_loop(self.loop)
        try:
            self.loop.run_forever()
        finally:
            leftover = [t for t in asyncio.all_tasks(self.loop) if not t.done()]
            self.leftover = sorted(f"{t.get_name()} ({getattr(t.get_coro(), '__qualname__', t.get_coro())})"
                                   for t in leftover)
            for task in leftover:
                task.cancel()
            if leftover:
                self.loop.run_until_complete(asyncio.wait(leftover, timeout=1))
            self.loop.close()

    async def run(self, coro: Coroutine[Any, Any, T]) -> T:
        """Run ``coro`` on this thread's loop and await its result from the caller's loop; cancelling the
        caller cancels it there."""
        return await asyncio.wrap_future(asyncio.run_coroutine_threadsafe(coro, self.loop))

    def tasks(self) -> int:
        """Tasks alive on this loop (for the daemon's gauge)."""
        return len(asyncio.all_tasks(self.loop)) if not self.loop.is_closed() else 0

    def stop(self, timeout: float = 2.0) -> bool:
        """Stop the loop (tasks still on it are cancelled and named in ``leftover``) and join the thread;
        False if it did not end."""
        if self._thread.is_alive():
            self.loop.call_soon_threadsafe(self.loop.stop)
            self._thread.join(timeout)
        elif self._thread.ident is None and not self.loop.is_closed():
            self.loop.close()  # never started (the daemon stopped before it needed etcd)
        return not self._thread.is_alive()
