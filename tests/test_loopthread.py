"""udpflannel.loopthread: the control plane's own event loop on a thread (in-process, no root)."""

from __future__ import annotations

import asyncio
import threading

import pytest

from udpflannel.loopthread import LoopThread


@pytest.fixture
def thread():
    t = LoopThread("test-control").start()
    yield t
    t.stop()


async def test_run_returns_the_result_computed_on_the_other_thread(thread):
    async def where() -> str:
        return threading.current_thread().name

    assert await thread.run(where()) == "test-control"


async def test_an_exception_on_the_other_loop_reaches_the_caller(thread):
    async def fail() -> None:
        raise ValueError("from the control loop")

    with pytest.raises(ValueError, match="from the control loop"):
        await thread.run(fail())


async def test_cancelling_the_caller_cancels_the_coroutine_on_the_other_loop(thread):
    started, cancelled = threading.Event(), threading.Event()

    async def forever() -> None:
        started.set()
        try:
            await asyncio.sleep(60)
        except asyncio.CancelledError:
            cancelled.set()
            raise

    task = asyncio.ensure_future(thread.run(forever()))
    await asyncio.to_thread(started.wait, 5)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert await asyncio.to_thread(cancelled.wait, 5)


def test_stop_names_the_tasks_left_running_and_ends_the_thread():
    t = LoopThread("test-leak").start()
    asyncio.run_coroutine_threadsafe(asyncio.sleep(60), t.loop)
    assert t.stop() is True
    assert len(t.leftover) == 1 and "sleep" in t.leftover[0]
    assert t.loop.is_closed()


def test_stop_closes_the_loop_of_a_thread_never_started():
    t = LoopThread("test-unused")
    assert t.stop() is True and t.loop.is_closed() and t.tasks() == 0
