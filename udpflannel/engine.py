"""The asyncio shell of the dataplane: two fds, two drain loops, no protocol logic.

Each readiness wake-up drains its fd up to ``budget`` packets (syscall first, wait only on EAGAIN,
as trio does), so one event-loop callback amortises over a burst instead of costing one per packet.
Everything that decides a packet's fate lives in ``udpflannel.forward`` (sans-IO).

Backpressure instead of busy-spinning: if ``sendto`` (or a TUN write) says EAGAIN, the packet is
parked, reading from the *other* fd stops, and a writer callback resumes both when there is room.
The kernel's own queues then push back on the senders, as they would for any router.
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
from ipaddress import IPv4Address

from udpflannel import icmp
from udpflannel.counters import Counters
from udpflannel.events import ControlEvent, PeerAdded, PeerRemoved, Snapshot
from udpflannel.forward import describe, inbound, outbound
from udpflannel.packet import Verdict
from udpflannel.routes import NextHop, RouteTable

log = logging.getLogger(__name__)
trace_log = logging.getLogger("udpflannel.trace")

DEFAULT_BUDGET = 64
RECV_BUFFER = 65536  # any UDP datagram fits, so an oversize one is seen whole and dropped, not truncated


class IcmpLimiter:
    """Token bucket for the ICMP errors we originate (the kernel limits its own the same way)."""

    def __init__(self, rate: float = 1000.0, burst: float = 50.0) -> None:
        self.rate, self.burst = rate, burst
        self.tokens, self.stamp = burst, 0.0

    def allow(self, *, now: float) -> bool:
        self.tokens = min(self.burst, self.tokens + (now - self.stamp) * self.rate)
        self.stamp = now
        if self.tokens >= 1.0:
            self.tokens -= 1.0
            return True
        return False


class Dataplane:
    """Moves packets between the TUN fd and the UDP socket, per packet, in batches per wake-up."""

    def __init__(
        self,
        *,
        tun_fd: int,
        udp: socket.socket,
        icmp_sock: socket.socket | None,
        routes: RouteTable | None = None,
        tun_mtu: int,
        tun_address: IPv4Address,
        port: int,
        counters: Counters | None = None,
        budget: int = DEFAULT_BUDGET,
        check_source: bool = True,
        trace: bool = False,
    ) -> None:
        self.tun_fd = tun_fd
        self.udp = udp
        self.icmp_sock = icmp_sock
        self.routes = routes if routes is not None else RouteTable()
        self.tun_mtu = tun_mtu
        self.tun_address = int(tun_address)
        self.port = port
        self.counters = counters if counters is not None else Counters()
        self.budget = budget
        self.check_source = check_source
        self.trace = trace
        self.icmp_limiter = IcmpLimiter()
        self._tun_buf = bytearray(RECV_BUFFER)
        self._udp_buf = bytearray(RECV_BUFFER)
        self._pending_send: tuple[bytes, NextHop] | None = None
        self._pending_write: bytes | None = None
        self.peer_rx: dict[NextHop, int] = {}  # datagrams accepted per peer; ``status`` derives "last seen"
        self._loop: asyncio.AbstractEventLoop | None = None

    # -- control plane -> routes -----------------------------------------------------------------
    def apply(self, event: ControlEvent) -> None:
        """Apply a lease event to the route table; safe while traffic flows (same thread)."""
        if isinstance(event, PeerAdded):
            self.routes.set(event.subnet, (str(event.public_ip), self.port))
        elif isinstance(event, PeerRemoved):
            self.routes.delete(event.subnet)
        elif isinstance(event, Snapshot):
            self.routes.replace_all((p.subnet, (str(p.public_ip), self.port)) for p in event.peers)

    # -- lifecycle ---------------------------------------------------------------------------------
    def attach(self, loop: asyncio.AbstractEventLoop | None = None) -> None:
        self._loop = loop or asyncio.get_running_loop()
        self._loop.add_reader(self.tun_fd, self._on_tun_readable)
        self._loop.add_reader(self.udp.fileno(), self._on_udp_readable)

    def detach(self) -> None:
        loop, self._loop = self._loop, None
        if loop is None:
            return
        for fd in (self.tun_fd, self.udp.fileno()):
            loop.remove_reader(fd)
            loop.remove_writer(fd)

    # -- TUN -> UDP ----------------------------------------------------------------------------------
    def _on_tun_readable(self) -> None:
        c = self.counters
        c.tun_wakeups += 1
        buf, fd, routes = self._tun_buf, self.tun_fd, self.routes
        view = memoryview(buf)
        bufs = [buf]
        readv, sendto = os.readv, self.udp.sendto
        for _ in range(self.budget):
            c.tun_reads += 1
            try:
                n = readv(fd, bufs)
            except BlockingIOError:
                return
            except InterruptedError:
                continue
            except OSError as exc:
                log.warning("TUN read failed: %s", exc)
                return
            c.tun_packets += 1
            c.tun_bytes += n
            verdict, hop = outbound(buf, n, routes)
            if self.trace:
                trace_log.debug("tun>udp %s -> %s %s", describe(buf, n), verdict.name, hop)
            if verdict:
                self._drop(verdict, buf, n, c.tun_drops)
                continue
            c.udp_sends += 1
            try:
                sendto(view[:n], hop)
            except BlockingIOError:
                self._pending_send = (bytes(view[:n]), hop)
                self._pause(self.tun_fd, self.udp.fileno(), self._on_udp_writable)
                return
            except OSError as exc:
                c.send_errors += 1
                log.debug("sendto %s failed: %s", hop, exc)
                continue
            c.sent_packets += 1
            c.sent_bytes += n

    def _on_udp_writable(self) -> None:
        assert self._pending_send is not None
        data, hop = self._pending_send
        self.counters.udp_sends += 1
        try:
            self.udp.sendto(data, hop)
        except BlockingIOError:
            return
        except OSError:
            self.counters.send_errors += 1
        else:
            self.counters.sent_packets += 1
            self.counters.sent_bytes += len(data)
        self._pending_send = None
        self._resume(self.tun_fd, self.udp.fileno(), self._on_tun_readable)

    # -- UDP -> TUN ----------------------------------------------------------------------------------
    def _on_udp_readable(self) -> None:
        c = self.counters
        c.udp_wakeups += 1
        buf, fd, routes = self._udp_buf, self.tun_fd, self.routes
        view = memoryview(buf)
        recv, write = self.udp.recvfrom_into, os.write
        tun_mtu, check_source, peer_rx = self.tun_mtu, self.check_source, self.peer_rx
        for _ in range(self.budget):
            c.udp_recvs += 1
            try:
                n, peer = recv(buf)
            except BlockingIOError:
                return
            except InterruptedError:
                continue
            except OSError as exc:
                log.debug("recvfrom failed: %s", exc)
                continue
            c.udp_packets += 1
            c.udp_bytes += n
            verdict = inbound(buf, n, peer, routes, tun_mtu=tun_mtu, check_source=check_source)
            if self.trace:
                trace_log.debug("udp>tun from %s:%d %s -> %s", peer[0], peer[1], describe(buf, n), verdict.name)
            if verdict:
                self._drop(verdict, buf, n, c.udp_drops)
                continue
            peer_rx[peer] = peer_rx.get(peer, 0) + 1
            c.tun_writes += 1
            try:
                write(fd, view[:n])
            except BlockingIOError:
                self._pending_write = bytes(view[:n])
                self._pause(self.udp.fileno(), self.tun_fd, self._on_tun_writable)
                return
            except OSError as exc:
                c.tun_write_errors += 1
                log.debug("TUN write failed: %s", exc)
                continue
            c.delivered_packets += 1
            c.delivered_bytes += n

    def _on_tun_writable(self) -> None:
        assert self._pending_write is not None
        self.counters.tun_writes += 1
        try:
            os.write(self.tun_fd, self._pending_write)
        except BlockingIOError:
            return
        except OSError:
            self.counters.tun_write_errors += 1
        else:
            self.counters.delivered_packets += 1
            self.counters.delivered_bytes += len(self._pending_write)
        self._pending_write = None
        self._resume(self.udp.fileno(), self.tun_fd, self._on_udp_readable)

    # -- shared ------------------------------------------------------------------------------------
    def _pause(self, read_fd: int, write_fd: int, on_writable) -> None:
        """Stop reading ``read_fd`` until ``write_fd`` can take the parked packet."""
        assert self._loop is not None
        self.counters.backpressure_pauses += 1
        self._loop.remove_reader(read_fd)
        self._loop.add_writer(write_fd, on_writable)

    def _resume(self, read_fd: int, write_fd: int, on_readable) -> None:
        assert self._loop is not None
        self._loop.remove_writer(write_fd)
        self._loop.add_reader(read_fd, on_readable)

    def _drop(self, verdict: Verdict, buf: bytearray, n: int, drops: list[int]) -> None:
        """Count the drop; answer with ICMP where a router would (no route, TTL expired)."""
        drops[verdict] += 1
        if verdict == Verdict.NO_ROUTE:
            self._send_icmp(icmp.net_unreachable(buf, n, src=self.tun_address))
        elif verdict == Verdict.TTL_EXPIRED:
            self._send_icmp(icmp.time_exceeded(buf, n, src=self.tun_address))

    def _send_icmp(self, packet: bytes | None) -> None:
        if packet is None or self.icmp_sock is None or self._loop is None:
            return
        if not self.icmp_limiter.allow(now=self._loop.time()):
            self.counters.icmp_rate_limited += 1
            return
        try:
            self.icmp_sock.sendto(packet, (str(IPv4Address(packet[16:20])), 0))
        except OSError as exc:
            log.debug("ICMP send failed: %s", exc)
            return
        self.counters.icmp_sent += 1
