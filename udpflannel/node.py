"""One node's dataplane: bring it up and down (TUN, sockets, engine), and the one place where the control
plane's peer events reach the engine's routes. Shared by the daemon and static mode.

Order as flanneld's ``RegisterNetwork``: create and configure the TUN, then bind the UDP socket (a bind
failure is fatal). Closing the TUN fd removes the device and its route, as with flannel.

Call ``bring_up`` (and ``udpflannel.iface.select_interface``) through ``asyncio.to_thread``: pyroute2's
synchronous API runs an asyncio loop of its own, which cannot nest inside ours, and uvloop cannot
open netlink endpoints for its async API. Netlink is only used at start-up, never on the hot path.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
from dataclasses import dataclass, field
from ipaddress import IPv4Network

from lease.events import PeerEvent
from tun.configure import configure_tun, readdress_tun
from tun.device import TunDevice
from tun.errors import TunError
from tun.layout import ENCAP_OVERHEAD
from udpflannel.counters import Counters
from udpflannel.engine import DEFAULT_BUDGET, Engine
from udpflannel.errors import SetupError
from udpflannel.iface import ExternalInterface
from udpflannel.perpacket import PacketMover
from udpflannel.probe import open_tun_for, probe_features
from udpflannel.routes import follow
from udpflannel.sockets import open_icmp_socket, open_udp_socket
from udpflannel.tracehub import TraceHub

log = logging.getLogger(__name__)


@dataclass
class Node:
    """Everything that owns a file descriptor on this node, closed together, and its engine."""

    iface: ExternalInterface
    subnet: IPv4Network
    network: IPv4Network
    port: int
    tun: TunDevice
    engine: Engine
    trace: TraceHub  # who listens to the packet trace (``udpflannel trace``, ``--trace``)
    closers: list = field(default_factory=list)

    @property
    def tun_mtu(self) -> int:
        return self.engine.tun_mtu

    @property
    def counters(self) -> Counters:
        return self.engine.counters

    def attach(self) -> None:
        """Start moving packets (in the running event loop)."""
        self.engine.attach()

    def follow(self, event: PeerEvent) -> str:
        """Apply a peer event to the routes (safe while traffic flows: same thread); returns the log
        line, in flanneld's words so operators can grep for the same lines."""
        return follow(self.engine.routes, event, self.port)

    def move_to(self, subnet: IPv4Network) -> None:
        """Our lease moved: readdress flannel0 and answer (ICMP) from the new address. Netlink: call
        through ``asyncio.to_thread``."""
        try:
            readdress_tun(self.tun.name, self.subnet, subnet)
        except TunError as exc:
            raise SetupError(str(exc)) from exc
        self.subnet = subnet
        self.engine.tun_address = int(subnet.network_address)

    def peers(self) -> list[tuple[IPv4Network, tuple[str, int], int, int | None]]:
        """Each route: subnet, next hop, datagrams accepted from it, and the path MTU to it where
        narrower than the interface (as last read from the kernel; None: full size)."""
        engine = self.engine
        limits, rx = engine.path_mtus.limits, engine.peer_rx
        return [(subnet, hop, rx.get(hop, 0), None if hop not in limits else limits[hop] + ENCAP_OVERHEAD)
                for subnet, hop in sorted(engine.routes.entries())]

    def close(self) -> None:
        self.engine.detach()
        for close in reversed(self.closers):
            with contextlib.suppress(OSError):
                close()
        self.closers.clear()


def bring_up(
    iface: ExternalInterface,
    subnet: IPv4Network,
    network: IPv4Network,
    port: int,
    *,
    budget: int = DEFAULT_BUDGET,
    check_source: bool = True,
    trace: bool = False,
    fast_path: bool = True,
    disabled_offloads: frozenset[str] = frozenset(),
) -> Node:
    """Create flannel0 for ``subnet``, bind ``iface_addr:port``, and build (not yet attach) the engine.

    ``fast_path``: use TUN offloads and UDP GSO/GRO where the kernel has them (``udpflannel.fastpath``),
    except those named in ``disabled_offloads`` (``features.OFFLOADS``).
    """
    tun_mtu = iface.mtu - ENCAP_OVERHEAD
    closers = []
    try:
        tun, tun_offloads = open_tun_for(fast_path, disabled_offloads)
        closers.append(tun.close)
        configure_tun(tun.name, subnet, network, tun_mtu)
        udp = open_udp_socket(str(iface.iface_addr), port)
        closers.append(udp.close)
        icmp_sock = open_icmp_socket()
        closers.append(icmp_sock.close)
    except BaseException as exc:
        for close in reversed(closers):
            close()
        if isinstance(exc, TunError):  # the TUN layer's error, as the node's set-up failure
            raise SetupError(str(exc)) from exc
        raise
    engine = Engine(tun_fd=tun.fd, udp=udp, icmp_sock=icmp_sock, tun_mtu=tun_mtu, tun_address=subnet.network_address,
                    budget=budget, check_source=check_source)
    trace_hub = TraceHub(engine, tun_name=tun.name, log_every_packet=trace)
    if tun.vnet_hdr:  # the TUN took the offloads: the fast path (numpy and the GSO kernels load only here)
        from udpflannel.fastpath import BatchMover

        engine.plug(BatchMover(engine, probe_features(tun_offloads, udp, disabled_offloads)))
    else:
        engine.plug(PacketMover(engine))
    log.info("%s up: %s/32, mtu %d, route %s; UDP %s:%d", tun.name, subnet.network_address, tun_mtu, network, iface.iface_addr, port)
    return Node(iface=iface, subnet=subnet, network=network, port=port, tun=tun, engine=engine, trace=trace_hub,
                closers=closers)


async def wait_for_stop_signal() -> int:
    """Block until SIGTERM or SIGINT; return the signal number."""
    loop = asyncio.get_running_loop()
    received: asyncio.Future[int] = loop.create_future()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, lambda s=sig: received.done() or received.set_result(s))
    try:
        return await received
    finally:
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.remove_signal_handler(sig)
