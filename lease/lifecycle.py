"""The own lease's lifecycle as a small explicit state machine (sans-IO).

Everything that changes :attr:`LeaseLifecycle.state` goes through :data:`TRANSITIONS`; the asyncio shell
(:mod:`lease.manager`) feeds inputs with ``now=`` (its loop clock) and reads back:

- :meth:`~LeaseLifecycle.get_timer`: when to call :meth:`~LeaseLifecycle.handle_timer` next;
- :meth:`~LeaseLifecycle.handle_timer`: returns :data:`RENEW` when a renewal RPC is due;
- :meth:`~LeaseLifecycle.next_event`: ``LeaseAcquired`` / ``LeaseLost`` for the dataplane.

States::

    IDLE --start--> ACQUIRING --acquired--> HELD --renew_due--> RENEWING --renewed--> HELD
                                             |                     |  ^ renew_failed (retry in 60 s)
                                             +------gone-----------+--+
                                             v                     v expired
                                            LOST <-----------------+
    LOST --start--> ACQUIRING            (any) --close--> CLOSED

Renewal is due at ``expires_at - renew_margin`` (but never sooner than half the remaining TTL), like
flanneld's timer; a failed renewal is retried every ``retry_interval`` until the lease expires. A lease
without TTL (a reservation: a key with no etcd lease) is never renewed and never expires.
"""

from __future__ import annotations

import enum
from collections import deque
from dataclasses import dataclass
from ipaddress import IPv4Address, IPv4Network

from lease.config import NetworkConfig
from lease.errors import LeaseError
from lease.events import LeaseAcquired, LeaseLost

RENEW = "renew"


@dataclass(frozen=True, slots=True)
class Lease:
    """The subnet this node holds. ``lease_id`` 0 and ``ttl`` None mean a reservation (no etcd lease)."""

    subnet: IPv4Network
    public_ip: IPv4Address
    config: NetworkConfig
    key: str
    lease_id: int
    ttl: int | None


class State(enum.Enum):
    IDLE = "idle"
    ACQUIRING = "acquiring"
    HELD = "held"
    RENEWING = "renewing"
    LOST = "lost"
    CLOSED = "closed"


class Input(enum.Enum):
    START = "start"
    ACQUIRED = "acquired"
    RENEW_DUE = "renew_due"
    RENEWED = "renewed"
    RENEW_FAILED = "renew_failed"
    EXPIRED = "expired"
    GONE = "gone"
    CLOSE = "close"


TRANSITIONS: dict[tuple[State, Input], State] = {
    (State.IDLE, Input.START): State.ACQUIRING,
    (State.LOST, Input.START): State.ACQUIRING,
    (State.ACQUIRING, Input.ACQUIRED): State.HELD,
    (State.HELD, Input.RENEW_DUE): State.RENEWING,
    (State.RENEWING, Input.RENEWED): State.HELD,
    (State.RENEWING, Input.RENEW_FAILED): State.RENEWING,
    (State.RENEWING, Input.EXPIRED): State.LOST,
    (State.HELD, Input.GONE): State.LOST,
    (State.RENEWING, Input.GONE): State.LOST,
    **{(s, Input.CLOSE): State.CLOSED for s in State},
}


class LeaseLifecycle:
    def __init__(self, *, renew_margin: float, retry_interval: float = 60.0) -> None:
        if renew_margin <= 0:
            raise ValueError("renew_margin must be positive")
        self.renew_margin = renew_margin
        self.retry_interval = retry_interval
        self.state = State.IDLE
        self.lease: Lease | None = None
        self.expires_at: float | None = None
        self._timer: float | None = None
        self._events: deque[LeaseAcquired | LeaseLost] = deque()

    # -- the only place the state changes --------------------------------------------------------------

    def _go(self, event: Input) -> None:
        target = TRANSITIONS.get((self.state, event))
        if target is None:
            raise LeaseError(f"internal error: lease transition {event.value!r} not allowed in {self.state.value!r}")
        self.state = target

    # -- inputs ----------------------------------------------------------------------------------------

    def start(self) -> None:
        """We begin (re-)acquiring."""
        self._go(Input.START)
        self._timer = None

    def acquired(self, lease: Lease, *, now: float) -> None:
        self._go(Input.ACQUIRED)
        self.lease = lease
        self._arm(lease.ttl, now)
        self._events.append(LeaseAcquired(lease.subnet, lease.public_ip))

    def renewed(self, ttl: int, *, now: float) -> None:
        self._go(Input.RENEWED)
        self._arm(ttl, now)

    def renew_failed(self, *, now: float) -> None:
        self._go(Input.RENEW_FAILED)
        assert self.expires_at is not None
        self._timer = min(now + self.retry_interval, self.expires_at)

    def gone(self, reason: str, *, now: float) -> None:
        """The key was deleted, taken over, or etcd says our lease no longer exists."""
        self._lose(Input.GONE, reason)

    def close(self) -> None:
        self._go(Input.CLOSE)
        self._timer = None

    def handle_timer(self, *, now: float) -> str | None:
        """Call at or after :meth:`get_timer`; returns :data:`RENEW` when the caller must renew now."""
        if self._timer is None or now < self._timer:
            return None
        if self.state is State.HELD:
            self._go(Input.RENEW_DUE)
            self._timer = None  # the caller reports back with renewed()/renew_failed()
            return RENEW
        if self.state is State.RENEWING and self.expires_at is not None and now >= self.expires_at:
            self._lose(Input.EXPIRED, "lease expired: it could not be renewed in time")
            return None
        if self.state is State.RENEWING:
            self._timer = None
            return RENEW
        return None

    # -- outputs ---------------------------------------------------------------------------------------

    def get_timer(self) -> float | None:
        return self._timer

    def next_event(self) -> LeaseAcquired | LeaseLost | None:
        return self._events.popleft() if self._events else None

    # -- helpers ---------------------------------------------------------------------------------------

    def _arm(self, ttl: int | None, now: float) -> None:
        if ttl is None:
            self.expires_at = self._timer = None
            return
        self.expires_at = now + ttl
        self._timer = max(self.expires_at - self.renew_margin, now + ttl / 2)

    def _lose(self, event: Input, reason: str) -> None:
        self._go(event)
        assert self.lease is not None
        self._events.append(LeaseLost(self.lease.subnet, reason))
        self._timer = None
