"""What the daemon needs from a subnet manager, and nothing of how it is kept: etcd today
(:class:`lease.manager.EtcdSubnetManager`); a Kubernetes or static one would implement the same.

The contract, in the daemon's order: :meth:`get_config` (retried while it raises), :meth:`acquire` once
(the manager then renews and re-acquires by itself), :meth:`events` iterated once (``lease.events``:
the peers as a :class:`~lease.events.Snapshot`, then changes; ``LeaseAcquired``/``LeaseLost`` for our
own subnet), and :meth:`close` (:meth:`release` first with ``--release-lease-on-exit``). Failures raise
``lease.errors``; an unreachable store never ends the event stream: it waits.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Protocol

from lease.config import NetworkConfig
from lease.events import ControlEvent
from lease.lifecycle import Lease


class SubnetManager(Protocol):
    @property
    def lease(self) -> Lease | None:
        """The lease held now (None before acquire() and while re-acquiring)."""

    @property
    def expires_at_unix(self) -> float | None:
        """Wall-clock expiry of the lease as last renewed (None: not held, or it never expires)."""

    async def get_config(self) -> NetworkConfig: ...

    async def acquire(self) -> Lease: ...

    def events(self) -> AsyncIterator[ControlEvent]: ...

    async def release(self) -> None: ...

    async def close(self) -> None: ...
