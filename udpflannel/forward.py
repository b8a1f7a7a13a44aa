"""The forwarding decision for one packet in each direction — sans-IO, so it is testable with bytes.

This is the middle of the three files a packet crosses:
``tun/device.py`` (the fd) → **here** (what to do with it) → ``udpflannel/engine.py`` (the syscalls).

Both functions work in place on a receive buffer holding ``n`` valid bytes and return a ``Verdict``;
only ``Verdict.FORWARD`` leaves the buffer modified (TTL − 1, header checksum patched).
"""

from __future__ import annotations

from udpflannel.packet import (
    BAD_CHECKSUM,
    FORWARD,
    NO_ROUTE,
    OVERSIZE,
    TTL_EXPIRED,
    UNKNOWN_PEER,
    Verdict,
    check_ipv4,
    check_ipv4_checksum,
    check_transport,
    decrement_ttl,
    dst_u32,
    src_u32,
)
from udpflannel.routes import NextHop, RouteTable


def outbound(buf: bytearray, n: int, routes: RouteTable) -> tuple[Verdict, NextHop | None]:
    """TUN → UDP: a packet the kernel routed into flannel0. Which peer gets it?

    Order as flannel's: validate, look up the destination (no route → net unreachable), then TTL
    (flannel decrements on send *and* on receive; we keep that so hop counts match a flanneld peer).
    """
    verdict = check_ipv4(buf, n)
    if verdict:
        return verdict, None
    hop = routes.lookup(dst_u32(buf))
    if hop is None:
        return NO_ROUTE, None
    if not decrement_ttl(buf):
        return TTL_EXPIRED, None
    return FORWARD, hop


def inbound(buf: bytearray, n: int, peer: NextHop, routes: RouteTable, *, tun_mtu: int, check_source: bool,
            transport_checked: bool = False) -> Verdict:
    """UDP → TUN: a datagram from ``peer``. May it enter this node?

    flannel writes anything from anyone (reference §7.5); we accept only a current peer's
    ``PublicIP:port`` and, with ``check_source``, only inner sources inside that peer's subnet, and
    only a well-formed packet: IPv4 header and checksum, and (``check_transport``) a whole TCP, UDP or
    ICMP header with a valid checksum, or a fragment within bounds. Anyone can forge a peer's address,
    so this is what keeps malformed packets from reaching a pod. ``transport_checked``: the caller
    has verified the transport header and checksum already (the coalescer, for a run's first row).
    A datagram longer than the TUN MTU is dropped whole (flannel truncates it and forwards the stub).
    """
    if n > tun_mtu:
        return OVERSIZE
    verdict = check_ipv4(buf, n)
    if verdict:
        return verdict
    if check_source:
        verdict = routes.source_check(peer, src_u32(buf))
        if verdict:
            return verdict
    elif not routes.peer_known(peer):
        return UNKNOWN_PEER
    if not check_ipv4_checksum(buf, n):
        return BAD_CHECKSUM
    if not transport_checked:
        verdict = check_transport(buf, n)
        if verdict:
            return verdict
    if not decrement_ttl(buf):
        return TTL_EXPIRED
    return FORWARD


PROTOCOL_NAMES = {1: "icmp", 6: "tcp", 17: "udp"}


def describe(buf: bytearray, n: int) -> str:
    """One line for the packet trace: ``10.5.1.2 > 10.5.2.2 icmp ttl 63 len 84`` (never raises)."""
    if n < 20 or buf[0] >> 4 != 4:
        return f"non-IPv4 ({n} bytes, first byte {buf[0] if n else 0:#04x})"
    src = ".".join(map(str, buf[12:16]))
    dst = ".".join(map(str, buf[16:20]))
    proto = PROTOCOL_NAMES.get(buf[9], str(buf[9]))
    return f"{src} > {dst} {proto} ttl {buf[8]} len {n}"
