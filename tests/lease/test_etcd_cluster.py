"""lease.manager on a real 3-member etcd cluster (loopback): the member in use is killed, and a quorum
is lost and comes back (issue 17 item 1). The namespace version with daemons, pods and joins is
tests/test_etcd_cluster.py."""

from __future__ import annotations

import asyncio
import logging
import time

import pytest

from lease.events import LeaseAcquired, LeaseLost, PeerAdded
from lease.lifecycle import State
from lease.records import encode_lease_value
from tests.lease.conftest import need_etcd
from tests.lease.helpers import NETWORK_CONFIG, start_node
from udpflannel.lab.etcdcluster import EtcdCluster

pytestmark = [pytest.mark.etcd, pytest.mark.timeout(90)]

OUTAGE = 11.0  # quorum lost this long: longer than the short lease's TTL and the long one's renewal period


@pytest.fixture(scope="module")
def cluster():
    need_etcd()
    with EtcdCluster(["127.0.0.1"] * 3) as etcd:
        yield etcd


@pytest.fixture
def etcd(cluster):
    """Every test starts (and leaves, for the next one) with all three members running."""
    cluster.start()
    yield cluster
    cluster.start()


async def ctl(etcd: EtcdCluster, *args: str) -> str:
    return await asyncio.to_thread(etcd.ctl, *args)


async def put_peer(etcd: EtcdCluster, prefix: str, subnet: str, ip: str) -> None:
    await ctl(etcd, "put", f"{prefix}/subnets/{subnet}", encode_lease_value(ip).decode())


async def test_killing_the_member_in_use_moves_to_a_live_member_and_loses_no_event(etcd, prefix, managers, caplog):
    caplog.set_level(logging.INFO, logger="lease.etcd")
    await ctl(etcd, "put", f"{prefix}/config", NETWORK_CONFIG)
    m = managers("192.168.1.10", endpoints=etcd.endpoint)
    lease, tap, _ = await start_node(m)
    used = etcd.member_at(m.etcd_endpoint)
    role = "leader" if used is etcd.leader() else "follower"
    seen = len(tap.events)
    killed, killed_wall = time.monotonic(), time.time()
    used.kill()
    await asyncio.to_thread(etcd.wait_quorum)
    await put_peer(etcd, prefix, "10.5.77.0-24", "192.168.1.77")
    stamp, _ = await tap.wait_for(lambda e: isinstance(e, PeerAdded) and str(e.subnet) == "10.5.77.0/24", 10,
                                  since=seen)
    moved = [r.created - killed_wall for r in caplog.records
             if r.getMessage().startswith("etcd: using") and r.created >= killed_wall]
    assert m.etcd_endpoint != used.endpoint and etcd.member_at(m.etcd_endpoint).running
    assert tap.of(LeaseLost) == [] and m.state is State.HELD and m.lease == lease
    assert moved, "no switch to another member was logged"
    print(f"killed the member in use ({role}): moved to a live member {moved[0]:.2f} s after the kill, "
          f"event written after the kill seen at {stamp - killed:.2f} s; requests so far {m.etcd_requests}")
    await tap.close()


async def test_quorum_lost_then_back_renews_a_live_lease_and_reacquires_an_expired_one(etcd, prefix, managers, caplog):
    """Two leases through one outage: one renewed every 10 s with 20 s of TTL (a renewal falls in the
    outage and fails, the lease outlives it), one every 3 s with 6 s of TTL (it expires meanwhile)."""
    caplog.set_level(logging.INFO, logger="lease.manager")
    await ctl(etcd, "put", f"{prefix}/config", NETWORK_CONFIG)
    long = managers("192.168.1.10", endpoints=etcd.endpoint, lease_ttl=20, renew_margin=15 / 60, renew_retry=1.0)
    short = managers("192.168.1.11", endpoints=etcd.endpoint, lease_ttl=6, renew_margin=3 / 60, renew_retry=1.0)
    long_lease, long_tap, _ = await start_node(long)
    short_lease, short_tap, _ = await start_node(short)
    long_expiry = long.expires_at_unix
    down = [m for m in etcd.members if m is not etcd.leader()][:1] + [etcd.leader()]
    t0 = time.monotonic()
    for member in down:
        member.kill()
    await asyncio.sleep(OUTAGE)
    await asyncio.to_thread(etcd.restart, *down)
    back = time.monotonic()

    # the short lease expired while no leader could renew it; it comes back on the same subnet
    _, lost = await short_tap.wait_for(lambda e: isinstance(e, LeaseLost), 5)
    seen = next(i for i, (_, e) in enumerate(short_tap.events) if e is lost)
    stamp, again = await short_tap.wait_for(lambda e: isinstance(e, LeaseAcquired), 15, since=seen)
    assert again.subnet == short_lease.subnet and short.state is State.HELD
    # the long one failed a renewal in the outage and was renewed once the quorum was back
    failed = [r for r in caplog.records if r.getMessage().startswith("Error renewing lease")]
    assert failed, "no renewal fell in the outage: the test proves nothing"
    deadline = time.monotonic() + 15
    while not long.expires_at_unix or long.expires_at_unix <= long_expiry + 1:
        assert time.monotonic() < deadline, "the long lease was not renewed after the quorum came back"
        await asyncio.sleep(0.2)
    assert long_tap.of(LeaseLost) == [] and long.state is State.HELD and long.lease == long_lease
    listing = await ctl(etcd, "get", "--prefix", f"{prefix}/subnets/")
    assert f"{prefix}/subnets/{short_lease.subnet.network_address}-24" in listing
    print(f"quorum lost {back - t0:.1f} s (until the restarted members answered): short lease re-acquired on "
          f"the same subnet at {stamp - back:+.1f} s from then; long lease renewed; "
          f"{len(failed)} renewal(s) failed meanwhile")
    await long_tap.close()
    await short_tap.close()
