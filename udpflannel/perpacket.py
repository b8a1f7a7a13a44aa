"""The per-packet mover: one packet per syscall each way, flannel's design (``--no-fast-path``, or a
kernel without TUN offloads). It plugs into the engine (``udpflannel/engine.py``), which owns the fds.

This is the last of the three files a packet crosses: ``tun/device.py`` (the fd) →
``udpflannel/forward.py`` (what to do with it) → **here** (the syscalls): ``readv`` from flannel0,
``sendto(packet, (peer_public_ip, 8285))`` — the bare IPv4 packet is the UDP payload, exactly as
flanneld sends it; on the way in ``recvfrom_into`` and a ``write`` into flannel0.

Each wake-up drains its fd up to the engine's ``budget`` packets, so one event-loop callback amortises
over a burst instead of costing one per packet. The loops are written for speed (every Python step
per packet costs ~1 µs): locals bound before the loop, the decision and the syscall inline; only what
goes wrong leaves the loop, for the engine to handle.
"""

from __future__ import annotations

import logging
import os
from typing import TYPE_CHECKING

from udpflannel import lone
from udpflannel.forward import inbound, outbound
from udpflannel.pace import QUIET_NS, Pace
from udpflannel.routes import NextHop

if TYPE_CHECKING:
    from udpflannel.engine import Engine

log = logging.getLogger(__name__)

RECV_BUFFER = 65536  # any UDP datagram fits, so an oversize one is seen whole and dropped, not truncated


class PacketMover:
    """Moves one packet per syscall; see the module docstring."""

    tun_header = 0  # plain packets in and out of the TUN
    max_segments = 1  # one datagram per send

    def __init__(self, engine: Engine, *, compiled: bool = True) -> None:
        """``compiled``: take lone packets in C where the extension loads (else these Python callbacks)."""
        self.engine = engine
        self._tun_buf = bytearray(RECV_BUFFER)
        self._udp_buf = bytearray(RECV_BUFFER)
        # A lone packet's whole pass in C where the extension is built (udpflannel/lone.py); these
        # Python callbacks then take the trace's wake-ups, and the hand-overs (lone_*) the rest.
        # (its pace: a quiet fd's wake-up ends after its lone packet, without the trailing read)
        c_pass = lone.attach(engine, tun_side=self, udp_side=self, python_tun=self.on_tun_readable,
                             python_udp=self.on_udp_readable, tun_buf=self._tun_buf, udp_buf=self._udp_buf,
                             pace=Pace(), quiet_ns=QUIET_NS) if compiled else None
        if c_pass is not None:
            self.on_tun_readable, self.on_udp_readable = c_pass
        log.info("per-packet path; lone packets: %s", lone.describe(c_pass is not None))

    # -- TUN -> UDP ----------------------------------------------------------------------------------
    def on_tun_readable(self) -> None:
        self.engine.counters.tun_wakeups += 1
        self._drain_tun(self.engine.budget)

    def _drain_tun(self, budget: int, pending: int = -1) -> None:
        """Read and forward up to ``budget`` packets; ``pending`` ≥ 0: the first is already in the
        buffer, that many bytes long (read, and counted as a read, by the C pass)."""
        e = self.engine
        c = e.counters
        buf, fd, routes, tracer = self._tun_buf, e.tun_fd, e.routes, e.tracer  # the trace: once per wake-up
        view = memoryview(buf)
        bufs = [buf]
        readv, sendto = os.readv, e.udp.sendto
        for _ in range(budget):
            if pending < 0:
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
            else:
                n, pending = pending, -1
            c.tun_packets += 1
            c.tun_bytes += n
            verdict, hop = outbound(buf, n, routes)
            if tracer is not None:
                tracer.outbound(buf, n, verdict, hop)
            if verdict:
                e.drop(verdict, buf, n, c.tun_drops)
                continue
            c.udp_sends += 1
            try:
                sendto(view[:n], hop)
            except BlockingIOError:
                e.park_send(bytes(view[:n]), n, 1, hop)
                return
            except OSError as exc:
                e.send_failed(exc, view[:n], n, 1, hop)
                continue
            c.sent_packets += 1
            c.sent_bytes += n

    # the C pass's hand-overs (udpflannel/lone.py): ``more`` is what is left of the wake-up's budget
    def lone_packet(self, n: int, more: int) -> None:
        """A packet the C pass did not forward (a drop, or something only Python does): decided here."""
        self._drain_tun(more + 1, n)

    def lone_unsent(self, n: int, hop: NextHop, err: int, more: int) -> None:
        """The C pass forwarded a packet (TTL already decremented) and its send failed with ``err``."""
        view, exc = memoryview(self._tun_buf)[:n], OSError(err, os.strerror(err))  # EAGAIN: a BlockingIOError
        if isinstance(exc, BlockingIOError):
            self.engine.park_send(bytes(view), n, 1, hop)
            return
        self.engine.send_failed(exc, view, n, 1, hop)
        self._drain_tun(more)

    def lone_read_failed(self, err: int, more: int) -> None:
        log.warning("TUN read failed: %s", os.strerror(err))

    def refit(self, data, size: int, hop: NextHop) -> None:
        """A datagram the kernel refused (EMSGSIZE): answered as a router answers what does not fit
        (frag-needed with DF, fragments without), if the path MTU explains it."""
        n = len(data)
        limit = self.engine.narrower_path(hop, n)
        if limit is None:
            self.engine.counters.send_errors += 1
            log.debug("sendto %s failed with EMSGSIZE for %d bytes, path MTU %s", hop, n, limit)
            return
        self.engine.answer_too_big(data, n, hop, limit)

    # -- UDP -> TUN ----------------------------------------------------------------------------------
    def on_udp_readable(self) -> None:
        self.engine.counters.udp_wakeups += 1
        self._drain_udp(self.engine.budget)

    def _drain_udp(self, budget: int, pending: int = -1, pending_peer: NextHop | None = None) -> None:
        """Receive and deliver up to ``budget`` datagrams; ``pending`` ≥ 0: the first is already in the
        buffer, that many bytes from ``pending_peer`` (received, and counted as a receive, in C)."""
        e = self.engine
        c = e.counters
        buf, fd, routes, tracer = self._udp_buf, e.tun_fd, e.routes, e.tracer
        view = memoryview(buf)
        recv, write = e.udp.recvfrom_into, os.write
        tun_mtu, check_source, peer_rx = e.tun_mtu, e.check_source, e.peer_rx
        for _ in range(budget):
            if pending < 0:
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
            else:
                n, peer, pending = pending, pending_peer, -1
            c.udp_packets += 1
            c.udp_bytes += n
            verdict = inbound(buf, n, peer, routes, tun_mtu=tun_mtu, check_source=check_source)
            if tracer is not None:
                tracer.inbound(buf, n, verdict, peer)
            if verdict:
                e.drop(verdict, buf, n, c.udp_drops)
                continue
            peer_rx[peer] = peer_rx.get(peer, 0) + 1
            c.tun_writes += 1
            try:
                write(fd, view[:n])
            except BlockingIOError:
                e.park_write(bytes(view[:n]), 1)
                return
            except OSError as exc:
                e.write_failed(exc, 1)
                continue
            c.delivered_packets += 1
            c.delivered_bytes += n

    def lone_datagram(self, n: int, peer: NextHop, ancdata: list, msg_flags: int, more: int) -> None:
        """A datagram the C pass did not deliver (a drop, or something only Python does): decided here."""
        self._drain_udp(more + 1, n, peer)

    def lone_unwritten(self, n: int, err: int, more: int) -> None:
        """The C pass accepted a datagram (TTL already decremented) and the TUN write failed with ``err``."""
        exc = OSError(err, os.strerror(err))  # EAGAIN: a BlockingIOError
        if isinstance(exc, BlockingIOError):
            self.engine.park_write(bytes(self._udp_buf[:n]), 1)
            return
        self.engine.write_failed(exc, 1)
        self._drain_udp(more)

    def lone_recv_failed(self, err: int, more: int) -> None:
        log.debug("recvfrom failed: %s", os.strerror(err))
        self._drain_udp(more)
