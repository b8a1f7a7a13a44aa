"""The two sockets of the dataplane: the UDP socket peers talk to, and a raw socket for ICMP errors.

Why a raw socket for ICMP: flannel writes its ICMP errors *into the TUN* with the TUN's own address
as source; the kernel sees a packet arrive from outside claiming a local source and drops it as a
martian (reference §7.7), so the sender never hears about it. Sent through a raw socket the same
packet is *locally originated*: the kernel routes it like any packet the host sends — to a local
pod via ``cni0``, or back into flannel0 and over the overlay to a remote pod — no sysctl needed.
"""

from __future__ import annotations

import functools
import socket
import struct
from dataclasses import dataclass

from tun.layout import MAX_IP_PACKET, UDP_HEADERS
from udpflannel.errors import SetupError

# Linux socket options missing from Python 3.11's socket module (asm-generic/socket.h, the same on
# every architecture udpflannel targets): set buffer sizes above net.core.{r,w}mem_max as root.
SO_SNDBUFFORCE = 32
SO_RCVBUFFORCE = 33
SOCKET_BUFFER = 4 * 1024 * 1024

# Path-MTU discovery (linux/in.h; not in Python 3.11's socket module). Same on every architecture.
IP_MTU_DISCOVER = 10
IP_PMTUDISC_DO = 2  # DF on every datagram, never fragmented here: a send above the path MTU is refused
IP_MTU = 14  # getsockopt on a connected socket: the MTU of its route, the kernel's path-MTU cache included


def open_udp_socket(address: str, port: int, *, buffer: int = SOCKET_BUFFER) -> socket.socket:
    """Bind ``address:port`` as flanneld does (the interface address, not 0.0.0.0); non-blocking.

    ``IP_PMTUDISC_DO``: Linux's default (``IP_PMTUDISC_WANT``, flanneld's) also sets DF, but once a
    router's frag-needed has taught the kernel a smaller path MTU, it fragments every larger datagram
    here, and refuses a UDP_SEGMENT send above it with EMSGSIZE, which the fast path used to count
    as lost. With DO both sends are refused with EMSGSIZE, which the engines answer: they read the
    path MTU (:func:`path_mtu`), cut what they can to fit and tell the inner sender (ICMP
    frag-needed), so nothing is fragmented anywhere on the path.
    """
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    try:
        sock.setsockopt(socket.IPPROTO_IP, IP_MTU_DISCOVER, IP_PMTUDISC_DO)
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


# UDP segmentation offloads (linux/udp.h; not in Python 3.11's socket module). Same on every architecture.
SOL_UDP = 17
UDP_SEGMENT = 103  # send: one sendmsg of N×size bytes leaves as N datagrams (Linux 4.18)
UDP_GRO = 104  # receive: back-to-back datagrams of one flow arrive as one buffer + their size (Linux 5.0)
UDP_MAX_PAYLOAD = MAX_IP_PACKET - UDP_HEADERS  # one send is one IP packet before segmentation: 65,507


@dataclass(frozen=True)
class UdpOffloads:
    """What the kernel offers this socket, probed once at start-up."""

    gso: bool = False  # UDP_SEGMENT works
    gro: bool = False  # UDP_GRO is on: recvmsg may return several datagrams with their size


def probe_udp_offloads(sock: socket.socket, *, gro: bool = True) -> UdpOffloads:
    """Probe UDP_SEGMENT (reading it fails on kernels without it) and, if ``gro``, turn UDP_GRO on.

    Whether a GSO send really works also depends on the egress device (no tx checksum offload →
    EIO at send time); the engine handles that when it happens.
    """
    try:
        sock.getsockopt(SOL_UDP, UDP_SEGMENT)
        gso = True
    except OSError:
        gso = False
    if gro:
        try:
            sock.setsockopt(SOL_UDP, UDP_GRO, 1)
        except OSError:
            gro = False
    return UdpOffloads(gso=gso, gro=gro)


@functools.lru_cache(maxsize=64)
def gso_cmsg(size: int) -> list[tuple[int, int, bytes]]:
    """The per-call control message for a UDP_SEGMENT send: exactly 2 bytes, host order. Cached
    (one per datagram size; sendmsg only reads it)."""
    return [(SOL_UDP, UDP_SEGMENT, struct.pack("=H", size))]


def gro_size(ancdata: list[tuple[int, int, bytes]], default: int) -> int:
    """The datagram size from a UDP_GRO recvmsg's control data (a native int), else ``default``."""
    for level, kind, data in ancdata:
        if level == SOL_UDP and kind == UDP_GRO and len(data) >= 4:
            return struct.unpack_from("=i", data)[0]
    return default


GRO_CMSG_SPACE = socket.CMSG_SPACE(4)


def path_mtu(local: str, peer: str) -> int:
    """The kernel's path MTU from ``local`` to ``peer`` now: its PMTU cache (``ip route get`` shows
    it as ``cache expires Ns mtu N``) if it holds an entry, else the route's MTU. Raises OSError.

    A fresh socket each time, connected (a route lookup, nothing sent) and asked for ``IP_MTU``: a
    socket kept connected reports the route it cached when it connected, which was measured to stay
    at 1500 after the kernel had learnt 1400, and to read 68 once the entry had expired. ~10 µs,
    and only called when a send was refused or a peer's entry is due for a re-read.
    """
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
        probe.bind((local, 0))
        probe.connect((peer, 9))  # the port does not matter: path MTUs are per destination
        return probe.getsockopt(socket.IPPROTO_IP, IP_MTU)


MTU_EXPIRES = "/proc/sys/net/ipv4/route/mtu_expires"
MTU_EXPIRES_DEFAULT = 600.0  # the kernel's default, if the sysctl cannot be read


def kernel_pmtu_expiry(path: str = MTU_EXPIRES) -> float:
    """Seconds after which the kernel forgets a learnt path MTU (``net.ipv4.route.mtu_expires``; a
    per-namespace setting on recent kernels, 6.18 measured: read in the daemon's own namespace)."""
    try:
        with open(path) as f:
            return float(f.read().split()[0])
    except (OSError, ValueError, IndexError):
        return MTU_EXPIRES_DEFAULT


def open_icmp_socket() -> socket.socket:
    """``IPPROTO_RAW`` implies ``IP_HDRINCL``: we hand the kernel a complete IPv4 packet."""
    try:
        sock = socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_RAW)
    except PermissionError as exc:
        raise SetupError("a raw socket for ICMP errors needs CAP_NET_RAW (run as root)") from exc
    sock.setblocking(False)
    return sock
