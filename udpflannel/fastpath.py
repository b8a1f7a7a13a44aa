"""The fast path: the same dataplane as ``udpflannel.engine``, with each syscall moving up to 64 KB.

    TUN read (one TSO super-packet) → split → per-peer batch → one sendmsg with UDP_SEGMENT
    UDP_GRO recvmsg_into (up to 64 datagrams) → per-row checks → coalesce → one writev per TCP run
                                                                 (or UDP run, where the TUN has USO)

The wire does not change: every datagram is one ordinary IPv4 packet with correct checksums, the
segment the kernel's own GSO would have made, so flanneld and per-packet peers interoperate.
Decisions stay in sans-IO code (``tun.gso``, ``udpflannel.batch`` on top of ``udpflannel.forward``);
this module only moves buffers.

Buffers: the reads of one wake-up land back to back in one buffer (the first at offset 0 with its
vnet header apart, the others each right after its vnet header), and all their super-packets are cut in
one pass into the segmenter's output, each datagram beside its header, so a batch is a few
contiguous buffers. The datagrams of consecutive super-packets to one peer share a send (carrying
the tail: a 46-segment packet does not cost two sends). A batch points into the segmenter's output
or a copied packet, so what is pending is sent before the output is reused, and before a wake-up
returns. (Reading straight into segment layout, payloads scattered so that nothing is copied, was
measured and dropped: a readv into ~47 pieces costs the kernel ~8 µs more per super-packet than
the copy it saves.)

Latency: batching must not cost a lone packet anything. Each wake-up's first read is handled in
the callback itself, in about as few steps as the per-packet path takes (``_on_tun_readable``,
``_on_udp_readable``): an ordinary packet is forwarded at once, in place; only super-packets, GRO
batches and busy fds go on to the batch loops (``_read_on``, ``_receive_on``). On a quiet fd (no
wake-up for ``QUIET_NS``, and no batch moved for ``BULK_NS``) the wake-up ends there, without
reading on to EAGAIN — the level-triggered event loop calls again if more came. That trailing read
is what a request/response exchange would otherwise wait for: on two vCPUs the next hop's process
often needs the CPU this one is still busy on. While batches move, the lone packets are ACKs, and
draining them all at once is what keeps the bulk flows fast.

A narrower path to a peer (``udpflannel/pmtu.py``): each super-packet for it is compared once with
the path's limit and, if its segments would not fit, cut at a smaller segment size (a TSO super-packet
is a TCP byte range: ``gso.fit_segment_size``), and its sender is told with a rate-limited ICMP
frag-needed, so that its next super-packets fit. A send the kernel refuses with EMSGSIZE (it learnt a
narrower path than ours) is redone at the kernel's path MTU (``_refit``): TCP segments cut to fit,
the rest answered as a router answers (frag-needed with DF, fragments without). No flow stalls on it.

Fallbacks, each logged once: no TSO on the TUN → the per-packet engine (node.py decides); no UDP GSO,
or EIO from a GSO send (the egress device cannot checksum) → one send per segment; no UDP GRO → one
datagram per receive, still written through the same path.
"""

from __future__ import annotations

import errno
import logging
import os
import socket
import time

from tun import TunDevice, gso, open_tun, vnet
from tun.gso import Refused
from tun.layout import MAX_IP_PACKET, UDP_MAX_SEGMENTS
from tun.offload import TunOffloads, enable_offloads
from udpflannel import icmp
from udpflannel.batch import inbound_batches
from udpflannel.engine import Dataplane, IcmpLimiter
from udpflannel.features import Features
from udpflannel.forward import describe, inbound, outbound
from udpflannel.packet import Verdict, dont_fragment
from udpflannel.routes import NextHop
from udpflannel.sockets import (
    GRO_CMSG_SPACE,
    UDP_MAX_PAYLOAD,
    gro_size,
    gso_cmsg,
    probe_udp_offloads,
)

log = logging.getLogger(__name__)
trace_log = logging.getLogger("udpflannel.trace")

RX_ROOM = 65536 + 8  # what one recvmsg may fill: a UDP GRO batch is at most 64 KB
RX_BYTES = 16 * RX_ROOM  # received before deciding: up to 16 batches checked in one pass
TUN_ROOM = 16 + MAX_IP_PACKET + MAX_IP_PACKET  # one read, and the room its cut may pad
TUN_BYTES = 16 * 65536  # read before cutting: up to 16 super-packets cut in one pass
_unpack_vnet = vnet.unpack_from
_MSG_TRUNC = int(socket.MSG_TRUNC)  # a plain int: socket.MSG_TRUNC is an IntFlag, slow to "&" with
# A wake-up that comes this long after the previous one finds a quiet fd: if its first read is a lone
# packet, that packet is forwarded and the callback returns without reading on to EAGAIN. Under load
# wake-ups follow each other closely and every one drains the fd as before.
QUIET_NS = 100_000
# ...and not while batches are moving (a super-packet cut or a GRO batch checked in the last BULK_NS):
# then the lone packets are the bulk flows' ACKs, and one left behind waits for a whole batch's
# processing before the loop comes back to its fd — TCP throughput fell ~10 % that way.
BULK_NS = 10_000_000
_clock = time.monotonic_ns
# ICMP frag-needed about packets we cut smaller for a narrow path, per second at most (then also the
# engine's own ICMP limit): the first makes a sender lower its MSS; the rest are already in flight.
PMTU_ADVICE_RATE, PMTU_ADVICE_BURST = 100.0, 10.0
_fit_segment_size = gso.fit_segment_size
_VERDICT_OF = {reason: Verdict[reason.name] for reason in Refused}  # tun's refusals, counted as packet verdicts


def open_tun_for(fast_path: bool, disabled: frozenset[str] = frozenset()) -> tuple[TunDevice, TunOffloads]:
    """The TUN for the engine to come: with the fast path, IFF_VNET_HDR and TSO (and USO if the
    kernel has it and it is not ``disabled``); if TSO is refused or disabled, or without the fast
    path, a plain one as flannel's."""
    if fast_path and "tun_tso" not in disabled:
        tun = open_tun(vnet_hdr=True)
        offloads = enable_offloads(tun.fd, uso="tun_uso" not in disabled)
        if offloads.tso:
            return tun, offloads
        tun.close()
        log.warning("TUN offloads unavailable: using the per-packet path")
    return open_tun(), TunOffloads()


def probe_features(tun: TunOffloads, udp: socket.socket, disabled: frozenset[str] = frozenset()) -> Features:
    """Probe the socket (turning UDP_GRO on unless disabled) and combine with the TUN's offloads."""
    return Features.from_probes(tun, probe_udp_offloads(udp, gro="udp_gro" not in disabled), disabled=disabled)


class _Batch:
    """Datagrams queued for one peer: every one ``size`` bytes but a shorter last, which closes it.
    ``iov`` holds runs of whole datagrams (views of the segmenter's output, or copies)."""

    __slots__ = ("iov", "count", "size", "nbytes", "closed", "most")

    def __init__(self, size: int, max_segments: int) -> None:
        self.iov: list = []
        self.count = 0
        self.size = size
        self.nbytes = 0
        self.closed = False
        self.most = max(1, min(max_segments, UDP_MAX_PAYLOAD // size))  # datagrams one sendmsg may carry


class FastDataplane(Dataplane):
    """``Dataplane`` with the TUN in vnet-header mode and UDP GSO/GRO; same apply/attach/detach."""

    def __init__(self, *, features: Features, **kwargs) -> None:
        super().__init__(**kwargs)
        self.features = features
        self._max_segments = UDP_MAX_SEGMENTS if features.udp_gso else 1
        self._in = bytearray(TUN_BYTES + 2 * TUN_ROOM + 64)
        self._in_mv = memoryview(self._in)
        self._in_hdr = bytearray(vnet.VNET_HDR_LEN)
        # A wake-up's first read: header apart, packet at offset 0, where a lone packet is decided and
        # sent in place (no copy). Later reads land back to back, each header just before its packet.
        self._in_start = [self._in_hdr, self._in_mv[:MAX_IP_PACKET]]
        self._segmenter = gso.Segmenter(2 * TUN_BYTES)
        self._batches: dict[NextHop, _Batch] = {}
        self._parked_sends: list[tuple[bytes, int, int, NextHop]] = []  # (data, size, count, hop)
        self._rx = bytearray(RX_BYTES + gso.BUFFER_SIZE)
        self._rx_mv = memoryview(self._rx)
        self._rx_start = [self._rx_mv[:RX_ROOM]]  # where every wake-up's first datagram goes
        self._coalescer = gso.Coalescer(self._rx, udp=features.tun_uso)  # USO: the TUN takes UDP super-packets
        self._parked_writes: list[tuple[bytes, int]] = []  # (data with vnet header, packets)
        self._refitter: gso.Segmenter | None = None  # cuts what a send refused with EMSGSIZE held (_refit)
        self._pmtu_advice = IcmpLimiter(PMTU_ADVICE_RATE, PMTU_ADVICE_BURST)
        self._tun_woke = self._udp_woke = 0  # when each fd last woke us (QUIET_NS)
        self._bulk_until = 0  # batches moved recently: no fd counts as quiet before then (BULK_NS)
        kernels = gso.warm_up()  # compile (or load) the GSO/GRO loops now, not during the first transfer
        log.info("fast path: %s; GSO/GRO loops: %s", features.describe(), kernels)

    # -- TUN -> UDP ----------------------------------------------------------------------------------
    def _on_tun_readable(self) -> None:
        """A wake-up. Its first read is handled here in as few steps as the per-packet path takes: an
        ordinary packet is forwarded at once and, on a quiet fd, that ends the wake-up. A super-packet,
        or a busy fd, goes on to ``_read_on``."""
        c = self.counters
        c.tun_wakeups += 1
        now = _clock()
        quiet, self._tun_woke = now - self._tun_woke > QUIET_NS and now > self._bulk_until, now
        c.tun_reads += 1
        try:  # the packet lands at offset 0, its vnet header apart
            n = os.readv(self.tun_fd, self._in_start) - vnet.VNET_HDR_LEN
        except BlockingIOError:
            return
        except InterruptedError:
            self._read_on(-1)
            return
        except OSError as exc:
            log.warning("TUN read failed: %s", exc)
            return
        flags, gso_type, _, _, csum_start, csum_offset = _unpack_vnet(self._in_hdr, 0)
        if gso_type != vnet.GSO_NONE:
            self._read_on(n)
            return
        c.tun_bytes += n
        hop = self._decide_plain(self._in, n, flags, csum_start, csum_offset)
        if hop is not None:
            c.udp_sends += 1
            try:
                self.udp.sendto(self._in_mv[:n], hop)
            except BlockingIOError:  # a copy, sent (or parked) with the rest
                self._queue(hop, memoryview(bytes(self._in_mv[:n])), 0, 1, n, n)
            except OSError as exc:
                if exc.errno == errno.EMSGSIZE:
                    self._refit(bytes(self._in_mv[:n]), n, hop)
                else:
                    c.send_errors += 1
                    log.debug("sendto %s failed: %s", hop, exc)
            else:
                c.sent_packets += 1
                c.sent_bytes += n
        if not quiet:
            self._read_on(-1)
        elif self._batches:
            self._send_all()
        # else: a quiet fd, nothing else is likely to be waiting: back to sleep (latency)

    def _decide_plain(self, pkt: bytearray, n: int, flags: int, csum_start: int, csum_offset: int) -> NextHop | None:
        """One ordinary packet read from the TUN, at the start of ``pkt``: its checksum completed if
        the kernel left it partial, then the per-packet decision. The peer to send it to, or ``None``
        when it was dropped (counted, and answered with ICMP where a router would)."""
        c = self.counters
        c.tun_packets += 1
        if flags & vnet.NEEDS_CSUM and not vnet.complete_checksum(pkt, n, csum_start, csum_offset):
            self._drop(Verdict.BAD_HEADER, pkt, n, c.tun_drops)
            return None
        verdict, hop = outbound(pkt, n, self.routes)
        if self.trace:
            trace_log.debug("tun>udp %s -> %s %s", describe(pkt, n), verdict.name, hop)
        if verdict:
            self._drop(verdict, pkt, n, c.tun_drops)
            return None
        return hop

    def _read_on(self, first: int) -> None:
        """Read until EAGAIN (or the budget) back to back into one buffer, cut all the super-packets
        in one pass (``Segmenter.cut``), then queue and send per peer, in order. ``first`` ≥ 0: a
        super-packet of that length is already at offset 0 (the wake-up's first read)."""
        c = self.counters
        fd, routes, readv, limits = self.tun_fd, self.routes, os.readv, self.path_mtus.limits
        buf, mv, start, first_hdr = self._in, self._in_mv, self._in_start, self._in_hdr
        last = len(buf) - 2 * TUN_ROOM - 64
        supers: list[tuple[int, int, int, int, NextHop]] = []  # read, not yet cut: (at, n, type, size, hop)
        at = 0
        for _ in range(self.budget):
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
                hop = self._decide_plain(pkt, n, flags, csum_start, csum_offset)
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
            if self.trace:
                trace_log.debug("tun>udp super-packet %s gso %d/%d -> %s %s", describe(pkt, n), gso_type,
                                gso_size, verdict.name, hop)
            if verdict:
                self._cut_and_queue(supers)
                supers = []
                self._send_all()  # the offender's cut below reuses the segmenter's output they point into
                c.tun_packets += 1
                offender = self._first_segment(p, n, gso_type, gso_size)
                self._drop(verdict, offender, len(offender), c.tun_drops)  # one ICMP error at most, as for one packet
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

    def _first_segment(self, p: int, n: int, gso_type: int, gso_size: int) -> bytes:
        """What an ICMP error about a refused super-packet quotes: its first segment (or itself)."""
        [cut] = self._segmenter.cut(self._in, [(p, n, gso_type, gso_size)])
        if isinstance(cut, Refused):
            return bytes(self._in_mv[p:p + n])
        return bytes(self._segmenter.out_mv[cut.start:cut.start + (cut.size if cut.count > 1 else cut.last)])

    def _cut_and_queue(self, supers: list[tuple[int, int, int, int, NextHop]]) -> None:
        """Cut the super-packets read so far and queue their datagrams (sending what is pending first:
        its datagrams live in the segmenter's output, which the cut reuses)."""
        if not supers:
            return
        self._send_all()
        self._bulk_until = _clock() + BULK_NS
        c = self.counters
        results = self._segmenter.cut(self._in, [item[:4] for item in supers])
        out = self._segmenter.out_mv
        for (p, n, _, _, hop), cut in zip(supers, results, strict=True):
            if isinstance(cut, Refused):
                c.tun_packets += 1
                self._drop(_VERDICT_OF[cut], self._in_mv[p:p + n], n, c.tun_drops)
                continue
            c.tun_superpackets += 1
            c.tun_packets += cut.count
            self._queue(hop, out, cut.start, cut.count, cut.size, cut.last)

    def _queue(self, hop: NextHop, mv: memoryview, start: int, count: int, size: int, last: int) -> None:
        """Append ``count`` datagrams (``size`` bytes apart from ``start`` in ``mv``, the last ``last``
        bytes long) to ``hop``'s batch, sending whenever a batch is full or closed."""
        batches = self._batches
        batch = batches.get(hop)
        if batch is not None and (batch.closed or (batch.size != size and not (count == 1 and size < batch.size))):
            self._send(hop)
            batch = None
        if batch is None:
            batch = batches[hop] = _Batch(size, self._max_segments)
        room = batch.most - batch.count
        while count > room:  # fill the batch, send it, go on in a new one
            nbytes = room * size
            batch.iov.append(mv[start:start + nbytes])
            batch.count += room
            batch.nbytes += nbytes
            self._send(hop)
            start += nbytes
            count -= room
            batch = batches[hop] = _Batch(size, self._max_segments)
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
        c = self.counters
        if self._parked_sends:  # keep order behind what is already waiting for room
            self._park_send(batch, hop, 0)
            return
        c.udp_sends += 1
        try:
            if batch.count == 1:
                self.udp.sendmsg(batch.iov, (), 0, hop)
            else:
                self.udp.sendmsg(batch.iov, gso_cmsg(batch.size), 0, hop)
        except BlockingIOError:
            self._park_send(batch, hop, 0)
            return
        except OSError as exc:
            if exc.errno == errno.EIO and batch.count > 1:
                self._gso_failed(exc)
                self._send_one_by_one(batch, hop)
            elif exc.errno == errno.EMSGSIZE or exc.errno == errno.EINVAL and batch.count > 1:
                self._refit(b"".join(batch.iov), batch.size, hop)  # EINVAL: older kernels' GSO send
            else:
                c.send_errors += batch.count
                log.debug("sendmsg to %s failed: %s", hop, exc)
            return
        c.sent_packets += batch.count
        c.sent_bytes += batch.nbytes
        if batch.count > 1:
            c.udp_gso_sends += 1
            c.udp_gso_datagrams += batch.count

    def _gso_failed(self, exc: OSError) -> None:
        """EIO from a GSO send: the egress device cannot checksum for us. Off for good, said once."""
        self.counters.udp_gso_fallbacks += 1
        if self._max_segments > 1:
            log.warning("UDP GSO send failed (%s): the egress device lacks checksum offload; "
                        "sending one datagram per syscall from now on", exc)
        self._max_segments = 1

    def _send_one_by_one(self, batch: _Batch, hop: NextHop) -> None:
        c, size, sendmsg = self.counters, batch.size, self.udp.sendmsg
        datagrams = [chunk[i:i + size] for chunk in batch.iov for i in range(0, len(chunk), size)]
        for i, datagram in enumerate(datagrams):
            c.udp_sends += 1
            try:
                sent = sendmsg([datagram], (), 0, hop)
            except BlockingIOError:
                self._park_send(batch, hop, i)
                return
            except OSError as exc:
                if exc.errno == errno.EMSGSIZE:
                    self._refit(bytes(datagram), len(datagram), hop)
                else:
                    c.send_errors += 1
                    log.debug("sendmsg to %s failed: %s", hop, exc)
                continue
            c.sent_packets += 1
            c.sent_bytes += sent

    def _park_send(self, batch: _Batch, hop: NextHop, first: int) -> None:
        """The socket is full: copy what is left (the buffers will be reused) and stop reading the TUN."""
        if not self._parked_sends:
            self._pause(self.tun_fd, self.udp.fileno(), self._on_udp_writable)
        data = b"".join(batch.iov)[first * batch.size:]
        count = batch.count - first
        self._parked_sends.append((data, batch.size if count > 1 else len(data), count, hop))

    def _on_udp_writable(self) -> None:
        c = self.counters
        parked = self._parked_sends
        while parked:
            data, size, count, hop = parked[0]
            c.udp_sends += 1
            try:
                if count > 1 and self._max_segments > 1:
                    self.udp.sendmsg([data], gso_cmsg(size), 0, hop)
                else:
                    for i in range(count):  # rare: GSO turned off while these waited
                        self.udp.sendto(data[i * size:(i + 1) * size], hop)
            except BlockingIOError:
                return
            except OSError as exc:
                if exc.errno == errno.EIO and count > 1:
                    self._gso_failed(exc)
                    continue
                if exc.errno == errno.EMSGSIZE or exc.errno == errno.EINVAL and count > 1:
                    parked.pop(0)
                    self._refit(data, size, hop)
                    continue
                c.send_errors += count
            else:
                c.sent_packets += count
                c.sent_bytes += len(data)
            parked.pop(0)
        self._resume(self.tun_fd, self.udp.fileno(), self._on_tun_readable)

    # -- a narrower path to a peer ---------------------------------------------------------------------
    def _advise(self, pkt, n: int, limit: int) -> None:
        """A TCP packet of ``n`` bytes cut smaller to fit ``limit``: tell its sender (frag-needed, if it
        set DF: it does path-MTU discovery), so that its next packets fit without a cut."""
        self.counters.pmtu_cuts += 1
        if self._loop is not None and dont_fragment(pkt) and self._pmtu_advice.allow(now=self._loop.time()):
            self._send_icmp(icmp.frag_needed(pkt, n, src=self.tun_address, mtu=limit))

    def _refit(self, data: bytes, size: int, hop: NextHop) -> None:
        """The kernel refused to send ``data`` (datagrams of ``size`` bytes, the last maybe shorter) to
        ``hop`` with EMSGSIZE: it has learnt a narrower path than the one we cut for. Read its path MTU
        and send them again: those that fit as they are, TCP segments cut to fit (and their senders
        told), the rest answered as a router answers (``_answer_too_big``). In order."""
        c = self.counters
        count = -(-len(data) // size)
        largest = size if count > 1 else len(data)
        limit = self.path_mtus.limits.get(hop)
        if limit is None or largest <= limit:  # our copy does not explain it: read the kernel's
            limit = self._read_path_mtu(hop)
        if limit is None or largest <= limit:
            c.send_errors += count
            log.debug("sendmsg to %s refused %d datagrams of %d bytes, path MTU %s", hop, count, size, limit)
            return
        c.pmtu_refits += 1
        mv = memoryview(data)
        datagrams = [mv[i:i + size] for i in range(0, len(data), size)]
        # The TCP segments that do not fit, laid out for one cut, each with room after it to pad into.
        cuts: dict[int, int] = {}  # datagram index -> its item in the cut
        items, parts, at = [], [], 0
        for i, datagram in enumerate(datagrams):
            n = len(datagram)
            if n > limit:
                fitted = _fit_segment_size(datagram, 0, n, vnet.GSO_TCPV4, n, limit)
                if fitted != n:
                    cuts[i] = len(items)
                    items.append((at, n, vnet.GSO_TCPV4, fitted))
                    parts.append((at, datagram))
                    at = at + n + fitted + 7 & ~7
        results: list = []
        if items:
            buf = bytearray(at + 64)
            for offset, datagram in parts:
                buf[offset:offset + len(datagram)] = datagram
            if self._refitter is None:
                self._refitter = gso.Segmenter(2 * gso.BUFFER_SIZE)
            results = self._refitter.cut(buf, items)
            ends = [r.start + (r.count - 1) * r.size + r.last for r in results if not isinstance(r, Refused)]
            out = memoryview(bytes(self._refitter.out_mv[:max(ends, default=0)]))  # a nested refit reuses it
        for i, datagram in enumerate(datagrams):
            n = len(datagram)
            cut = results[cuts[i]] if i in cuts else None
            if n <= limit:
                self._queue(hop, datagram, 0, 1, n, n)
            elif cut is None or isinstance(cut, Refused):
                if hop in self._batches:  # its answer (fragments, say) goes after what came before it
                    self._send(hop)
                self._answer_too_big(datagram, n, hop, limit)
            else:
                self._advise(datagram, n, limit)
                self._queue(hop, out, cut.start, cut.count, cut.size, cut.last)
        if hop in self._batches:
            self._send(hop)

    # -- UDP -> TUN ----------------------------------------------------------------------------------
    def _on_udp_readable(self) -> None:
        """A wake-up. Its first receive is handled here in as few steps as the per-packet path takes: a
        single datagram is decided and written at once and, on a quiet socket, that ends the wake-up.
        A GRO batch, or a busy socket, goes on to ``_receive_on``."""
        c = self.counters
        c.udp_wakeups += 1
        now = _clock()
        quiet, self._udp_woke = now - self._udp_woke > QUIET_NS and now > self._bulk_until, now
        c.udp_recvs += 1
        try:
            received = self.udp.recvmsg_into(self._rx_start, GRO_CMSG_SPACE)
        except BlockingIOError:
            return
        except OSError as exc:  # (EINTR included) the batch path receives again
            log.debug("recvmsg failed: %s", exc)
            self._receive_on(None)
            return
        nbytes, ancdata, msg_flags, peer = received
        if ancdata or msg_flags or self._parked_writes:
            self._receive_on(received)
            return
        c.udp_packets += 1
        c.udp_bytes += nbytes
        rx = self._rx  # the bytearray itself, as the per-packet engine does: quicker than a view
        verdict = self._decide_datagram(rx, nbytes, peer)
        if verdict:
            self._drop(verdict, rx, nbytes, c.udp_drops)
        else:
            self.peer_rx[peer] = self.peer_rx.get(peer, 0) + 1
            iov = [vnet.PLAIN, self._rx_mv[:nbytes]]
            if not self._write(iov, 1):
                self._park_write(iov, 1)
                return
        if not quiet:
            self._receive_on(None)
        # else: a quiet socket, nothing else is likely to be waiting: back to sleep (latency)

    def _decide_datagram(self, row, nbytes: int, peer: NextHop) -> Verdict:
        """The per-packet decision about one datagram received alone (and its trace line)."""
        verdict = inbound(row, nbytes, peer, self.routes, tun_mtu=self.tun_mtu, check_source=self.check_source)
        if self.trace:
            trace_log.debug("udp>tun from %s:%d %s -> %s", peer[0], peer[1], describe(row, nbytes), verdict.name)
        return verdict

    def _receive_on(self, first: tuple | None) -> None:
        """Receive until EAGAIN (or the budget), laying the batches out back to back so one pass of
        array operations checks them all (``Coalescer.plan``); then decide and write, in order.
        ``first``: what the wake-up's first ``recvmsg_into`` returned, already at offset 0."""
        c = self.counters
        mv, room, last = self._rx_mv, RX_ROOM, len(self._rx_mv) - RX_ROOM - gso.SPLIT_SLACK
        recvmsg_into, start = self.udp.recvmsg_into, self._rx_start
        table: list[tuple[int, int, int, NextHop]] = []  # (offset, bytes, datagram size, peer)
        at = 0
        for _ in range(self.budget):
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
                c.udp_drops[Verdict.OVERSIZE if msg_flags & _MSG_TRUNC else Verdict.TOO_SHORT] += 1
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
        c, routes, peer_rx, plain = self.counters, self.routes, self.peer_rx, vnet.PLAIN
        tun_mtu, check_source = self.tun_mtu, self.check_source
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
                verdict = self._decide_datagram(row, nbytes, peer)
                units = iter([(verdict, peer, 1, [plain, row] if verdict == Verdict.FORWARD else row)])
            else:
                self._bulk_until = _clock() + BULK_NS
                units = inbound_batches(self._coalescer, at, seg, [t[1] for t in table[i:j]],
                                        [t[3] for t in table[i:j]], routes, tun_mtu=tun_mtu, check_source=check_source)
            i = j
            for verdict, peer, n, unit in units:
                if verdict:
                    self._drop(verdict, unit, len(unit), c.udp_drops)
                    continue
                if self.trace and n > 1:
                    trace_log.debug("udp>tun from %s:%d %d datagrams of %d bytes -> FORWARD as one", peer[0],
                                    peer[1], n, seg)
                peer_rx[peer] = peer_rx.get(peer, 0) + n
                if n > 1:
                    c.tun_gso_writes += 1
                    c.tun_gso_segments += n
                if self._parked_writes or not self._write(unit, n):
                    self._park_rest(unit, n, units, table[i:])
                    return False
        return True

    def _park_rest(self, unit: list, n: int, units, table: list) -> None:
        """The TUN is full: copy out what is decided and decide the rest now (the buffer is about to
        be reused); writing resumes when there is room."""
        self._park_write(unit, n)
        for verdict, _, n, unit in units:
            if verdict:
                self._drop(verdict, unit, len(unit), self.counters.udp_drops)
            else:
                self._park_write(unit, n)
        if table:
            self._deliver(table)  # parks everything: something is parked already

    def _write(self, iov: list, packets: int) -> bool:
        """One writev to the TUN; False if it is full (the caller parks what is left)."""
        c = self.counters
        c.tun_writes += 1
        try:
            written = os.writev(self.tun_fd, iov)
        except BlockingIOError:
            return False
        except OSError as exc:
            c.tun_write_errors += packets
            log.debug("TUN write failed: %s", exc)
            return True
        c.delivered_packets += packets
        c.delivered_bytes += written - vnet.VNET_HDR_LEN
        return True

    def _park_write(self, iov: list, packets: int) -> None:
        if not self._parked_writes:
            self._pause(self.udp.fileno(), self.tun_fd, self._on_tun_writable)
        self._parked_writes.append((b"".join(iov), packets))

    def _on_tun_writable(self) -> None:
        parked = self._parked_writes
        c = self.counters
        while parked:
            data, packets = parked[0]
            c.tun_writes += 1
            try:
                os.write(self.tun_fd, data)
            except BlockingIOError:
                return
            except OSError:
                c.tun_write_errors += packets
            else:
                c.delivered_packets += packets
                c.delivered_bytes += len(data) - vnet.VNET_HDR_LEN
            parked.pop(0)
        self._resume(self.udp.fileno(), self.tun_fd, self._on_udp_readable)
