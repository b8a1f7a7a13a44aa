"""What the control plane tells the node: frozen values, flowing one way (``lease/`` → ``udpflannel``).

Peer events change the routes; lease events are about this node's own subnet. The node never sees
etcd, only these; a static route table (``udpflannel static``) speaks them too.
"""

from __future__ import annotations

from dataclasses import dataclass
from ipaddress import IPv4Address, IPv4Network


@dataclass(frozen=True, slots=True)
class PeerAdded:
    """A peer leased ``subnet`` and is reachable at ``public_ip`` (also sent for a changed PublicIP)."""

    subnet: IPv4Network
    public_ip: IPv4Address


@dataclass(frozen=True, slots=True)
class PeerRemoved:
    """The lease for ``subnet`` is gone (expired, revoked or deleted)."""

    subnet: IPv4Network


@dataclass(frozen=True, slots=True)
class Snapshot:
    """The complete set of peers after a (re)sync: the routes are replaced with it."""

    peers: tuple[PeerAdded, ...]


@dataclass(frozen=True, slots=True)
class LeaseAcquired:
    """This node holds ``subnet`` (first acquisition, or re-acquisition after a loss)."""

    subnet: IPv4Network
    public_ip: IPv4Address


@dataclass(frozen=True, slots=True)
class LeaseLost:
    """This node's own lease disappeared; the manager is re-acquiring."""

    subnet: IPv4Network
    reason: str


PeerEvent = PeerAdded | PeerRemoved | Snapshot
LeaseEvent = LeaseAcquired | LeaseLost
ControlEvent = PeerEvent | LeaseEvent
