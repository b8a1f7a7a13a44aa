"""The asyncio shell of the dataplane: two fds, their readiness, backpressure, errors and counters.

The :class:`Engine` owns the TUN fd and the UDP socket. What moves packets between them plugs in: the
per-packet mover (``udpflannel/perpacket.py``, one packet per syscall, as flannel) or, where the kernel
has the offloads, the batch mover (``udpflannel/fastpath.py``, up to 64 KB per syscall). A mover drains
its fd on each wake-up (syscall first, wait only on EAGAIN, as trio does) and hands everything that
goes wrong to the engine, where it is handled once for both:

- a full socket or TUN (EAGAIN): what is left is parked, reading from the *other* fd stops, and a
  writer callback sends or writes the parked data, in order, when there is room, then resumes. The
  kernel's own queues then push back on the senders, as they would for any router;
- a failed send (:meth:`Engine.send_failed`): EMSGSIZE is a narrower path (below), EIO from a GSO send
  an egress device without checksum offload (GSO off for good, said once), anything else is counted;
- a dropped packet (:meth:`Engine.drop`): counted by verdict and answered with ICMP where a router would
  (``udpflannel.icmp`` decides which error, and how many per second).

Everything that decides a packet's fate lives in ``udpflannel.forward`` (sans-IO).

A narrower path to a peer (``udpflannel/pmtu.py``): the kernel refuses a datagram above its path MTU
with EMSGSIZE (the socket never fragments); the engine reads the path MTU and the mover refits what was
refused: the batch mover cuts TCP segments to fit, and whatever cannot be cut is answered as a router
answers it (:meth:`Engine.answer_too_big`): ICMP frag-needed if it has DF, fragments if it has not.
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
from typing import TYPE_CHECKING, Protocol

from udpflannel import icmp, sockets
from udpflannel.counters import Counters
from udpflannel.fragment import fragment
from udpflannel.packet import TOO_BIG, Verdict, dont_fragment
from udpflannel.pmtu import PathMtus, recheck_interval
from udpflannel.routes import NextHop, RouteTable

if TYPE_CHECKING:
    from udpflannel.tracehub import TraceHub

log = logging.getLogger(__name__)

DEFAULT_BUDGET = 64


class Mover(Protocol):
    """What plugs into the engine: the two read callbacks, how to send again what a narrower path
    refused (``data``: datagrams of ``size`` bytes, the last maybe shorter), the bytes of header in
    front of each TUN read and write (a virtio_net_hdr, or none) and the datagrams one send may carry."""

    tun_header: int
    max_segments: int

    def on_tun_readable(self) -> None: ...
    def on_udp_readable(self) -> None: ...
    def refit(self, data: bytes, size: int, hop: NextHop) -> None: ...


class Engine:
    """Moves packets between the TUN fd and the UDP socket through a mover; see the module docstring.

    A mover plugs in before :meth:`attach` (:meth:`plug`; ``udpflannel.node`` picks it). ``path_mtu(peer_ip)``: the kernel's path MTU to a
    peer now (default: read through a socket from the UDP socket's address, ``sockets.path_mtu``);
    ``pmtu_recheck``: seconds between two readings of a narrowed peer's (default: from the kernel's
    ``mtu_expires``).
    """

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
        path_mtu: Callable[[str], int] | None = None,
        pmtu_recheck: float | None = None,
    ) -> None:
        self.tun_fd = tun_fd
        self.udp = udp
        self.icmp_sock = icmp_sock
        self.routes = routes if routes is not None else RouteTable()
        self.tun_mtu = tun_mtu
        self.tun_address = int(tun_address)
        self.counters = counters if counters is not None else Counters()
        self.budget = budget
        self.check_source = check_source
        self.tracer: TraceHub | None = None  # set by a TraceHub while someone listens (udpflannel/tracehub.py)
        self.icmp_limiter = icmp.RateLimiter()
        self.peer_rx: dict[NextHop, int] = {}  # datagrams accepted per peer; ``status`` derives "last seen"
        self.path_mtus = PathMtus(tun_mtu=tun_mtu)
        self._path_mtu = path_mtu or functools.partial(sockets.path_mtu, udp.getsockname()[0])
        self.pmtu_recheck = pmtu_recheck if pmtu_recheck is not None else recheck_interval(sockets.kernel_pmtu_expiry())
        self._pmtu_rechecks: dict[NextHop, asyncio.TimerHandle] = {}
        self.loop: asyncio.AbstractEventLoop | None = None
        self.parked_sends: list[tuple[bytes, int, int, NextHop]] = []  # (datagrams, size, count, peer)
        self.parked_writes: list[tuple[bytes, int]] = []  # (one TUN write, the packets it carries)
        self.mover: Mover | None = None
        self.max_segments = 1  # datagrams per send: the mover's, until EIO turns GSO off
        self.tun_header = 0  # bytes before each packet in a TUN read or write: the mover's

    # -- lifecycle ---------------------------------------------------------------------------------
    def plug(self, mover: Mover) -> Engine:
        """What moves the packets: ``udpflannel.perpacket.PacketMover`` or ``udpflannel.fastpath.BatchMover``."""
        self.mover = mover
        self.max_segments, self.tun_header = mover.max_segments, mover.tun_header
        return self

    def attach(self, loop: asyncio.AbstractEventLoop | None = None) -> None:
        assert self.mover is not None, "plug() a mover first"
        self.loop = loop or asyncio.get_running_loop()
        self.loop.add_reader(self.tun_fd, self.mover.on_tun_readable)
        self.loop.add_reader(self.udp.fileno(), self.mover.on_udp_readable)

    def detach(self) -> None:
        loop, self.loop = self.loop, None
        for timer in self._pmtu_rechecks.values():
            timer.cancel()
        self._pmtu_rechecks.clear()
        if loop is None:
            return
        for fd in (self.tun_fd, self.udp.fileno()):
            loop.remove_reader(fd)
            loop.remove_writer(fd)

    # -- backpressure: park, stop reading the other fd, drain when there is room ---------------------
    def park_send(self, data: bytes, size: int, count: int, hop: NextHop) -> None:
        """The socket is full: keep ``count`` datagrams of ``size`` bytes (a copy: buffers are reused)
        and stop reading the TUN until they are sent."""
        if not self.parked_sends:
            self._pause(self.tun_fd, self.udp.fileno(), self._on_udp_writable)
        self.parked_sends.append((data, size, count, hop))

    def park_write(self, data: bytes, packets: int) -> None:
        """The TUN is full: keep one write (a copy) and stop receiving until it is written."""
        if not self.parked_writes:
            self._pause(self.udp.fileno(), self.tun_fd, self._on_tun_writable)
        self.parked_writes.append((data, packets))

    def _on_udp_writable(self) -> None:
        c, parked = self.counters, self.parked_sends
        while parked:
            data, size, count, hop = parked[0]
            c.udp_sends += 1
            try:
                if count == 1:
                    self.udp.sendto(data, hop)
                elif self.max_segments > 1:
                    self.udp.sendmsg([data], sockets.gso_cmsg(size), 0, hop)
                else:
                    for i in range(count):  # rare: GSO turned off while these waited
                        self.udp.sendto(data[i * size:(i + 1) * size], hop)
            except BlockingIOError:
                return
            except OSError as exc:
                if self.send_failed(exc, data, size, count, hop):
                    continue  # again, one datagram per send
            else:
                c.sent_packets += count
                c.sent_bytes += len(data)
            parked.pop(0)
        self._resume(self.tun_fd, self.udp.fileno(), self.mover.on_tun_readable)

    def _on_tun_writable(self) -> None:
        parked = self.parked_writes
        while parked:
            data, packets = parked[0]
            if not self.write_tun([data], packets):
                return
            parked.pop(0)
        self._resume(self.udp.fileno(), self.tun_fd, self.mover.on_udp_readable)

    def _pause(self, read_fd: int, write_fd: int, on_writable) -> None:
        """Stop reading ``read_fd`` until ``write_fd`` can take what is parked."""
        assert self.loop is not None
        self.counters.backpressure_pauses += 1
        self.loop.remove_reader(read_fd)
        self.loop.add_writer(write_fd, on_writable)

    def _resume(self, read_fd: int, write_fd: int, on_readable) -> None:
        assert self.loop is not None
        self.loop.remove_writer(write_fd)
        self.loop.add_reader(read_fd, on_readable)

    # -- what went wrong, handled once -------------------------------------------------------------
    def write_tun(self, iov: list, packets: int) -> bool:
        """One writev to the TUN carrying ``packets`` packets; False if it is full (the caller parks)."""
        c = self.counters
        c.tun_writes += 1
        try:
            written = os.writev(self.tun_fd, iov)
        except BlockingIOError:
            return False
        except OSError as exc:
            self.write_failed(exc, packets)
            return True
        c.delivered_packets += packets
        c.delivered_bytes += written - self.tun_header
        return True

    def write_failed(self, exc: OSError, packets: int) -> None:
        self.counters.tun_write_errors += packets
        log.debug("TUN write failed: %s", exc)

    def send_failed(self, exc: OSError, data, size: int, count: int, hop: NextHop, *, refit: bool = True) -> bool:
        """A send of ``count`` datagrams (``size`` bytes each, the last maybe shorter) to ``hop`` failed.
        EMSGSIZE (and EINVAL from older kernels' GSO send): the path narrowed, the mover refits them
        (unless ``refit`` is off); EIO from a GSO send: GSO goes off, and True asks the caller to send
        them again one by one; anything else is counted and logged."""
        if exc.errno == errno.EIO and count > 1:
            self.counters.udp_gso_fallbacks += 1
            if self.max_segments > 1:
                log.warning("UDP GSO send failed (%s): the egress device lacks checksum offload; "
                            "sending one datagram per syscall from now on", exc)
            self.max_segments = 1
            return True
        if refit and (exc.errno == errno.EMSGSIZE or exc.errno == errno.EINVAL and count > 1):
            self.mover.refit(data, size, hop)
            return False
        self.counters.send_errors += count
        log.debug("send to %s failed: %s", hop, exc)
        return False

    def drop(self, verdict: Verdict, pkt, n: int, drops: list[int]) -> None:
        """Count the drop; answer with ICMP where a router would (no route, TTL expired)."""
        drops[verdict] += 1
        if verdict in _ANSWERED:
            self.send_icmp(icmp.error_for(verdict, pkt, n, src=self.tun_address))

    def send_icmp(self, packet: bytes | None) -> None:
        if packet is None or self.icmp_sock is None or self.loop is None:
            return
        if not self.icmp_limiter.allow(now=self.loop.time()):
            self.counters.icmp_rate_limited += 1
            return
        try:
            self.icmp_sock.sendto(packet, (str(IPv4Address(packet[16:20])), 0))
        except OSError as exc:
            log.debug("ICMP send failed: %s", exc)
            return
        self.counters.icmp_sent += 1

    # -- a narrower path to a peer (udpflannel/pmtu.py) ------------------------------------------------
    def narrower_path(self, hop: NextHop, largest: int) -> int | None:
        """The kernel refused a datagram of ``largest`` bytes to ``hop`` (EMSGSIZE): the largest inner
        packet that fits its path now, or None when the path MTU does not explain the refusal. Our
        copy is read again only when it does not explain it (a datagram as large fits no narrower path
        than the one we know)."""
        limit = self.path_mtus.limits.get(hop)
        if limit is None or largest <= limit:
            limit = self.read_path_mtu(hop)
        if limit is None or largest <= limit:
            return None
        return limit

    def read_path_mtu(self, hop: NextHop) -> int | None:
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
        if limit is not None and hop not in self._pmtu_rechecks and self.loop is not None:
            self._pmtu_rechecks[hop] = self.loop.call_later(self.pmtu_recheck, self._recheck_path_mtu, hop)
        return limit

    def _recheck_path_mtu(self, hop: NextHop) -> None:
        self._pmtu_rechecks.pop(hop, None)
        self.read_path_mtu(hop)

    def answer_too_big(self, pkt, n: int, hop: NextHop, limit: int) -> None:
        """A packet of ``n`` bytes for ``hop``, where only ``limit`` fit: with DF, dropped and answered
        with ICMP frag-needed (next-hop MTU = ``limit``, the path MTU − 28) from flannel0's address, so
        the sender lowers its segment size; without DF, fragmented (``udpflannel.fragment``)."""
        c = self.counters
        if dont_fragment(pkt):
            c.tun_drops[TOO_BIG] += 1
            self.send_icmp(icmp.frag_needed(pkt, n, src=self.tun_address, mtu=limit))
            return
        pieces = fragment(pkt, n, limit)
        if not pieces:  # not a whole packet, or a path too narrow for any fragment
            c.tun_drops[TOO_BIG] += 1
            return
        c.fragmented_packets += 1
        for piece in pieces:
            c.udp_sends += 1
            try:
                self.udp.sendto(piece, hop)
            except OSError as exc:
                self.send_failed(exc, piece, len(piece), 1, hop, refit=False)
            else:
                c.sent_packets += 1
                c.sent_bytes += len(piece)


_ANSWERED = frozenset({Verdict.NO_ROUTE, Verdict.TTL_EXPIRED})  # the drops a router answers (icmp.error_for)
