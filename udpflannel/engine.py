"""The asyncio shell of the dataplane: two fds, two drain loops, no protocol logic.

Each readiness wake-up drains its fd up to ``budget`` packets (syscall first, wait only on EAGAIN,
as trio does), so one event-loop callback amortises over a burst instead of costing one per packet.
Everything that decides a packet's fate lives in ``udpflannel.forward`` (sans-IO).

Backpressure instead of busy-spinning: if ``sendto`` (or a TUN write) says EAGAIN, the packet is
parked, reading from the *other* fd stops, and a writer callback resumes both when there is room.
The kernel's own queues then push back on the senders, as they would for any router.

A narrower path to a peer (``udpflannel/pmtu.py``): the kernel refuses a datagram above its path
MTU with EMSGSIZE (the socket never fragments); the packet is then answered as a router answers it
(``_too_big``): ICMP frag-needed if it has DF, fragments if it has not.
"""

from __future__ import annotations

import asyncio
import errno
import functools
import logging
import os
import socket
from collections.abc import Callable
from ipaddress import IPv4Address

from udpflannel import icmp, sockets
from udpflannel.counters import Counters
from udpflannel.forward import describe, inbound, outbound
from udpflannel.fragment import fragment
from udpflannel.packet import Verdict, dont_fragment
from udpflannel.pmtu import PathMtus, recheck_interval
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
        counters: Counters | None = None,
        budget: int = DEFAULT_BUDGET,
        check_source: bool = True,
        trace: bool = False,
        path_mtu: Callable[[str], int] | None = None,
        pmtu_recheck: float | None = None,
    ) -> None:
        """``path_mtu(peer_ip)``: the kernel's path MTU to a peer now (default: read through a
        socket from the UDP socket's address, ``sockets.path_mtu``); ``pmtu_recheck``: seconds
        between two readings of a narrowed peer's (default: from the kernel's ``mtu_expires``)."""
        self.tun_fd = tun_fd
        self.udp = udp
        self.icmp_sock = icmp_sock
        self.routes = routes if routes is not None else RouteTable()
        self.tun_mtu = tun_mtu
        self.tun_address = int(tun_address)
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
        self.path_mtus = PathMtus(tun_mtu=tun_mtu)
        self._path_mtu = path_mtu or functools.partial(sockets.path_mtu, udp.getsockname()[0])
        self.pmtu_recheck = pmtu_recheck if pmtu_recheck is not None else recheck_interval(sockets.kernel_pmtu_expiry())
        self._pmtu_rechecks: dict[NextHop, asyncio.TimerHandle] = {}

    # -- lifecycle ---------------------------------------------------------------------------------
    def attach(self, loop: asyncio.AbstractEventLoop | None = None) -> None:
        self._loop = loop or asyncio.get_running_loop()
        self._loop.add_reader(self.tun_fd, self._on_tun_readable)
        self._loop.add_reader(self.udp.fileno(), self._on_udp_readable)

    def detach(self) -> None:
        loop, self._loop = self._loop, None
        for timer in self._pmtu_rechecks.values():
            timer.cancel()
        self._pmtu_rechecks.clear()
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
                if exc.errno == errno.EMSGSIZE:
                    self._too_big(view, n, hop)
                    continue
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
        except OSError as exc:
            if exc.errno == errno.EMSGSIZE:
                self._too_big(data, len(data), hop)
            else:
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

    # -- a narrower path to a peer (udpflannel/pmtu.py) ------------------------------------------------
    def _read_path_mtu(self, hop: NextHop) -> int | None:
        """Read the kernel's path MTU to ``hop`` now and keep our copy in step (logged when it changes;
        while narrower, read again every ``pmtu_recheck`` s, as the kernel forgets after mtu_expires).
        The largest inner packet that fits the path now; None if a full-size one does."""
        before = self.path_mtus.limits.get(hop)
        try:
            mtu = self._path_mtu(hop[0])
        except OSError as exc:
            log.debug("reading the path MTU to %s failed: %s", hop[0], exc)
            return before
        limit = self.path_mtus.learn(hop, mtu)
        if limit != before:
            if limit is None:
                log.info("path MTU to %s is back to %d: full-size datagrams again", hop[0], mtu)
            else:
                log.info("path MTU to %s is %d: inner packets of up to %d bytes fit (flannel0: %d); larger "
                         "ones are cut to fit or answered with ICMP frag-needed", hop[0], mtu, limit, self.tun_mtu)
        if limit is not None and hop not in self._pmtu_rechecks and self._loop is not None:
            self._pmtu_rechecks[hop] = self._loop.call_later(self.pmtu_recheck, self._recheck_path_mtu, hop)
        return limit

    def _recheck_path_mtu(self, hop: NextHop) -> None:
        self._pmtu_rechecks.pop(hop, None)
        self._read_path_mtu(hop)

    def _too_big(self, pkt, n: int, hop: NextHop) -> None:
        """The kernel refused to send ``n`` bytes to ``hop`` (EMSGSIZE): it has learnt a narrower path.
        Answer as a router: ``_answer_too_big``. Our copy of the path MTU is read again only when it
        does not explain the refusal (a packet as large fits no narrower path than the one we know)."""
        limit = self.path_mtus.limits.get(hop)
        if limit is None or n <= limit:
            limit = self._read_path_mtu(hop)
        if limit is None or n <= limit:  # the path MTU does not explain it
            self.counters.send_errors += 1
            log.debug("sendto %s failed with EMSGSIZE for %d bytes, path MTU %s", hop, n, limit)
            return
        self._answer_too_big(pkt, n, hop, limit)

    def _answer_too_big(self, pkt, n: int, hop: NextHop, limit: int) -> None:
        """A packet of ``n`` bytes for ``hop``, where only ``limit`` fit: with DF, dropped and answered
        with ICMP frag-needed (next-hop MTU = ``limit``, the path MTU − 28) from flannel0's address, so
        the sender lowers its segment size; without DF, fragmented (``udpflannel.fragment``)."""
        c = self.counters
        if dont_fragment(pkt):
            c.tun_drops[Verdict.TOO_BIG] += 1
            self._send_icmp(icmp.frag_needed(pkt, n, src=self.tun_address, mtu=limit))
            return
        pieces = fragment(pkt, n, limit)
        if not pieces:  # not a whole packet, or a path too narrow for any fragment
            c.tun_drops[Verdict.TOO_BIG] += 1
            return
        c.fragmented_packets += 1
        for piece in pieces:
            c.udp_sends += 1
            try:
                self.udp.sendto(piece, hop)
            except OSError as exc:
                c.send_errors += 1
                log.debug("sendto %s failed: %s", hop, exc)
            else:
                c.sent_packets += 1
                c.sent_bytes += len(piece)
