"""Shared hypothesis strategies (IPv4 headers and packets, subnets, next hops) and slow references.

The references here are deliberately the obvious word-by-word versions, independent of the
``int.from_bytes(...) % 0xFFFF`` tricks in ``udpflannel.packet``, so tests compare two methods.
"""

from __future__ import annotations

import struct
from ipaddress import IPv4Network

from hypothesis import strategies as st

u8 = st.integers(0, 0xFF)
u16 = st.integers(0, 0xFFFF)
u32 = st.integers(0, 0xFFFFFFFF)

# Sources an ICMP error may be sent to: one unicast host, not 0.0.0.0, 127/8, 224/4 or 240/4.
unicast_u32 = u32.filter(lambda a: a != 0 and a >> 24 != 127 and a < 0xE0000000)


def slow_checksum(data: bytes) -> int:
    """RFC 1071 the long way: 16-bit words, end-around carry, one's complement."""
    if len(data) % 2:
        data += b"\0"
    total = 0
    for (word,) in struct.iter_unpack("!H", data):
        total += word
        total = (total & 0xFFFF) + (total >> 16)
    return ~total & 0xFFFF


def slow_header_checksum(header: bytes) -> int:
    """Checksum of an IPv4 header recomputed from scratch with its checksum field zeroed."""
    header_len = (header[0] & 0x0F) * 4
    return slow_checksum(bytes(header[:10]) + b"\0\0" + bytes(header[12:header_len]))


@st.composite
def ipv4_headers(
    draw,
    *,
    payload_len: int = 0,
    ttl=u8,
    protocol=u8,
    src=u32,
    dst=u32,
    frag=u16,
) -> bytearray:
    """A valid IPv4 header (IHL 5..15, options as random bytes) with a correct checksum.

    ``payload_len`` is only used for the total length field. The other keyword arguments are
    strategies, so callers can pin the fields a test is about.
    """
    ihl = draw(st.integers(5, 15))
    options = draw(st.binary(min_size=(ihl - 5) * 4, max_size=(ihl - 5) * 4))
    header = bytearray(
        struct.pack(
            "!BBHHHBBHII",
            0x40 | ihl,
            draw(u8),
            ihl * 4 + payload_len,
            draw(u16),
            draw(frag),
            draw(ttl),
            draw(protocol),
            0,
            draw(src),
            draw(dst),
        )
        + options
    )
    struct.pack_into("!H", header, 10, slow_header_checksum(header))
    return header


payloads = st.binary(max_size=64)


@st.composite
def ipv4_packets(draw, *, payload=payloads, **header_fields) -> bytearray:
    """A whole valid IPv4 packet: a header from :func:`ipv4_headers` plus a payload."""
    body = draw(payload)
    return draw(ipv4_headers(payload_len=len(body), **header_fields)) + body


def mask(prefixlen: int) -> int:
    return (0xFFFFFFFF << (32 - prefixlen)) & 0xFFFFFFFF


prefix_lengths = st.integers(0, 32)


@st.composite
def subnets(draw, *, prefixlen=prefix_lengths, base=u32) -> IPv4Network:
    """An IPv4 network (host bits cleared) of a drawn prefix length around a drawn address."""
    length = draw(prefixlen)
    return IPv4Network((draw(base) & mask(length), length))


# Subnets crowded into 10.0.0.0/14 with mixed lengths, so random tables overlap and nest.
crowded_subnets = subnets(
    prefixlen=st.sampled_from([0, 8, 12, 14, 15, 16, 20, 23, 24, 26, 30, 31, 32]) | prefix_lengths,
    base=st.integers(0x0A000000, 0x0A03FFFF),
)

# Addresses that land in, next to and outside crowded_subnets.
crowded_addresses = st.integers(0x09FFFFF0, 0x0A040010) | u32

# A handful of peers (and a port variant), so several subnets share a next hop.
next_hops = st.sampled_from(
    [("192.168.0.1", 8285), ("192.168.0.2", 8285), ("192.168.0.3", 8285), ("192.168.0.1", 8286)]
)
