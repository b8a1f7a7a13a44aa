"""Test helpers: raw records as flanneld writes them, and a manager's events with bounded waits."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable
from ipaddress import IPv4Network

from lease.events import ControlEvent, Snapshot
from lease.manager import EtcdSubnetManager, Lease
from lease.records import make_subnet_key

NETWORK_CONFIG = '{"Network":"10.5.0.0/16","Backend":{"Type":"udp"}}'
ME = "192.168.1.10"
FLANNELD_VALUE = b'{"PublicIP":"192.168.1.77","PublicIPv6":null}'
VXLAN_VALUE = (
    b'{"PublicIP":"192.168.64.3","PublicIPv6":null,"BackendType":"vxlan",'
    b'"BackendData":{"VNI":1,"VtepMAC":"c6:d2:32:6f:8f:44"}}'
)


def net(s: str) -> IPv4Network:
    return IPv4Network(s)


async def put_config(kv, prefix, config=NETWORK_CONFIG):
    await kv.put(f"{prefix}/config".encode(), config.encode())


async def put_record(kv, prefix, subnet, value, ttl=None):
    """Write a lease record raw, as flanneld (or an operator) would; returns the etcd lease id or 0."""
    lease_id = (await kv.lease(ttl)).id if ttl else 0
    key = make_subnet_key(prefix, IPv4Network(subnet)) if "/" in subnet else f"{prefix}/subnets/{subnet}"
    await kv.put(key.encode(), value, lease=lease_id)
    return lease_id


class EventTap:
    """Consumes ``manager.events()`` in the background; ``wait_for`` waits (bounded) for a matching event."""

    def __init__(self, manager: EtcdSubnetManager) -> None:
        self.events: list[tuple[float, ControlEvent]] = []
        self._changed = asyncio.Event()
        self._task = asyncio.create_task(self._run(manager))
        self.error: BaseException | None = None

    async def _run(self, manager: EtcdSubnetManager) -> None:
        try:
            async for event in manager.events():
                self.events.append((time.monotonic(), event))
                self._changed.set()
        except BaseException as e:  # the iterator must never raise: remember it for the assertions
            self.error = e
            raise

    async def wait_for(self, match: Callable[[ControlEvent], bool], timeout: float, since: int = 0) -> tuple[float, ControlEvent]:
        """The first event at index >= ``since`` that matches; fails after ``timeout`` seconds."""
        deadline = time.monotonic() + timeout
        while True:
            for stamp, event in self.events[since:]:
                if match(event):
                    return stamp, event
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise AssertionError(f"no matching event within {timeout} s; got {[e for _, e in self.events[since:]]}")
            self._changed.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._changed.wait(), remaining)

    def of(self, kind: type) -> list:
        return [e for _, e in self.events if isinstance(e, kind)]

    async def close(self) -> None:
        self._task.cancel()
        await asyncio.wait([self._task])


async def start_node(manager: EtcdSubnetManager) -> tuple[Lease, EventTap, Snapshot]:
    """Acquire, start following the events, and wait (bounded) for the first Snapshot."""
    lease = await manager.acquire()
    tap = EventTap(manager)
    _, snapshot = await tap.wait_for(lambda e: isinstance(e, Snapshot), 2)
    return lease, tap, snapshot
