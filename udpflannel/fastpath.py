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
forwarded at once, in place; only super-packets, GRO batches and busy fds go on to the batch loops,
and a quiet fd's wake-up ends after its lone packet (``udpflannel/pace.py``).

Fallbacks, each logged once: no TSO on the TUN → the per-packet mover (``udpflannel/probe.py``
decides); no UDP GSO, or EIO from a GSO send (the egress device cannot checksum) → one send per
segment (the engine); no UDP GRO → one datagram per receive, still written through the same path.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

from tun import gso, vnet
from tun.layout import UDP_MAX_SEGMENTS
from udpflannel import lone
from udpflannel.fastpath_in import Inbound
from udpflannel.fastpath_out import PMTU_ADVICE_BURST, PMTU_ADVICE_RATE, Outbound
from udpflannel.features import Features
from udpflannel.pace import QUIET_NS, Pace
from udpflannel.sockets import GRO_CMSG_SPACE

if TYPE_CHECKING:
    from udpflannel.engine import Engine

__all__ = ["PMTU_ADVICE_RATE", "PMTU_ADVICE_BURST", "BatchMover", "Features"]

log = logging.getLogger(__name__)

class BatchMover:
    """Both directions of the fast path, composed: :class:`~udpflannel.fastpath_out.Outbound` (TUN →
    UDP) and :class:`~udpflannel.fastpath_in.Inbound` (UDP → TUN), and what they share: whether
    batches are moving (a :class:`~udpflannel.pace.Pace`)."""

    tun_header = vnet.VNET_HDR_LEN  # every TUN read and write carries a virtio_net_hdr

    def __init__(self, engine: Engine, features: Features, *, compiled: bool = True) -> None:
        """``compiled``: take a wake-up's first packet in C where the extension loads (udpflannel/lone.py)."""
        self.max_segments = UDP_MAX_SEGMENTS if features.udp_gso else 1  # datagrams per UDP_SEGMENT send
        self.pace = Pace()
        self.outbound = Outbound(engine, self.pace)
        self.inbound = Inbound(engine, self.pace, merge_udp=features.tun_uso)  # USO: the TUN takes UDP super-packets
        self.on_tun_readable = self.outbound.on_tun_readable
        self.on_udp_readable = self.inbound.on_udp_readable
        self.refit = self.outbound.refit
        # A wake-up's first packet in C where the extension is built (udpflannel/lone.py): the halves'
        # Python callbacks then take the trace's wake-ups, and their lone_* methods the hand-overs.
        c_pass = lone.attach(engine, tun_side=self.outbound, udp_side=self.inbound,
                             python_tun=self.on_tun_readable, python_udp=self.on_udp_readable,
                             tun_buf=self.outbound.first_read, udp_buf=self.inbound.first_receive,
                             tun_hdr=self.outbound.first_header, pace=self.pace, quiet_ns=QUIET_NS,
                             control_room=GRO_CMSG_SPACE) if compiled else None
        if c_pass is not None:
            self.on_tun_readable, self.on_udp_readable = c_pass
        kernels = gso.warm_up()  # run the GSO/GRO loops once now: a broken build shows here, not mid-transfer
        log.info("fast path: %s; GSO/GRO loops: %s; lone packets: %s", features.describe(), kernels,
                 lone.describe(c_pass is not None))
