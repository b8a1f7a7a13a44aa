"""lease.etcd.EtcdSession against a real etcd: failures come back as EtcdUnavailable, never as a
cancellation of the caller."""

from __future__ import annotations

import asyncio

import pytest

from lease.etcd import EtcdSession
from lease.options import EtcdOptions
from udpflannel.errors import EtcdUnavailable

pytestmark = [pytest.mark.etcd, pytest.mark.timeout(30)]


async def test_a_call_grpc_cancels_by_itself_raises_etcd_unavailable_and_leaves_the_caller_running(etcd):
    """grpc.aio raises CancelledError from a stream it cancelled itself (a LeaseKeepAlive on a member
    without a leader does it); that once ended the lease keeper without a word."""
    session = EtcdSession(EtcdOptions(etcd.endpoint, timeout=2))

    async def cancelled_by_grpc(client):
        raise asyncio.CancelledError()  # what grpc.aio's _raise_for_status raises for a locally cancelled call

    try:
        with pytest.raises(EtcdUnavailable, match="cancelled by gRPC"):
            await session.call(cancelled_by_grpc)
        assert asyncio.current_task().cancelling() == 0
        assert await session.call(lambda c: c.get(b"/any")) is None  # the session goes on
    finally:
        await session.close()


async def test_the_caller_s_own_cancellation_still_cancels(etcd):
    session = EtcdSession(EtcdOptions(etcd.endpoint, timeout=2))

    async def slow(client):
        await asyncio.sleep(30)

    try:
        task = asyncio.ensure_future(session.call(slow))
        await asyncio.sleep(0.3)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
    finally:
        await session.close()
