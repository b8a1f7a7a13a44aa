"""lease.manager when etcd goes away: compaction while cut off, etcd killed or frozen for 10 s.

Each test has an etcd of its own (``fresh_etcd``): they stop, freeze or compact it.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from ipaddress import IPv4Address

import aetcd
import pytest

from lease.events import LeaseLost, PeerAdded, PeerRemoved, Snapshot
from lease.lifecycle import State
from lease.records import make_subnet_key
from tests.lease.helpers import FLANNELD_VALUE, ME, net, put_config, put_record, start_node
from udpflannel.lab.tcpproxy import TcpProxy

pytestmark = [pytest.mark.etcd, pytest.mark.timeout(60)]

OUTAGE = 10.0  # seconds etcd is down or frozen
RECOVERY = 8.0  # reconnect backoff is capped at 5 s; allow for etcd's own start-up


@pytest.fixture
def etcd(fresh_etcd):
    return fresh_etcd


def value(ip: str) -> bytes:
    return b'{"PublicIP":"%s","PublicIPv6":null}' % ip.encode()


def key(prefix: str, subnet: str) -> bytes:
    return make_subnet_key(prefix, net(subnet)).encode()


async def two_peers(kv, prefix) -> None:
    await put_config(kv, prefix)
    await put_record(kv, prefix, "10.5.10.0/24", value("192.168.1.77"))
    await put_record(kv, prefix, "10.5.11.0/24", value("192.168.1.78"))


async def change_everything(kv, prefix) -> None:
    """A peer moves to a new PublicIP, one leaves, one arrives."""
    await kv.put(key(prefix, "10.5.10.0/24"), value("192.168.1.99"))
    await kv.delete(key(prefix, "10.5.11.0/24"))
    await kv.put(key(prefix, "10.5.12.0/24"), value("192.168.1.79"))


EXPECTED_CHANGES = [
    PeerAdded(net("10.5.10.0/24"), IPv4Address("192.168.1.99")),
    PeerRemoved(net("10.5.11.0/24")),
    PeerAdded(net("10.5.12.0/24"), IPv4Address("192.168.1.79")),
]


@contextlib.asynccontextmanager
async def cut_off_node(etcd, kv, prefix, managers, meanwhile):
    """A node (through a TcpProxy) with two peers; it is cut off while ``meanwhile()`` changes etcd.

    Yields the manager, its lease, its EventTap and the index of the first event after the cut.
    """
    proxy = await TcpProxy(etcd.host, etcd.port).start()
    try:
        await two_peers(kv, prefix)
        m = managers(ME, endpoints=proxy.endpoint)
        lease, tap, _ = await start_node(m)
        seen = len(tap.events)
        proxy.cut()
        await change_everything(kv, prefix)
        await meanwhile()
        proxy.restore()
        yield m, lease, tap, seen
        assert tap.error is None
        await tap.close()
    finally:
        await proxy.close()


async def test_changes_while_cut_off_arrive_one_by_one_from_the_last_revision(etcd, kv, prefix, managers):
    async def refused():
        await asyncio.sleep(0.5)  # the node retries meanwhile, and is refused

    async with cut_off_node(etcd, kv, prefix, managers, refused) as (_, _, tap, seen):
        for expected in EXPECTED_CHANGES:
            await tap.wait_for(lambda e, x=expected: e == x, RECOVERY, since=seen)
        assert [e for _, e in tap.events[seen:]] == EXPECTED_CHANGES  # no resync was needed


async def test_compaction_while_cut_off_is_resynced(etcd, kv, prefix, managers):
    async def compact():
        await asyncio.to_thread(etcd.compact)  # the history the node would resume from is gone

    async with cut_off_node(etcd, kv, prefix, managers, compact) as (m, lease, tap, seen):
        t0 = time.monotonic()
        stamp, snap = await tap.wait_for(lambda e: isinstance(e, Snapshot), RECOVERY, since=seen)
        assert snap == Snapshot((
            PeerAdded(net("10.5.10.0/24"), IPv4Address("192.168.1.99")),  # the changed PublicIP is noticed
            PeerAdded(net("10.5.12.0/24"), IPv4Address("192.168.1.79")),
        ))
        print(f"resynced {(stamp - t0) * 1000:.0f} ms after reconnecting")
        # The watch goes on from the resync's revision.
        seen = len(tap.events)
        await put_record(kv, prefix, "10.5.13.0/24", FLANNELD_VALUE)
        await tap.wait_for(lambda e: e == PeerAdded(net("10.5.13.0/24"), IPv4Address("192.168.1.77")), 1, since=seen)
        # The own-key watch went through the compaction too, and found the key still ours.
        assert tap.of(LeaseLost) == [] and m.state is State.HELD and m.lease == lease


@pytest.mark.parametrize("how", ["killed", "frozen"])
async def test_etcd_down_for_10s_loses_no_event(etcd, kv, prefix, managers, how):
    await two_peers(kv, prefix)
    m = managers(ME)
    lease, tap, _ = await start_node(m)
    seen = len(tap.events)
    if how == "killed":
        etcd.kill()  # a crash; it comes back on the same data directory
    else:
        etcd.pause()  # SIGSTOP: connections stay open, nothing answers
    await asyncio.sleep(OUTAGE)
    if how == "killed":
        await asyncio.to_thread(etcd.start)
    else:
        etcd.resume()
    # Write the changes at once, before the node has had a chance to reconnect.
    async with aetcd.Client(host=etcd.host, port=etcd.port, timeout=5) as writer:
        t0 = time.monotonic()
        await change_everything(writer, prefix)
        last = 0.0
        for expected in EXPECTED_CHANGES:
            stamp, _ = await tap.wait_for(lambda e, x=expected: e == x, RECOVERY, since=seen)
            last = max(last, stamp)
        print(f"etcd {how} {OUTAGE:.0f} s: all changes seen {(last - t0) * 1000:.0f} ms after they were written")
        got = [e for _, e in tap.events[seen:] if isinstance(e, PeerAdded | PeerRemoved)]
        assert got == EXPECTED_CHANGES  # each exactly once, in order
        assert tap.of(LeaseLost) == [] and m.state is State.HELD
        assert (await writer.get(lease.key.encode())).lease == lease.lease_id
    assert tap.error is None
    await tap.close()
