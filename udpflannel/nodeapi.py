"""One node's HTTP views — health, readiness, metrics, status — shared by the daemon and static mode.

``/status`` is what ``udpflannel status`` prints: the lease, the peer table (subnet → public IP,
packets received, last seen, path MTU where narrower than the interface) and the counters. "Last seen" is derived from per-peer packet counts
once a second, so the hot path only ever bumps an integer.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable

from tun.layout import ENCAP_OVERHEAD
from udpflannel.counters import Counters
from udpflannel.httpapi import HttpApi, Response, json_response
from udpflannel.metrics import CONTENT_TYPE, make_registry, render
from udpflannel.node import NodeDataplane

LAST_SEEN_PERIOD = 1.0


class NodeApi:
    def __init__(
        self,
        *,
        node: Callable[[], NodeDataplane | None],
        ready: Callable[[], bool],
        lease: Callable[[], dict | None],
        network: Callable[[], str | None],
        gauges: Callable[[], dict[str, float]] = dict,
    ) -> None:
        self._node, self._ready, self._lease, self._network, self._gauges = node, ready, lease, network, gauges
        self.last_seen: dict[tuple[str, int], float] = {}
        self._rx_seen: dict[tuple[str, int], int] = {}
        self._registry = make_registry(self._counters, self._all_gauges)
        self.http = HttpApi({
            "/healthz": lambda: Response(200, b"flanneld is running"),
            "/readyz": lambda: Response(200, b"flanneld is ready") if self._ready() else Response(503, b"flanneld is not ready yet"),
            "/metrics": lambda: Response(200, render(self._registry), CONTENT_TYPE),
            "/status": lambda: json_response(self.status()),
        })

    def _counters(self) -> Counters:
        node = self._node()
        return node.dataplane.counters if node else Counters()

    def _all_gauges(self) -> dict[str, float]:
        node = self._node()
        return {"peers": float(len(node.dataplane.routes)) if node else 0.0, "ready": float(self._ready()), **self._gauges()}

    def status(self) -> dict[str, object]:
        self.update_last_seen()
        now = time.time()
        node = self._node()
        peers = []
        if node is not None:
            for subnet, hop in sorted(node.dataplane.routes.entries()):
                seen = self.last_seen.get(hop)
                limit = node.dataplane.path_mtus.limits.get(hop)
                peers.append({
                    "subnet": str(subnet), "public_ip": hop[0], "port": hop[1],
                    "rx_packets": node.dataplane.peer_rx.get(hop, 0),
                    "last_seen_seconds_ago": round(now - seen, 1) if seen else None,
                    # a path narrower than the interface, as last read from the kernel; None: full size
                    "path_mtu": None if limit is None else limit + ENCAP_OVERHEAD,
                })
        return {
            "ready": self._ready(),
            "lease": self._lease(),
            "network": self._network(),
            "tun": None if node is None else {"name": node.tun.name, "mtu": node.tun_mtu, "address": str(node.subnet.network_address)},
            "iface": None if node is None else {"name": node.iface.name, "address": str(node.iface.iface_addr),
                                                "public_ip": str(node.iface.ext_addr)},
            "peers": peers,
            "counters": node.dataplane.counters.as_dict() if node else {},
        }

    def update_last_seen(self) -> None:
        node = self._node()
        if node is None:
            return
        now = time.time()
        for peer, count in node.dataplane.peer_rx.items():
            if self._rx_seen.get(peer) != count:
                self._rx_seen[peer] = count
                self.last_seen[peer] = now

    async def track_last_seen(self) -> None:
        while True:
            await asyncio.sleep(LAST_SEEN_PERIOD)
            self.update_last_seen()
