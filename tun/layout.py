"""Header layout: the IPv4, TCP and UDP numbers and offsets the dataplane reads and writes, named once.

Offsets are in bytes from the start of their own header (``IP_*`` from the IPv4 header, ``TCP_*`` and
``UDP_*`` from the transport header, which starts at IHL × 4). Every multi-byte field is big-endian
on the wire. Plain integers, no imports: the sans-IO packet core (``udpflannel.packet``) and the
kernels (``tun.gso_numpy``; ``tun/_gso_c.c`` repeats the few it needs as C constants) use the same names.
"""

from __future__ import annotations

PROTO_ICMP = 1
PROTO_TCP = 6
PROTO_UDP = 17

IPV4_MIN_HEADER = 20  # IHL 5: no options
MAX_IP_PACKET = 0xFFFF  # the total length field's largest value
UDP_HEADER = 8
TCP_MIN_HEADER = 20
UDP_HEADERS = IPV4_MIN_HEADER + UDP_HEADER  # an IPv4 (IHL 5) + UDP header: every datagram's headers
ENCAP_OVERHEAD = IPV4_MIN_HEADER + UDP_HEADER  # flannel's outer IPv4 + UDP header: TUN MTU = underlay MTU − 28

# IPv4 header
IP_VERSION_IHL = 0  # 0x45: version 4, IHL 5
IP_TOTAL_LENGTH = 2
IP_ID = 4
IP_FRAGMENT = 6  # flags (DF 0x4000, MF 0x2000) and the fragment offset (0x1FFF, in 8-byte units)
IP_TTL = 8
IP_PROTOCOL = 9
IP_CHECKSUM = 10
IP_SRC = 12
IP_DST = 16
IP_ADDRESSES = IP_SRC  # source and destination, 8 bytes: the pseudo-header's addresses

# TCP header
TCP_SEQ = 4
TCP_DATA_OFFSET = 12  # upper nibble: header length in 32-bit words
TCP_FLAGS = 13
TCP_CHECKSUM = 16
FIN, SYN, RST, PSH, ACK, URG, ECE, CWR = 0x01, 0x02, 0x04, 0x08, 0x10, 0x20, 0x40, 0x80

# UDP header
UDP_LENGTH = 4
UDP_CHECKSUM = 6

# Datagrams one UDP_SEGMENT send, or one GSO_UDP_L4 write into a TUN, may carry: the kernel's
# UDP_MAX_SEGMENTS (include/linux/udp.h), 64 before Linux 6.9 and 128 since; 64 is safe everywhere.
UDP_MAX_SEGMENTS = 64
