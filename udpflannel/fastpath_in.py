"""The fast path's way in, UDP → TUN: GRO batches received in bulk, checked in one pass, merged.

    UDP_GRO recvmsg_into (up to 64 datagrams each, back to back) → rows grouped by flow, per-row checks
    and verdicts (``udpflannel.batch`` over ``tun.coalesce``) → one writev per TCP run (or UDP run, where
    the TUN has USO): a flow's segments merge across the whole table, however flows interleave

Every datagram gets exactly the verdict ``udpflannel.forward.inbound`` would give it alone; batching
only changes how many of them one syscall moves.
"""

from __future__ import annotations

import logging
import os
import socket
from typing import TYPE_CHECKING

from tun import gso, vnet
from udpflannel.batch import inbound_batches
from udpflannel.forward import inbound
from udpflannel.pace import Pace
from udpflannel.packet import FORWARD, OVERSIZE, TOO_SHORT, Verdict
from udpflannel.routes import NextHop
from udpflannel.sockets import GRO_CMSG_SPACE, gro_size

if TYPE_CHECKING:
    from udpflannel.engine import Engine
    from udpflannel.tracehub import TraceHub

log = logging.getLogger(__name__)

RX_ROOM = 65536 + 8  # what one recvmsg may fill: a UDP GRO batch is at most 64 KB
RX_BYTES = 16 * RX_ROOM  # received before deciding: up to 16 batches checked in one pass
_MSG_TRUNC = int(socket.MSG_TRUNC)  # a plain int: socket.MSG_TRUNC is an IntFlag, slow to "&" with


class Inbound:
    """UDP → TUN for the :class:`~udpflannel.fastpath.BatchMover`; see the module docstring."""

    def __init__(self, engine: Engine, pace: Pace, *, merge_udp: bool) -> None:
        self.engine, self.pace = engine, pace
        self._rx = bytearray(RX_BYTES + gso.BUFFER_SIZE)
        self._rx_mv = memoryview(self._rx)
        self._rx_start = [self._rx_mv[:RX_ROOM]]  # where every wake-up's first datagram goes
        self.first_receive = self._rx_start[0]  # (the C pass's too: udpflannel/lone.py)
        self._coalescer = gso.Coalescer(self._rx, udp=merge_udp)  # USO: the TUN takes UDP super-packets
        self._woke = 0  # when the socket last woke us (QUIET_NS)

    def on_udp_readable(self) -> None:
        """A wake-up. Its first receive is handled here in as few steps as the per-packet path takes: a
        single datagram is decided and written at once and, on a quiet socket, that ends the wake-up.
        A GRO batch, or a busy socket, goes on to ``_receive_on``."""
        e = self.engine
        c = e.counters
        c.udp_wakeups += 1
        quiet, self._woke = self.pace.woke(self._woke)
        c.udp_recvs += 1
        try:
            received = e.udp.recvmsg_into(self._rx_start, GRO_CMSG_SPACE)
        except BlockingIOError:
            return
        except OSError as exc:  # (EINTR included) the batch path receives again
            log.debug("recvmsg failed: %s", exc)
            self._receive_on(None)
            return
        self._first(received, quiet)

    def _first(self, received: tuple, quiet: bool) -> None:
        """The wake-up's first receive: what ``recvmsg_into`` returned, the datagram at offset 0."""
        e = self.engine
        c = e.counters
        nbytes, ancdata, msg_flags, peer = received
        if ancdata or msg_flags or e.parked_writes:
            self._receive_on(received)
            return
        c.udp_packets += 1
        c.udp_bytes += nbytes
        rx = self._rx  # the bytearray itself, as the per-packet engine does: quicker than a view
        verdict = self._decide_datagram(rx, nbytes, peer, e.tracer)
        if verdict:
            e.drop(verdict, rx, nbytes, c.udp_drops)
        else:
            e.peer_rx[peer] = e.peer_rx.get(peer, 0) + 1
            iov = [vnet.PLAIN, self._rx_mv[:nbytes]]
            if not e.write_tun(iov, 1):
                e.park_write(b"".join(iov), 1)
                return
        if not quiet:
            self._receive_on(None)
        # else: a quiet socket, nothing else is likely to be waiting: back to sleep (latency)

    # the C pass's hand-overs (udpflannel/lone.py): ``read_on`` is 1 when the socket was not quiet
    def lone_datagram(self, n: int, peer: NextHop, ancdata: list, msg_flags: int, read_on: int) -> None:
        """A first receive the C pass did not deliver (a GRO batch, a drop): as if received here."""
        self._first((n, ancdata, msg_flags, peer), not read_on)

    def lone_unwritten(self, n: int, err: int, read_on: int) -> None:
        """The C pass accepted the first datagram (TTL decremented); writing it to the TUN failed."""
        exc = OSError(err, os.strerror(err))  # EAGAIN: a BlockingIOError
        if isinstance(exc, BlockingIOError):
            self.engine.park_write(b"".join([vnet.PLAIN, self._rx_mv[:n]]), 1)
            return
        self.engine.write_failed(exc, 1)
        if read_on:
            self._receive_on(None)

    def lone_recv_failed(self, err: int, read_on: int) -> None:
        log.debug("recvmsg failed: %s", os.strerror(err))  # (EINTR included) the batch path receives again
        self._receive_on(None)

    def lone_more(self) -> None:
        """The C pass delivered the first datagram; the socket was busy: receive on."""
        self._receive_on(None)

    def _decide_datagram(self, row, nbytes: int, peer: NextHop, tracer: TraceHub | None) -> Verdict:
        """The per-packet decision about one datagram received alone (and its trace, if ``tracer``: the
        engine's, as the caller read it for its wake-up or batch)."""
        e = self.engine
        verdict = inbound(row, nbytes, peer, e.routes, tun_mtu=e.tun_mtu, check_source=e.check_source)
        if tracer is not None:
            tracer.inbound(row, nbytes, verdict, peer)
        return verdict

    def _receive_on(self, first: tuple | None) -> None:
        """Receive until EAGAIN (or the budget), laying the batches out back to back so one kernel
        call checks them all (``Coalescer.plan``); then decide and write, in order.
        ``first``: what the wake-up's first ``recvmsg_into`` returned, already at offset 0."""
        e = self.engine
        c = e.counters
        mv, room, last = self._rx_mv, RX_ROOM, len(self._rx_mv) - RX_ROOM - gso.SPLIT_SLACK
        recvmsg_into, start = e.udp.recvmsg_into, self._rx_start
        table: list[tuple[int, int, int, NextHop]] = []  # (offset, bytes, datagram size, peer)
        at = 0
        for _ in range(e.budget):
            if at > last:
                if not self._deliver(table):
                    return
                table, at = [], 0
            if first is not None:
                (nbytes, ancdata, msg_flags, peer), first = first, None
            else:
                c.udp_recvs += 1
                try:
                    nbytes, ancdata, msg_flags, peer = recvmsg_into(start if at == 0 else [mv[at:at + room]],
                                                                    GRO_CMSG_SPACE)
                except BlockingIOError:
                    break
                except InterruptedError:
                    continue
                except OSError as exc:
                    log.debug("recvmsg failed: %s", exc)
                    continue
            size = gro_size(ancdata, nbytes) if ancdata else nbytes
            if msg_flags & _MSG_TRUNC or size <= 0:  # larger than the room it was received into, or empty
                c.udp_packets += 1
                c.udp_drops[OVERSIZE if msg_flags & _MSG_TRUNC else TOO_SHORT] += 1
                continue
            rows = -(-nbytes // size)
            c.udp_packets += rows
            c.udp_bytes += nbytes
            if rows > 1:
                c.udp_gro_recvs += 1
                c.udp_gro_datagrams += rows
            table.append((at, nbytes, size, peer))
            step = size if size % 8 == 0 else 8  # rows of one size line up across batches
            at = -(-(at + rows * size) // step) * step
        if table:
            self._deliver(table)

    def _deliver(self, table: list[tuple[int, int, int, NextHop]]) -> bool:
        """Decide about and write everything received; False if the TUN filled up (the rest is parked
        and reading paused)."""
        e = self.engine
        c, routes, peer_rx, plain = e.counters, e.routes, e.peer_rx, vnet.PLAIN
        tun_mtu, check_source, tracer = e.tun_mtu, e.check_source, e.tracer  # the trace: once per batch
        i, count = 0, len(table)
        while i < count:
            at, nbytes, seg, peer = table[i]
            end = at + -(-nbytes // seg) * seg
            j = i + 1
            while j < count and table[j][0] == end and table[j][2] == seg:  # one table: same row size
                end += -(-table[j][1] // seg) * seg
                j += 1
            if j == i + 1 and nbytes == seg:  # one datagram: the per-packet decision
                row = self._rx_mv[at:at + nbytes]
                verdict = self._decide_datagram(row, nbytes, peer, tracer)
                units = iter([(verdict, peer, 1, [plain, row] if verdict == FORWARD else row)])
                batched = False
            else:
                self.pace.batch_moved()
                units = inbound_batches(self._coalescer, at, seg, [t[1] for t in table[i:j]],
                                        [t[3] for t in table[i:j]], routes, tun_mtu=tun_mtu, check_source=check_source,
                                        counters=c)
                batched = tracer is not None
            i = j
            for verdict, peer, n, unit in units:
                if batched:
                    _trace_unit(tracer, verdict, peer, n, unit)
                if verdict:
                    e.drop(verdict, unit, len(unit), c.udp_drops)
                    continue
                peer_rx[peer] = peer_rx.get(peer, 0) + n
                if n > 1:
                    c.tun_gso_writes += 1
                    c.tun_gso_segments += n
                if e.parked_writes or not e.write_tun(unit, n):
                    self._park_rest(unit, n, units, table[i:])
                    return False
        return True

    def _park_rest(self, unit: list, n: int, units, table: list) -> None:
        """The TUN is full: copy out what is decided and decide the rest now (the buffer is about to
        be reused); writing resumes when there is room."""
        e = self.engine
        e.park_write(b"".join(unit), n)
        for verdict, _, n, unit in units:
            if verdict:
                e.drop(verdict, unit, len(unit), e.counters.udp_drops)
            else:
                e.park_write(b"".join(unit), n)
        if table:
            self._deliver(table)  # parks everything: something is parked already


def _trace_unit(tracer: TraceHub, verdict: Verdict, peer: NextHop, n: int, unit) -> None:
    """A unit of ``batch.inbound_batches`` for the trace: a refused row, a row forwarded alone
    ([vnet header, row]) or a run merged into one write ([vnet header, pieces...])."""
    if verdict:
        tracer.inbound(unit, len(unit), verdict, peer)
    elif n == 1:
        tracer.inbound(unit[1], len(unit[1]), verdict, peer)
    elif tracer.wants(unit[1], len(unit[1]), peer[0], verdict):  # its headers, before a 64 KB copy
        packet = b"".join(unit[1:])
        tracer.inbound(packet, len(packet), verdict, peer, merged=n)
