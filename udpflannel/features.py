"""The kernel features the fast path uses, as one record probed once at start-up (as wireguard-go's
``conn/features_linux.go`` keeps them), and the names ``--disable-offloads`` takes.

Light on purpose: the command line validates its flags with it before any TUN or numpy code loads.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from tun.offload import TunOffloads
    from udpflannel.sockets import UdpOffloads


@dataclass(frozen=True)
class Features:
    """Kernel features the fast path uses, probed once at start-up (kernel versions in brackets)."""

    tun_tso: bool = False  # IFF_VNET_HDR + TUNSETOFFLOAD CSUM|TSO4|TSO6 [2.6.27]: reads up to 64 KB
    tun_uso: bool = False  # TUN_F_USO4|USO6 [6.2]: UDP super-packets too, read and (merged) written
    udp_gso: bool = False  # UDP_SEGMENT [4.18]: one send, many datagrams
    udp_gro: bool = False  # UDP_GRO [5.0]: one receive, many datagrams

    @classmethod
    def from_probes(cls, tun: TunOffloads, udp: UdpOffloads, *, disabled: frozenset[str] = frozenset()) -> Features:
        found = cls(tun_tso=tun.tso, tun_uso=tun.uso, udp_gso=udp.gso, udp_gro=udp.gro)
        return cls(**{f.name: getattr(found, f.name) and f.name not in disabled for f in fields(cls)})

    def describe(self) -> str:
        return ", ".join(f"{f.name.replace('_', ' ')} {'on' if getattr(self, f.name) else 'off'}" for f in fields(self))


OFFLOADS = tuple(f.name for f in fields(Features))  # what ``--disable-offloads`` may name
