"""Feature probing: which offloads this kernel gives the TUN and the UDP socket, asked once at start-up
(as wireguard-go's ``conn/features_linux.go`` does) and kept as a :class:`~udpflannel.features.Features`
record, less what ``--disable-offloads`` names. Falling back is decided here, and logged once.
"""

from __future__ import annotations

import logging
import socket

from tun.device import TunDevice, open_tun
from tun.offload import TunOffloads, enable_offloads
from udpflannel.features import Features
from udpflannel.sockets import probe_udp_offloads

log = logging.getLogger(__name__)


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
