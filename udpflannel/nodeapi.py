"""One node's HTTP views — health, readiness, metrics, status — shared by the daemon and static mode.

``/trace`` streams the packet trace to ``udpflannel trace`` (control socket only).
``/status`` is what ``udpflannel status`` prints: the lease, the peer table (subnet → public IP,
packets received, last seen, path MTU where narrower than the interface) and the counters. "Last seen" is derived from per-peer packet counts
once a second, so the hot path only ever bumps an integer.

The views read one :class:`NodeState` (the daemon, or static mode's :class:`StaticState`) and the
:class:`~udpflannel.node.Node`'s public methods, never the engine's insides.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

from udpflannel.counters import Counters
from udpflannel.httpapi import HttpApi, Response, Stream, json_response
from udpflannel.metrics import CONTENT_TYPE, make_registry, render

if TYPE_CHECKING:
    from udpflannel.node import Node

LAST_SEEN_PERIOD = 1.0


class NodeState(Protocol):
    """What the views show: the node once it is up, whether it is ready, the lease and network."""

    node: Node | None
    ready: bool

    def lease_info(self) -> dict | None: ...
    def network_name(self) -> str | None: ...
    def gauges(self) -> dict[str, float]: ...


@dataclass
class StaticState:
    """Static mode's state: the node is up and ready from the start; its "lease" is the command line."""

    node: Node
    lease: dict
    network: str
    ready: bool = True

    def lease_info(self) -> dict:
        return self.lease

    def network_name(self) -> str:
        return self.network

    def gauges(self) -> dict[str, float]:
        return {}


class NodeApi:
    def __init__(self, state: NodeState) -> None:
        self._state = state
        self.last_seen: dict[tuple[str, int], float] = {}
        self._rx_seen: dict[tuple[str, int], int] = {}
        self._registry = make_registry(self._counters, self._all_gauges)
        self.http = HttpApi({
            "/healthz": lambda: Response(200, b"flanneld is running"),
            "/readyz": lambda: Response(200, b"flanneld is ready") if state.ready else Response(503, b"flanneld is not ready yet"),
            "/metrics": lambda: Response(200, render(self._registry), CONTENT_TYPE),
            "/status": lambda: json_response(self.status()),
            "/trace": Stream(self._trace),
        }, unix_only=frozenset({"/trace"}))  # packets' contents: for root on the node, not the health port

    async def _trace(self, query: dict[str, str]) -> AsyncIterator[bytes]:
        """``udpflannel trace``'s stream (``udpflannel/tracehub.py``)."""
        node = self._state.node
        if node is None:
            raise ValueError("the dataplane is not up yet (no lease): try again once the daemon is ready")
        return await node.trace.stream(query)

    def _counters(self) -> Counters:
        node = self._state.node
        return node.counters if node else Counters()

    def _all_gauges(self) -> dict[str, float]:
        node = self._state.node
        return {"peers": float(len(node.engine.routes)) if node else 0.0, "ready": float(self._state.ready),
                **self._state.gauges()}

    def status(self) -> dict[str, object]:
        self.update_last_seen()
        now = time.time()
        state = self._state
        node = state.node
        peers = []
        for subnet, hop, rx, path_mtu in node.peers() if node is not None else ():
            seen = self.last_seen.get(hop)
            peers.append({
                "subnet": str(subnet), "public_ip": hop[0], "port": hop[1], "rx_packets": rx,
                "last_seen_seconds_ago": round(now - seen, 1) if seen else None,
                "path_mtu": path_mtu,  # a path narrower than the interface; None: full size
            })
        return {
            "ready": state.ready,
            "lease": state.lease_info(),
            "network": state.network_name(),
            "tun": None if node is None else {"name": node.tun.name, "mtu": node.tun_mtu, "address": str(node.subnet.network_address)},
            "iface": None if node is None else {"name": node.iface.name, "address": str(node.iface.iface_addr),
                                                "public_ip": str(node.iface.ext_addr)},
            "peers": peers,
            "counters": node.counters.as_dict() if node else {},
        }

    def update_last_seen(self) -> None:
        node = self._state.node
        if node is None:
            return
        now = time.time()
        for _, peer, count, _ in node.peers():
            if self._rx_seen.get(peer) != count:
                self._rx_seen[peer] = count
                self.last_seen[peer] = now

    async def track_last_seen(self) -> None:
        while True:
            await asyncio.sleep(LAST_SEEN_PERIOD)
            self.update_last_seen()
