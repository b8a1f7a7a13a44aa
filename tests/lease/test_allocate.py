"""lease.allocate: the fast free-range arithmetic against the obvious walk, and the §4.1 order."""

from __future__ import annotations

import random
from collections import Counter
from ipaddress import IPv4Address, IPv4Network

import pytest
from hypothesis import given
from hypothesis import strategies as st

from lease.allocate import Create, Existing, Reuse, free_count, nth_free, pick_free, plan_acquire
from lease.config import parse_network_config
from tests.lease.strategies import slow_free, small_configs, taken_subnets
from udpflannel.errors import OutOfSubnets

ME = IPv4Address("192.168.1.10")
CFG = parse_network_config('{"Network":"10.5.0.0/16"}')


@given(st.data())
def test_free_arithmetic_matches_the_slow_walk(data):
    config = data.draw(small_configs())
    taken = data.draw(taken_subnets(config))
    free = slow_free(config, taken)
    assert free_count(config, taken) == len(free)
    for n in range(len(free)):
        assert nth_free(config, taken, n) == free[n]
    with pytest.raises(IndexError):
        nth_free(config, taken, len(free))


@given(st.data(), st.randoms(use_true_random=False))
def test_allocation_never_overlaps_an_existing_lease(data, rng):
    config = data.draw(small_configs())
    taken = data.draw(taken_subnets(config))
    existing = [Existing(f"k{i:03}", net, public_ip=IPv4Address("10.255.0.1")) for i, net in enumerate(taken)]
    try:
        plan = plan_acquire(config, existing, public_ip=ME, previous=None, rng=rng)
    except OutOfSubnets:
        assert slow_free(config, taken) == []
        return
    assert isinstance(plan, Create)
    got = plan.subnet
    assert got.prefixlen == config.subnet_len
    assert config.subnet_min <= got.network_address <= config.subnet_max
    assert not any(got.overlaps(t) for t in taken)


def test_draw_is_uniform_over_all_free_subnets_not_the_first_100():
    rng = random.Random(7)
    taken = [IPv4Network("10.5.1.0/24"), IPv4Network("10.5.16.0/20")]  # 1 + 16 of 255 taken
    counts = Counter(pick_free(CFG, taken, rng) for _ in range(238 * 60))
    assert len(counts) == 238  # every free subnet, including those far above SubnetMin
    assert min(counts.values()) > 25 and max(counts.values()) < 100  # expected 60 each
    assert IPv4Network("10.5.255.0/24") in counts


def test_out_of_subnets_is_clear():
    cfg = parse_network_config('{"Network":"10.5.0.0/28"}')  # three /30 candidates
    taken = [IPv4Network("10.5.0.0/28")]
    with pytest.raises(OutOfSubnets, match="out of subnets: all 3 /30 subnets"):
        pick_free(cfg, taken, random.Random(1))


def _rec(key, net, ip=ME, **kw):
    return Existing(key, IPv4Network(net), public_ip=IPv4Address(ip) if ip else None, **kw)


def test_reuse_first_record_with_our_public_ip_in_key_order():
    existing = [
        _rec("a", "10.5.3.0/24", "10.0.0.9"),
        _rec("b", "10.5.7.0/24"),
        _rec("c", "10.5.9.0/24"),
    ]
    plan = plan_acquire(CFG, existing, public_ip=ME, previous=IPv4Network("10.5.20.0/24"), rng=random.Random(0))
    assert plan == Reuse(existing[1])


def test_incompatible_records_with_our_ip_are_stale_and_not_reused():
    existing = [
        _rec("a", "10.5.0.0/24"),  # below SubnetMin
        _rec("b", "10.5.8.0/25"),  # wrong length
        _rec("c", "10.5.9.0/24", canonical=False),  # host bits / dual-stack key
        _rec("d", "10.5.10.0/24"),
    ]
    plan = plan_acquire(CFG, existing, public_ip=ME, previous=None, rng=random.Random(0))
    assert plan == Reuse(existing[3], stale=tuple(existing[:3]))


def test_previous_subnet_when_free_and_compatible():
    prev = IPv4Network("10.5.20.0/24")
    existing = [_rec("a", "10.5.3.0/24", "10.0.0.9"), _rec("b", "10.5.4.0/24", None)]
    assert plan_acquire(CFG, existing, public_ip=ME, previous=prev, rng=random.Random(0)) == Create(prev, "previous")


@pytest.mark.parametrize(
    "previous,holder",
    [
        ("10.5.20.0/24", "10.5.20.0/24"),  # taken (flanneld: equality)
        ("10.5.20.0/24", "10.5.16.0/20"),  # overlapped by a bigger lease (flanneld misses this)
        ("10.5.0.0/24", None),  # below SubnetMin
        ("10.5.20.0/25", None),  # wrong length
    ],
)
def test_previous_subnet_not_used_when_taken_or_incompatible(previous, holder):
    existing = [_rec("a", holder, "10.0.0.9")] if holder else []
    plan = plan_acquire(CFG, existing, public_ip=ME, previous=IPv4Network(previous), rng=random.Random(0))
    assert isinstance(plan, Create) and plan.why == "random"
    assert not plan.subnet.overlaps(IPv4Network(previous)) or holder is None
