"""Events flowing from the control plane (``lease/``, or static routes) to the dataplane.

The dataplane only ever sees these frozen values; it never imports etcd.
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
    """The complete set of peers after a (re)sync: the dataplane replaces its table with it."""

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


ControlEvent = PeerAdded | PeerRemoved | Snapshot | LeaseAcquired | LeaseLost
