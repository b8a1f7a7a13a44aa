"""The fast path's way out, TUN → UDP: super-packets read in bulk, cut in one pass, sent in batches.

    TUN read (TSO super-packets, back to back) → one cut (``tun.segment``) → per-peer batch →
    one sendmsg with UDP_SEGMENT per batch

Buffers: the reads of one wake-up land back to back in one buffer (the first at offset 0 with its
vnet header apart, the others each right after its vnet header), and all their super-packets are cut in
one pass into the segmenter's output, each datagram beside its header, so a batch is a few
contiguous buffers. The datagrams of consecutive super-packets to one peer share a send (carrying
the tail: a 46-segment packet does not cost two sends). A batch points into the segmenter's output
or a copied packet, so what is pending is sent before the output is reused, and before a wake-up
returns (docs/fast-path-profile.md: why reads are not scattered into segment layout instead).

A narrower path to a peer: a super-packet whose segments would not fit it is cut at a smaller segment
size, and its sender told with a rate-limited ICMP frag-needed. A send the kernel refuses with
EMSGSIZE is redone at the kernel's path MTU (:meth:`Outbound.refit`, ``udpflannel/recut.py``): TCP
segments cut to fit, the rest answered as a router answers. No flow stalls on it.
"""

from __future__ import annotations

import errno
import logging
import os
from typing import TYPE_CHECKING

from tun import gso, vnet
from tun.layout import MAX_IP_PACKET
from udpflannel import icmp
from udpflannel.batch import SendBatch, first_segment
from udpflannel.forward import outbound
from udpflannel.pace import Pace
from udpflannel.packet import BAD_HEADER, FORWARD, Verdict, dont_fragment
from udpflannel.recut import recut
from udpflannel.routes import NextHop
from udpflannel.sockets import gso_cmsg

if TYPE_CHECKING:
    from udpflannel.engine import Engine
    from udpflannel.tracehub import TraceHub

log = logging.getLogger(__name__)

TUN_ROOM = 16 + MAX_IP_PACKET + MAX_IP_PACKET  # one read, and the room its cut may pad
TUN_BYTES = 16 * 65536  # read before cutting: up to 16 super-packets cut in one pass
# ICMP frag-needed about packets we cut smaller for a narrow path, per second at most (then also the
# engine's own ICMP limit): the first makes a sender lower its MSS; the rest are already in flight.
PMTU_ADVICE_RATE, PMTU_ADVICE_BURST = 100.0, 10.0
_unpack_vnet = vnet.unpack_from
_fit_segment_size = gso.fit_segment_size
_VERDICT_OF = {reason: Verdict[reason.name] for reason in gso.Refused}  # tun's refusals, as packet verdicts


class Outbound:
    """TUN → UDP for the :class:`~udpflannel.fastpath.BatchMover`; see the module docstring."""

    def __init__(self, engine: Engine, pace: Pace) -> None:
        self.engine, self.pace = engine, pace
        self._in = bytearray(TUN_BYTES + 2 * TUN_ROOM + 64)
        self._in_mv = memoryview(self._in)
        self._in_hdr = bytearray(vnet.VNET_HDR_LEN)
        # A wake-up's first read: header apart, packet at offset 0, where a lone packet is decided and
        # sent in place (no copy). Later reads land back to back, each header just before its packet.
        self._in_start = [self._in_hdr, self._in_mv[:MAX_IP_PACKET]]
        self.first_header, self.first_read = self._in_start  # where the C pass reads too (udpflannel/lone.py)
        self._segmenter = gso.Segmenter(2 * TUN_BYTES)
        self._batches: dict[NextHop, SendBatch] = {}
        self._refitter: gso.Segmenter | None = None  # cuts what a send refused with EMSGSIZE held (refit)
        self._pmtu_advice = icmp.RateLimiter(PMTU_ADVICE_RATE, PMTU_ADVICE_BURST)
        self._woke = 0  # when the TUN last woke us (QUIET_NS)

    def on_tun_readable(self) -> None:
        """A wake-up (the Python one: udpflannel/lone.py). An ordinary first read is forwarded at once
        and, on a quiet fd, that ends the wake-up; a super-packet or a busy fd goes on to ``_read_on``."""
        e = self.engine
        c = e.counters
        c.tun_wakeups += 1
        quiet, self._woke = self.pace.woke(self._woke)
        c.tun_reads += 1
        try:  # the packet lands at offset 0, its vnet header apart
            n = os.readv(e.tun_fd, self._in_start) - vnet.VNET_HDR_LEN
        except BlockingIOError:
            return
        except InterruptedError:
            self._read_on(-1)
            return
        except OSError as exc:
            log.warning("TUN read failed: %s", exc)
            return
        self._first(n, quiet)

    def _first(self, n: int, quiet: bool) -> None:
        """The wake-up's first read, ``n`` bytes at offset 0 (its vnet header in ``_in_hdr``)."""
        e = self.engine
        c = e.counters
        flags, gso_type, _, _, csum_start, csum_offset = _unpack_vnet(self._in_hdr, 0)
        if gso_type != vnet.GSO_NONE:
            self._read_on(n)
            return
        c.tun_bytes += n
        hop = self._decide_plain(self._in, n, flags, csum_start, csum_offset, e.tracer)
        if hop is not None:
            c.udp_sends += 1
            try:
                e.udp.sendto(self._in_mv[:n], hop)
            except OSError as exc:
                self._unsent(n, hop, exc)
            else:
                c.sent_packets += 1
                c.sent_bytes += n
        self._then(quiet)

    def _unsent(self, n: int, hop: NextHop, exc: OSError) -> None:
        """The first read's send failed: on a full socket a copy waits (sent, or parked, with the rest)."""
        if isinstance(exc, BlockingIOError):
            self._queue(hop, memoryview(bytes(self._in_mv[:n])), 0, 1, n, n)
        else:
            self.engine.send_failed(exc, bytes(self._in_mv[:n]), n, 1, hop)

    def _then(self, quiet: bool) -> None:
        if not quiet:
            self._read_on(-1)
        elif self._batches:
            self._send_all()
        # else: a quiet fd, nothing else is likely to be waiting: back to sleep (latency)

    # the C pass's hand-overs (udpflannel/lone.py): ``read_on`` is 1 when the fd was not quiet
    def lone_packet(self, n: int, read_on: int) -> None:
        """A first read the C pass did not forward (a super-packet, a drop): as if read here."""
        self._first(n, not read_on)

    def lone_unsent(self, n: int, hop: NextHop, err: int, read_on: int) -> None:
        """The C pass forwarded the first read (checksum completed, TTL decremented); its send failed."""
        self._unsent(n, hop, OSError(err, os.strerror(err)))  # (EAGAIN makes a BlockingIOError)
        self._then(not read_on)

    def lone_read_failed(self, err: int, read_on: int) -> None:
        if err == errno.EINTR:
            self._read_on(-1)
        else:
            log.warning("TUN read failed: %s", os.strerror(err))

    def lone_more(self) -> None:
        """The C pass forwarded the first read; the fd was busy: read on."""
        self._read_on(-1)

    def _decide_plain(self, pkt: bytearray, n: int, flags: int, csum_start: int, csum_offset: int,
                      tracer: TraceHub | None) -> NextHop | None:
        """One ordinary packet read from the TUN, at the start of ``pkt``: its checksum completed if
        the kernel left it partial, then the per-packet decision. The peer to send it to, or ``None``
        when it was dropped (counted, and answered with ICMP where a router would). ``tracer``: the
        engine's, as the caller read it for its wake-up or batch."""
        e = self.engine
        c = e.counters
        c.tun_packets += 1
        if flags & vnet.NEEDS_CSUM and not vnet.complete_checksum(pkt, n, csum_start, csum_offset):
            if tracer is not None:
                tracer.outbound(pkt, n, BAD_HEADER, None)
            e.drop(BAD_HEADER, pkt, n, c.tun_drops)
            return None
        verdict, hop = outbound(pkt, n, e.routes)
        if tracer is not None:
            tracer.outbound(pkt, n, verdict, hop)
        if verdict:
            e.drop(verdict, pkt, n, c.tun_drops)
            return None
        return hop

    def _read_on(self, first: int) -> None:
        """Read until EAGAIN (or the budget) back to back into one buffer, cut all the super-packets
        in one pass (``Segmenter.cut``), then queue and send per peer, in order. ``first`` ≥ 0: a
        super-packet of that length is already at offset 0 (the wake-up's first read).

        Long on purpose: the hot loop, with its locals bound once; a helper call per read would cost
        ~1 µs per super-packet (docs/fast-path-profile.md)."""
        e = self.engine
        c = e.counters
        fd, routes, readv, limits, tracer = e.tun_fd, e.routes, os.readv, e.path_mtus.limits, e.tracer
        buf, mv, start, first_hdr = self._in, self._in_mv, self._in_start, self._in_hdr
        last = len(buf) - 2 * TUN_ROOM - 64
        supers: list[tuple[int, int, int, int, NextHop]] = []  # read, not yet cut: (at, n, type, size, hop)
        at = 0
        for _ in range(e.budget):
            if at > last:
                self._cut_and_queue(supers)
                supers, at = [], 0
            if first >= 0:
                n, first = first, -1
            else:
                c.tun_reads += 1
                try:  # at 0 as the first read; later ones back to back, each vnet header just before its packet
                    n = readv(fd, start if at == 0 else [mv[at + 6:at + 16 + MAX_IP_PACKET]]) - vnet.VNET_HDR_LEN
                except BlockingIOError:
                    break
                except InterruptedError:
                    continue
                except OSError as exc:
                    log.warning("TUN read failed: %s", exc)
                    break
            if at == 0:
                p = 0
                flags, gso_type, _, gso_size, csum_start, csum_offset = _unpack_vnet(first_hdr, 0)
            else:
                p = at + 16
                flags, gso_type, _, gso_size, csum_start, csum_offset = _unpack_vnet(buf, at + 6)
            c.tun_bytes += n
            if gso_type == vnet.GSO_NONE:  # a copy: small, and it waits in a batch while reads go on
                pkt = bytearray(mv[p:p + n])
                hop = self._decide_plain(pkt, n, flags, csum_start, csum_offset, tracer)
                if hop is None:
                    continue
                if supers:  # keep the order: what was read before goes first
                    self._cut_and_queue(supers)
                    supers = []
                self._queue(hop, memoryview(pkt), 0, 1, n, n)
                continue
            pkt = mv[p:p + n]
            at = p + n + gso_size + 7 & ~7  # room for the cut to zero-pad the last segment
            verdict, hop = outbound(pkt, n, routes)  # one header for all segments: TTL − 1 once for all
            if verdict:
                if tracer is not None:
                    tracer.outbound(pkt, n, verdict, hop, gso=(gso_type, gso_size))
                self._cut_and_queue(supers)
                supers = []
                self._send_all()  # the offender's cut below reuses the segmenter's output they point into
                c.tun_packets += 1
                offender = first_segment(self._segmenter, buf, p, n, gso_type, gso_size)
                e.drop(verdict, offender, len(offender), c.tun_drops)  # one ICMP error at most, as for one packet
                continue
            if limits:  # some peer is behind a narrower path: cut for it (one look-up per super-packet)
                limit = limits.get(hop)
                if limit is not None:
                    fitted = _fit_segment_size(buf, p, n, gso_type, gso_size, limit)
                    if fitted != gso_size:
                        self._advise(pkt, n, limit)
                        gso_size = fitted
            supers.append((p, n, gso_type, gso_size, hop))
        if supers:
            self._cut_and_queue(supers)
        if self._batches:
            self._send_all()

    def _cut_and_queue(self, supers: list[tuple[int, int, int, int, NextHop]]) -> None:
        """Cut the super-packets read so far and queue their datagrams (sending what is pending first:
        its datagrams live in the segmenter's output, which the cut reuses)."""
        if not supers:
            return
        self._send_all()
        self.pace.batch_moved()
        e = self.engine
        c = e.counters
        results = self._segmenter.cut(self._in, [item[:4] for item in supers])
        out, tracer = self._segmenter.out_mv, e.tracer  # the trace: once per batch
        for (p, n, gso_type, gso_size, hop), cut in zip(supers, results, strict=True):
            if tracer is not None:
                verdict = _VERDICT_OF[cut] if isinstance(cut, gso.Refused) else FORWARD
                tracer.outbound(self._in_mv[p:p + n], n, verdict, hop, gso=(gso_type, gso_size),
                                cut=None if verdict else (out, cut.start, cut.count, cut.size, cut.last))
            if isinstance(cut, gso.Refused):
                c.tun_packets += 1
                e.drop(_VERDICT_OF[cut], self._in_mv[p:p + n], n, c.tun_drops)
                continue
            c.tun_superpackets += 1
            c.tun_packets += cut.count
            self._queue(hop, out, cut.start, cut.count, cut.size, cut.last)

    def _queue(self, hop: NextHop, mv: memoryview, start: int, count: int, size: int, last: int) -> None:
        """Append ``count`` datagrams (``size`` bytes apart from ``start`` in ``mv``, the last ``last``
        bytes long) to ``hop``'s batch, sending whenever a batch is full or closed."""
        batches, max_segments = self._batches, self.engine.max_segments
        batch = batches.get(hop)
        if batch is not None and (batch.closed or (batch.size != size and not (count == 1 and size < batch.size))):
            self._send(hop)
            batch = None
        if batch is None:
            batch = batches[hop] = SendBatch(size, max_segments)
        room = batch.most - batch.count
        while count > room:  # fill the batch, send it, go on in a new one
            nbytes = room * size
            batch.iov.append(mv[start:start + nbytes])
            batch.count += room
            batch.nbytes += nbytes
            self._send(hop)
            start += nbytes
            count -= room
            batch = batches[hop] = SendBatch(size, self.engine.max_segments)
            room = batch.most
        nbytes = (count - 1) * size + last
        batch.iov.append(mv[start:start + nbytes])
        batch.count += count
        batch.nbytes += nbytes
        if last < batch.size:  # a short datagram ends a GSO batch
            batch.closed = True
            self._send(hop)
        elif count == room:
            self._send(hop)

    def _send_all(self) -> None:
        for hop in list(self._batches):
            self._send(hop)

    def _send(self, hop: NextHop) -> None:
        """One sendmsg for ``hop``'s batch (UDP_SEGMENT if it holds several datagrams)."""
        batch = self._batches.pop(hop)
        e = self.engine
        c = e.counters
        if e.parked_sends:  # keep order behind what is already waiting for room
            self._park(batch, hop, 0)
            return
        c.udp_sends += 1
        try:
            if batch.count == 1:
                e.udp.sendmsg(batch.iov, (), 0, hop)
            else:
                e.udp.sendmsg(batch.iov, gso_cmsg(batch.size), 0, hop)
        except BlockingIOError:
            self._park(batch, hop, 0)
            return
        except OSError as exc:
            if e.send_failed(exc, b"".join(batch.iov), batch.size, batch.count, hop):
                self._send_one_by_one(batch, hop)
            return
        c.sent_packets += batch.count
        c.sent_bytes += batch.nbytes
        if batch.count > 1:
            c.udp_gso_sends += 1
            c.udp_gso_datagrams += batch.count

    def _send_one_by_one(self, batch: SendBatch, hop: NextHop) -> None:
        e = self.engine
        c, size, sendmsg = e.counters, batch.size, e.udp.sendmsg
        datagrams = [chunk[i:i + size] for chunk in batch.iov for i in range(0, len(chunk), size)]
        for i, datagram in enumerate(datagrams):
            c.udp_sends += 1
            try:
                sent = sendmsg([datagram], (), 0, hop)
            except BlockingIOError:
                self._park(batch, hop, i)
                return
            except OSError as exc:
                e.send_failed(exc, bytes(datagram), len(datagram), 1, hop)
                continue
            c.sent_packets += 1
            c.sent_bytes += sent

    def _park(self, batch: SendBatch, hop: NextHop, first: int) -> None:
        """The socket is full: the engine keeps a copy of what is left of ``batch`` (from datagram
        ``first``; the buffers will be reused) and stops reading the TUN."""
        data = b"".join(batch.iov)[first * batch.size:]
        count = batch.count - first
        self.engine.park_send(data, batch.size if count > 1 else len(data), count, hop)

    # -- a narrower path to a peer ---------------------------------------------------------------------
    def _advise(self, pkt, n: int, limit: int) -> None:
        """A TCP packet of ``n`` bytes cut smaller to fit ``limit``: tell its sender (frag-needed, if it
        set DF: it does path-MTU discovery), so that its next packets fit without a cut."""
        e = self.engine
        e.counters.pmtu_cuts += 1
        if e.loop is not None and dont_fragment(pkt) and self._pmtu_advice.allow(now=e.loop.time()):
            e.send_icmp(icmp.frag_needed(pkt, n, src=e.tun_address, mtu=limit))

    def refit(self, data: bytes, size: int, hop: NextHop) -> None:
        """The kernel refused to send ``data`` (datagrams of ``size`` bytes, the last maybe shorter) to
        ``hop`` with EMSGSIZE: it has learnt a narrower path than the one we cut for. Read its path MTU
        and send them again: those that fit as they are, TCP segments cut to fit (and their senders
        told), the rest answered as a router answers (``Engine.answer_too_big``). In order."""
        e = self.engine
        count = -(-len(data) // size)
        limit = e.narrower_path(hop, size if count > 1 else len(data))
        if limit is None:  # the path MTU does not explain it
            e.counters.send_errors += count
            log.debug("sendmsg to %s refused %d datagrams of %d bytes, path MTU %s", hop, count, size, limit)
            return
        e.counters.pmtu_refits += 1
        mv = memoryview(data)
        datagrams = [mv[i:i + size] for i in range(0, len(data), size)]
        if self._refitter is None:
            self._refitter = gso.Segmenter(2 * gso.BUFFER_SIZE)
        cuts, out = recut(datagrams, limit, self._refitter)
        for i, datagram in enumerate(datagrams):
            n = len(datagram)
            cut = cuts.get(i)
            if n <= limit:
                self._queue(hop, datagram, 0, 1, n, n)
            elif cut is None or isinstance(cut, gso.Refused):
                if hop in self._batches:  # its answer (fragments, say) goes after what came before it
                    self._send(hop)
                e.answer_too_big(datagram, n, hop, limit)
            else:
                self._advise(datagram, n, limit)
                self._queue(hop, out, cut.start, cut.count, cut.size, cut.last)
        if hop in self._batches:
            self._send(hop)
