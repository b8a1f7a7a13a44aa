"""The fast path: the batch mover, which plugs into the engine (``udpflannel/engine.py``) where the
kernel has the offloads, so that each syscall moves up to 64 KB.

    TUN read (TSO super-packets) → cut → per-peer batch → one sendmsg with UDP_SEGMENT   (fastpath_out.py)
    UDP_GRO recvmsg_into (up to 64 datagrams) → per-row checks → merge → one writev per run  (fastpath_in.py)

The wire does not change: every datagram is one ordinary IPv4 packet with correct checksums, the
segment the kernel's own GSO would have made, so flanneld and per-packet peers interoperate.
Decisions stay in sans-IO code (``tun.segment``, ``tun.coalesce``, ``udpflannel.batch`` on top of
``udpflannel.forward``); these modules only move buffers, and hand what goes wrong to the engine.

Latency: batching must not cost a lone packet anything. Each wake-up's first read is handled in
the callback itself, in about as few steps as the per-packet path takes: an ordinary packet is
forwarded at once, in place; only super-packets, GRO batches and busy fds go on to the batch loops.
On a quiet fd (no wake-up for ``QUIET_NS``, and no batch moved for ``BULK_NS``) the wake-up ends
there, without reading on to EAGAIN — the level-triggered event loop calls again if more came. That
trailing read is what a request/response exchange would otherwise wait for: on two vCPUs the next
hop's process often needs the CPU this one is still busy on. While batches move, the lone packets
are ACKs, and draining them all at once is what keeps the bulk flows fast.

Fallbacks, each logged once: no TSO on the TUN → the per-packet mover (``udpflannel/probe.py``
decides); no UDP GSO, or EIO from a GSO send (the egress device cannot checksum) → one send per
segment (the engine); no UDP GRO → one datagram per receive, still written through the same path.
"""

from __future__ import annotations

import logging
import time
from typing import TYPE_CHECKING

from tun import gso, vnet
from udpflannel.fastpath_in import Inbound
from udpflannel.fastpath_out import PMTU_ADVICE_BURST, PMTU_ADVICE_RATE, Outbound
from udpflannel.features import Features

if TYPE_CHECKING:
    from udpflannel.engine import Engine

__all__ = ["QUIET_NS", "BULK_NS", "PMTU_ADVICE_RATE", "PMTU_ADVICE_BURST", "BatchMover", "Features"]

log = logging.getLogger(__name__)

# A wake-up that comes this long after the previous one finds a quiet fd: if its first read is a lone
# packet, that packet is forwarded and the callback returns without reading on to EAGAIN. Under load
# wake-ups follow each other closely and every one drains the fd as before.
QUIET_NS = 100_000
# ...and not while batches are moving (a super-packet cut or a GRO batch checked in the last BULK_NS):
# then the lone packets are the bulk flows' ACKs, and one left behind waits for a whole batch's
# processing before the loop comes back to its fd — TCP throughput fell ~10 % that way.
BULK_NS = 10_000_000


class BatchMover:
    """Both directions of the fast path, composed: :class:`~udpflannel.fastpath_out.Outbound` (TUN →
    UDP) and :class:`~udpflannel.fastpath_in.Inbound` (UDP → TUN), and what they share: whether
    batches are moving (:attr:`bulk_until`, on the ``clock`` in ns)."""

    TUN_HEADER = vnet.VNET_HDR_LEN  # every TUN read and write carries a virtio_net_hdr
    QUIET_NS = QUIET_NS
    BULK_NS = BULK_NS
    clock = staticmethod(time.monotonic_ns)

    def __init__(self, engine: Engine, features: Features) -> None:
        self.bulk_until = 0  # batches moved recently: no fd counts as quiet before then (BULK_NS)
        self.outbound = Outbound(engine, self)
        self.inbound = Inbound(engine, self, merge_udp=features.tun_uso)  # USO: the TUN takes UDP super-packets
        self.on_tun_readable = self.outbound.on_tun_readable
        self.on_udp_readable = self.inbound.on_udp_readable
        self.refit = self.outbound.refit
        kernels = gso.warm_up()  # compile (or load) the GSO/GRO loops now, not during the first transfer
        log.info("fast path: %s; GSO/GRO loops: %s", features.describe(), kernels)
