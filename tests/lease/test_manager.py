"""lease.manager against a real etcd: records, acquisition, restarts, the watch and the own lease."""

from __future__ import annotations

import asyncio
import logging
import random
import time
from ipaddress import IPv4Address

import pytest

from lease.events import LeaseAcquired, LeaseLost, PeerAdded, PeerRemoved, Snapshot
from lease.lifecycle import State
from lease.records import encode_lease_value, make_subnet_key
from lease.subnetenv import format_subnet_env, read_previous_subnet, write_subnet_env
from tests.lease.helpers import (
    FLANNELD_VALUE,
    ME,
    VXLAN_VALUE,
    EventTap,
    net,
    put_config,
    put_record,
    start_node,
)
from udpflannel.errors import ConfigError, EtcdUnavailable, OutOfSubnets
from udpflannel.lab.etcd import free_port

pytestmark = [pytest.mark.etcd, pytest.mark.timeout(60)]

async def test_written_record_is_byte_identical_to_flanneld(kv, prefix, managers):
    await put_config(kv, prefix)
    lease = await managers(ME).acquire()
    stored = await kv.get(lease.key.encode())
    assert lease.key == f"{prefix}/subnets/{lease.subnet.network_address}-24"
    assert stored.value == b'{"PublicIP":"192.168.1.10","PublicIPv6":null}'
    assert stored.lease == lease.lease_id != 0
    info = await kv.get_lease_info(stored.lease, keys=False)
    assert info.grantedTTL == 86400 and info.TTL > 86000


async def test_flanneld_and_vxlan_records_are_understood(kv, prefix, managers):
    await put_config(kv, prefix, '{"Network":"10.5.0.0/22"}')  # candidates: 10.5.1.0 .. 10.5.3.0
    await put_record(kv, prefix, "10.5.1.0/24", FLANNELD_VALUE, ttl=600)
    await put_record(kv, prefix, "10.5.2.0/24", VXLAN_VALUE, ttl=600)
    await kv.put(f"{prefix}/subnets_old/10.5.3.0-24".encode(), FLANNELD_VALUE)  # not a lease
    lease, tap, snap = await start_node(managers(ME))
    assert lease.subnet == net("10.5.3.0/24")  # the only free one: both records are leases
    assert snap == Snapshot((
        PeerAdded(net("10.5.1.0/24"), IPv4Address("192.168.1.77")),
        PeerAdded(net("10.5.2.0/24"), IPv4Address("192.168.64.3")),
    ))
    await tap.close()


async def test_twenty_concurrent_managers_get_distinct_aligned_subnets(kv, prefix, managers, caplog):
    # 31 candidates for 20 nodes: many create races, each retried with a fresh listing.
    caplog.set_level(logging.INFO, logger="lease.acquire")
    await put_config(kv, prefix, '{"Network":"10.7.0.0/19"}')
    ms = [managers(f"192.168.2.{i}", rng=random.Random(i)) for i in range(1, 21)]
    t0 = time.monotonic()
    leases = await asyncio.wait_for(asyncio.gather(*(m.acquire() for m in ms)), 30)
    elapsed = time.monotonic() - t0
    subnets = [lease.subnet for lease in leases]
    assert len(set(subnets)) == 20
    for s in subnets:
        assert s.prefixlen == 24 and s.network_address in net("10.7.0.0/19")
        assert IPv4Address("10.7.1.0") <= s.network_address <= IPv4Address("10.7.31.0")
    listing = await kv.get_prefix(f"{prefix}/subnets/".encode())
    assert sorted((kv_.key.decode(), kv_.value) for kv_ in listing) == sorted(
        (lease.key, encode_lease_value(lease.public_ip)) for lease in leases
    )
    races = sum("taken meanwhile" in r.getMessage() for r in caplog.records)
    print(f"20 concurrent acquisitions took {elapsed:.2f} s with {races} lost races retried")


async def test_restart_with_same_public_ip_reuses_record_and_etcd_lease(kv, prefix, managers):
    await put_config(kv, prefix)
    first = managers(ME)
    lease = await first.acquire()
    before = await kv.get(lease.key.encode())
    await first.close()  # like flanneld: the record stays
    again = await managers(ME).acquire()
    after = await kv.get(lease.key.encode())
    assert again.subnet == lease.subnet and again.lease_id == lease.lease_id
    assert after.mod_revision == before.mod_revision  # reused with a KeepAlive, no write: peers see nothing


async def test_restart_reuses_a_flanneld_record_with_our_public_ip(kv, prefix, managers):
    await put_config(kv, prefix)
    lease_id = await put_record(kv, prefix, "10.5.42.0/24", b'{"PublicIP":"192.168.1.10","PublicIPv6":null}', 600)
    await asyncio.sleep(2)
    assert (await kv.get_lease_info(lease_id, keys=False)).TTL < 599
    lease = await managers(ME).acquire()
    assert lease.subnet == net("10.5.42.0/24") and lease.lease_id == lease_id
    assert lease.ttl == 600 and (await kv.get_lease_info(lease_id, keys=False)).TTL >= 599  # kept alive


async def test_restart_with_same_subnet_env_gets_same_subnet(kv, prefix, managers, tmp_path):
    await put_config(kv, prefix)
    first = managers(ME)
    lease = await first.acquire()
    env = tmp_path / "subnet.env"
    write_subnet_env(env, format_subnet_env(network=lease.config.network, subnet=lease.subnet, mtu=1472, ip_masq=False))
    await first.release()  # the record is gone: only subnet.env remembers
    assert await kv.get(lease.key.encode()) is None
    # A new PublicIP (say the node was re-addressed): subnet.env still brings the subnet back.
    again = await managers("192.168.1.11", previous_subnet=read_previous_subnet(env)).acquire()
    assert again.subnet == lease.subnet


async def test_watch_add_and_remove_arrive_within_one_second(kv, prefix, managers):
    await put_config(kv, prefix)
    _, tap, _ = await start_node(managers(ME))
    t0 = time.monotonic()
    lease_id = await put_record(kv, prefix, "10.5.200.0/24", FLANNELD_VALUE, ttl=600)
    t_add, _ = await tap.wait_for(lambda e: e == PeerAdded(net("10.5.200.0/24"), IPv4Address("192.168.1.77")), 1)
    t1 = time.monotonic()
    await kv.revoke_lease(lease_id)  # as when a peer's lease expires: a DELETE without value
    t_del, _ = await tap.wait_for(lambda e: e == PeerRemoved(net("10.5.200.0/24")), 1)
    print(f"add seen after {(t_add - t0) * 1000:.1f} ms, remove after {(t_del - t1) * 1000:.1f} ms")
    assert tap.error is None
    await tap.close()


async def test_malformed_records_remove_no_route(kv, prefix, managers):
    await put_config(kv, prefix)
    await put_record(kv, prefix, "10.5.10.0/24", FLANNELD_VALUE)
    await put_record(kv, prefix, "10.5.11.0/24", VXLAN_VALUE)
    _, tap, snap = await start_node(managers(ME))
    assert len(snap.peers) == 2
    for key, value in [
        ("10.5.12.0-32", FLANNELD_VALUE),  # a key Go cannot parse
        ("garbage", FLANNELD_VALUE),
        ("10.5.13.0-24", b"not json"),
        ("10.5.14.0-24", b'{"PublicIP":"fc00::1","PublicIPv6":null}'),
        ("10.5.10.0-24", b"{oops"),  # a known peer's record turned bad: its route stays
    ]:
        await kv.put(f"{prefix}/subnets/{key}".encode(), value)
    await kv.delete(f"{prefix}/subnets/garbage".encode())
    await put_record(kv, prefix, "10.5.15.0/24", FLANNELD_VALUE)  # a good record after the bad ones
    await tap.wait_for(lambda e: e == PeerAdded(net("10.5.15.0/24"), IPv4Address("192.168.1.77")), 1)
    assert tap.of(PeerRemoved) == []
    await tap.close()


@pytest.mark.parametrize("how", ["delete", "revoke"])
async def test_own_lease_deleted_or_revoked_is_reacquired(kv, prefix, managers, how):
    await put_config(kv, prefix)
    m = managers(ME)
    lease, tap, _ = await start_node(m)
    seen = len(tap.events)
    t0 = time.monotonic()
    if how == "delete":
        await kv.delete(lease.key.encode())
    else:
        await kv.revoke_lease(lease.lease_id)
    await tap.wait_for(lambda e: isinstance(e, LeaseLost) and e.subnet == lease.subnet, 2, since=seen)
    t_back, back = await tap.wait_for(lambda e: isinstance(e, LeaseAcquired), 2, since=seen)
    assert back.subnet == lease.subnet  # the previous subnet is preferred
    stored = await kv.get(lease.key.encode())
    assert stored.value == encode_lease_value(IPv4Address(ME)) and stored.lease == m.lease.lease_id != lease.lease_id
    assert m.state is State.HELD
    assert not any(isinstance(e, PeerAdded) and e.subnet == lease.subnet for _, e in tap.events)  # never a route to us
    print(f"own lease {how}d -> re-acquired in {(t_back - t0) * 1000:.1f} ms")
    await tap.close()


async def test_own_key_taken_over_moves_us_and_routes_to_the_new_holder(kv, prefix, managers):
    await put_config(kv, prefix)
    m = managers(ME)
    lease, tap, _ = await start_node(m)
    seen = len(tap.events)
    await kv.put(lease.key.encode(), FLANNELD_VALUE)  # someone else writes our key
    _, lost = await tap.wait_for(lambda e: isinstance(e, LeaseLost), 2, since=seen)
    assert "taken over" in lost.reason
    _, back = await tap.wait_for(lambda e: isinstance(e, LeaseAcquired) and e.subnet != lease.subnet, 2)
    await tap.wait_for(lambda e: e == PeerAdded(lease.subnet, IPv4Address("192.168.1.77")), 2)
    assert m.lease.subnet == back.subnet
    await tap.close()


async def test_renewal_keeps_the_lease_alive_with_keepalive(kv, prefix, managers):
    await put_config(kv, prefix)
    # A 4 s etcd lease and a 3 s margin: renewals are due every 2 s (never sooner than half the TTL).
    m = managers(ME, lease_ttl=4, renew_margin=0.05)
    lease = await m.acquire()
    tap = EventTap(m)
    before = await kv.get(lease.key.encode())
    await asyncio.sleep(5.5)  # longer than the TTL: without renewals the key would be gone
    after = await kv.get(lease.key.encode())
    assert after is not None and after.lease == lease.lease_id
    assert after.mod_revision == before.mod_revision  # KeepAlive: no PUT for the peers to see
    assert (await kv.get_lease_info(lease.lease_id, keys=False)).TTL >= 2
    assert tap.of(LeaseLost) == [] and m.state in (State.HELD, State.RENEWING)
    assert m.expires_at_unix is not None and 0 < m.expires_at_unix - time.time() <= 4
    await tap.close()


async def test_release_deletes_only_our_key(kv, prefix, managers):
    await put_config(kv, prefix)
    await put_record(kv, prefix, "10.5.10.0/24", FLANNELD_VALUE)
    m = managers(ME)
    lease = await m.acquire()
    await m.release()
    assert await kv.get(lease.key.encode()) is None
    assert await kv.get(make_subnet_key(prefix, net("10.5.10.0/24")).encode()) is not None


async def test_config_missing_invalid_and_out_of_subnets(kv, prefix, managers):
    m = managers(ME)
    with pytest.raises(ConfigError, match="not found in etcd"):
        await m.get_config()
    await put_config(kv, prefix, '{"Network":"10.5.0.0/16","Backend":{"Type":"vxlan"}}')
    with pytest.raises(ConfigError) as info:
        await m.acquire()
    assert info.value.field == "Backend.Type"
    await put_config(kv, prefix, '{"Network":"10.5.0.0/28"}')  # three /30 candidates
    for s in ("10.5.0.4/30", "10.5.0.8/30", "10.5.0.12/30"):
        await put_record(kv, prefix, s, FLANNELD_VALUE)
    with pytest.raises(OutOfSubnets, match="out of subnets"):
        await m.acquire()


async def test_unreachable_etcd_raises_etcd_unavailable_quickly(prefix):
    from lease.manager import EtcdSubnetManager
    from lease.options import EtcdOptions

    m = EtcdSubnetManager(EtcdOptions(f"http://127.0.0.1:{free_port()}", timeout=1.0), prefix, public_ip=ME)
    t0 = time.monotonic()
    with pytest.raises(EtcdUnavailable):
        await m.get_config()
    assert time.monotonic() - t0 < 3
    await m.close()
