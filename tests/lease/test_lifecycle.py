"""lease.lifecycle: walk every transition with fake time (no sleeps)."""

from __future__ import annotations

from ipaddress import IPv4Address, IPv4Network

import pytest

from lease.config import parse_network_config
from lease.events import LeaseAcquired, LeaseLost
from lease.lifecycle import RENEW, TRANSITIONS, Input, Lease, LeaseLifecycle, State
from udpflannel.errors import LeaseError

SUBNET = IPv4Network("10.5.35.0/24")
IP = IPv4Address("192.168.1.10")
LEASE = Lease(SUBNET, IP, parse_network_config('{"Network":"10.5.0.0/16"}'), "/k", 42, 86400)
HOUR = 3600.0


def held(now=0.0) -> LeaseLifecycle:
    lc = LeaseLifecycle(renew_margin=HOUR)
    lc.start()
    lc.acquired(LEASE, now=now)
    assert lc.next_event() == LeaseAcquired(SUBNET, IP)
    return lc


def test_renewal_is_due_at_expiry_minus_margin_and_rearms():
    lc = held(now=100.0)
    assert lc.state is State.HELD
    assert lc.get_timer() == 100.0 + 86400 - HOUR  # ~23 h, like flanneld
    assert lc.handle_timer(now=1000.0) is None  # early wake-up: nothing to do
    assert lc.handle_timer(now=lc.get_timer()) == RENEW
    assert lc.state is State.RENEWING and lc.get_timer() is None
    now = 100.0 + 86400 - HOUR
    lc.renewed(86400, now=now)
    assert lc.state is State.HELD
    assert lc.expires_at == now + 86400 and lc.get_timer() == now + 86400 - HOUR
    assert lc.next_event() is None  # a renewal tells the dataplane nothing


def test_failed_renewals_retry_every_minute_until_expiry_then_lost():
    lc = held(now=0.0)
    now = lc.get_timer()
    assert lc.handle_timer(now=now) == RENEW
    while True:
        lc.renew_failed(now=now)
        assert lc.state is State.RENEWING
        assert lc.get_timer() == min(now + 60.0, 86400.0)
        now = lc.get_timer()
        if lc.handle_timer(now=now) != RENEW:
            break
    assert now == 86400.0
    assert lc.state is State.LOST
    assert lc.next_event() == LeaseLost(SUBNET, "lease expired: it could not be renewed in time")
    assert lc.get_timer() is None


@pytest.mark.parametrize("during_renewal", [False, True])
def test_gone_then_reacquired(during_renewal):
    lc = held()
    if during_renewal:
        assert lc.handle_timer(now=lc.get_timer()) == RENEW
    lc.gone("own key deleted", now=5.0)
    assert lc.state is State.LOST
    assert lc.next_event() == LeaseLost(SUBNET, "own key deleted")
    lc.start()
    assert lc.state is State.ACQUIRING
    other = Lease(IPv4Network("10.5.36.0/24"), IP, LEASE.config, "/k2", 43, 86400)
    lc.acquired(other, now=6.0)
    assert lc.state is State.HELD and lc.lease == other
    assert lc.next_event() == LeaseAcquired(other.subnet, IP)


def test_short_ttl_never_renews_sooner_than_half_of_it():
    lc = LeaseLifecycle(renew_margin=HOUR)
    lc.start()
    lc.acquired(Lease(SUBNET, IP, LEASE.config, "/k", 1, 10), now=0.0)
    assert lc.get_timer() == 5.0


def test_reservation_is_never_renewed():
    lc = LeaseLifecycle(renew_margin=HOUR)
    lc.start()
    lc.acquired(Lease(SUBNET, IP, LEASE.config, "/k", 0, None), now=0.0)
    assert lc.get_timer() is None and lc.expires_at is None
    assert lc.handle_timer(now=1e12) is None


def test_invalid_transitions_raise_and_close_is_always_allowed():
    lc = LeaseLifecycle(renew_margin=HOUR)
    with pytest.raises(LeaseError):
        lc.renewed(10, now=0.0)
    with pytest.raises(LeaseError):
        lc.acquired(LEASE, now=0.0)
    lc.close()
    assert lc.state is State.CLOSED
    assert all((s, Input.CLOSE) in TRANSITIONS for s in State)


def test_every_transition_in_the_table_is_reachable_by_this_suite():
    # The table is small on purpose; this pins it so a new edge comes with a test above.
    assert len(TRANSITIONS) == 9 + len(State)
