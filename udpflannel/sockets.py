"""The two sockets of the dataplane: the UDP socket peers talk to, and a raw socket for ICMP errors.

Why a raw socket for ICMP: flannel writes its ICMP errors *into the TUN* with the TUN's own address
as source; the kernel sees a packet arrive from outside claiming a local source and drops it as a
martian (reference §7.7), so the sender never hears about it. Sent through a raw socket the same
packet is *locally originated*: the kernel routes it like any packet the host sends — to a local
pod via ``cni0``, or back into flannel0 and over the overlay to a remote pod — no sysctl needed.
"""

from __future__ import annotations

import socket

from udpflannel.errors import SetupError

# Linux socket options missing from Python 3.11's socket module (asm-generic/socket.h, the same on
# every architecture udpflannel targets): set buffer sizes above net.core.{r,w}mem_max as root.
SO_SNDBUFFORCE = 32
SO_RCVBUFFORCE = 33
SOCKET_BUFFER = 4 * 1024 * 1024


def open_udp_socket(address: str, port: int, *, buffer: int = SOCKET_BUFFER) -> socket.socket:
    """Bind ``address:port`` as flanneld does (the interface address, not 0.0.0.0); non-blocking."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    try:
        for force, plain, in ((SO_SNDBUFFORCE, socket.SO_SNDBUF), (SO_RCVBUFFORCE, socket.SO_RCVBUF)):
            try:
                sock.setsockopt(socket.SOL_SOCKET, force, buffer)
            except PermissionError:
                sock.setsockopt(socket.SOL_SOCKET, plain, buffer)
        sock.bind((address, port))
    except OSError as exc:
        sock.close()
        raise SetupError(f"failed to start listening on UDP socket {address}:{port}: {exc}") from exc
    sock.setblocking(False)
    return sock


def open_icmp_socket() -> socket.socket:
    """``IPPROTO_RAW`` implies ``IP_HDRINCL``: we hand the kernel a complete IPv4 packet."""
    try:
        sock = socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_RAW)
    except PermissionError as exc:
        raise SetupError("a raw socket for ICMP errors needs CAP_NET_RAW (run as root)") from exc
    sock.setblocking(False)
    return sock
