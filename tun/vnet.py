"""The virtio_net_hdr that rides in front of every TUN read and write once ``IFF_VNET_HDR`` is set.

Layout (``struct virtio_net_hdr`` in linux/virtio_net.h, 10 bytes, no padding)::

    u8  flags        NEEDS_CSUM: the L4 checksum is partial (pseudo-header sum only) and must be
                     completed over [csum_start, end) and stored at csum_start + csum_offset;
                     DATA_VALID: the sender already checked the checksum.
    u8  gso_type     NONE, TCPV4, UDP (legacy UFO), TCPV6, UDP_L4 (USO); | ECN (0x80) if CWR-ECN applies.
    u16 hdr_len      bytes of headers to copy in front of every segment — a hint, and on forwarded
                     traffic not a trustworthy one (it can cover the whole first packet): compute it.
    u16 gso_size     payload bytes per segment (the MSS for TCP).
    u16 csum_start   where the L4 header starts (the IP header length for IPv4).
    u16 csum_offset  where in that header the checksum lives (16 for TCP, 6 for UDP).

Byte order: the u16 fields are in the *host's* byte order on TUN (the "legacy" virtio byte order;
only TUNSETVNETBE/LE, which we never call, change it), hence ``=`` in the struct format — unlike
every field *inside* the packet, which is big-endian. Sans-IO: no syscalls here.

:func:`complete_checksum` finishes what ``NEEDS_CSUM`` leaves undone, for a packet not cut.
"""

from __future__ import annotations

import struct
from typing import NamedTuple

VNET_HDR_LEN = 10

# flags
NEEDS_CSUM = 1
DATA_VALID = 2

# gso_type
GSO_NONE = 0
GSO_TCPV4 = 1
GSO_UDP = 3  # UFO: IP fragmentation of one big datagram; never offered by us (TUN_F_UFO off)
GSO_TCPV6 = 4
GSO_UDP_L4 = 5  # USO: one datagram per gso_size bytes (Linux >= 6.2 on TUN)
GSO_ECN = 0x80

_HDR = struct.Struct("=BBHHHH")


class VnetHdr(NamedTuple):
    """One decoded virtio_net_hdr (host byte order already undone)."""

    flags: int = 0
    gso_type: int = GSO_NONE
    hdr_len: int = 0
    gso_size: int = 0
    csum_start: int = 0
    csum_offset: int = 0

    def pack(self) -> bytes:
        return _HDR.pack(*self)


unpack_from = _HDR.unpack_from
"""``unpack_from(buf, offset=0) -> (flags, gso_type, hdr_len, gso_size, csum_start, csum_offset)``:
the hot path takes the plain tuple and skips building a :class:`VnetHdr`."""


def parse(buf, offset: int = 0) -> VnetHdr:
    """Decode the header at ``offset``; ``struct.error`` if fewer than 10 bytes are there."""
    return VnetHdr._make(_HDR.unpack_from(buf, offset))


def complete_checksum(buf, n: int, csum_start: int, csum_offset: int) -> bool:
    """Finish a ``NEEDS_CSUM`` packet in place: the field holds the pseudo-header sum; add the rest.

    False (buffer untouched) if the offsets do not fit the packet. Every ACK the kernel routes into
    the TUN arrives like this once checksum offload is on, so it must be cheap: one big-int fold.
    """
    at = csum_start + csum_offset
    if csum_start < 20 or at + 2 > n:
        return False
    value = int.from_bytes(buf[csum_start:n], "big")
    if (n - csum_start) & 1:
        value <<= 8
    check = 0xFFFF - value % 0xFFFF
    buf[at] = check >> 8
    buf[at + 1] = check & 0xFF
    return True


# The header of every packet written without offload: nothing to do, checksums already complete.
PLAIN = VnetHdr().pack()


def tcpv4_gso(hdr_len: int, gso_size: int, ip_header_len: int) -> bytes:
    """Header for a coalesced TCPv4 super-packet: the kernel re-segments it (or hands it on whole)
    and completes each segment's checksum from the pseudo-header sum we leave in the TCP header."""
    return _HDR.pack(NEEDS_CSUM, GSO_TCPV4, hdr_len, gso_size, ip_header_len, 16)


def udpv4_gso(gso_size: int) -> bytes:
    """Header for a coalesced UDPv4 super-packet (IHL 5): the kernel cuts it into ``gso_size``-byte
    datagrams again (Linux >= 6.2 takes GSO_UDP_L4 from a TUN writer) and completes each one's
    checksum from the pseudo-header sum we leave in the UDP header."""
    return _HDR.pack(NEEDS_CSUM, GSO_UDP_L4, 28, gso_size, 20, 6)
