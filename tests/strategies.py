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


# -- super-packets for the GSO split / GRO coalesce tests (tests/test_gso.py) ------------------------

# IP options a receiving kernel accepts as they are: NOP, end-of-list, and one Router Alert (RFC 2113).
_KERNEL_IP_OPTION_WORDS = [b"\x01\x01\x01\x01", b"\x01\x01\x01\x00", b"\x00\x00\x00\x00"]
_ROUTER_ALERT = b"\x94\x04\x00\x00"


@st.composite
def ip_option_bytes(draw, *, kernel_valid: bool = False) -> bytes:
    """0..40 bytes of IPv4 options: random bytes, or (``kernel_valid``) ones ip_rcv_options accepts."""
    words = draw(st.integers(0, 10))
    if not kernel_valid:
        return draw(st.binary(min_size=4 * words, max_size=4 * words))
    chunks = draw(st.lists(st.sampled_from(_KERNEL_IP_OPTION_WORDS), min_size=words, max_size=words))
    if words and draw(st.booleans()):
        chunks[draw(st.integers(0, words - 1))] = _ROUTER_ALERT
    return b"".join(chunks)


segment_sizes = st.one_of(
    st.integers(1, 64), st.sampled_from([536, 1220, 1400, 1420, 1432, 1448, 1460]), st.integers(1, 9000)
)


@st.composite
def super_packets(
    draw, *, protocol: int = 6, kernel_valid: bool = False, src=u32, dst=u32, max_segments: int = 64,
) -> tuple[bytes, int]:
    """A TSO (``protocol`` 6) or USO (17) super-packet as a TUN with offloads hands it over, and its
    gso_size. Headers carry any options, flags and field values; the L4 checksum field holds junk
    (the kernel leaves a partial sum there, and a split must not depend on it); the payload is
    pseudo-random bytes from a drawn seed, so 64 KB packets stay cheap to generate."""
    import random

    options = draw(ip_option_bytes(kernel_valid=kernel_valid))
    ihl = 5 + len(options) // 4
    if protocol == 6:
        tcp_options = draw(st.binary(min_size=0, max_size=40).map(lambda b: b[: len(b) // 4 * 4]))
        l4_len = 20 + len(tcp_options)
    else:
        l4_len = 8
    header_len = ihl * 4 + l4_len
    mss = draw(segment_sizes)
    most = min(0xFFFF - header_len, mss * max_segments)
    size = draw(st.one_of(st.integers(0, min(most, 3 * mss)), st.integers(0, most), st.just(most)))
    payload = random.Random(draw(st.integers(0, 2**32 - 1))).randbytes(size)
    total = header_len + size
    ip = bytearray(
        struct.pack("!BBHHHBBHII", 0x40 | ihl, draw(u8), total, draw(u16), draw(st.sampled_from([0, 0x4000])),
                    draw(st.integers(1, 255)), protocol, 0, draw(src), draw(dst))
        + options
    )
    struct.pack_into("!H", ip, 10, slow_header_checksum(ip))
    if protocol == 6:
        l4 = struct.pack("!HHIIBBHHH", draw(u16), draw(u16), draw(u32), draw(u32), (l4_len // 4) << 4,
                         draw(u8), draw(u16), draw(u16), draw(u16)) + tcp_options
    else:
        l4 = struct.pack("!HHHH", draw(u16), draw(u16), min(0xFFFF, l4_len + size), draw(u16))
    return bytes(ip) + l4 + payload, mss


def hurt(data, batch: list, *, times: tuple[int, int] = (1, 6), damage=None) -> None:
    """What a bad wire does to packets before GRO batches them, in place: some lost, swapped with the
    next, held back to the end, sent twice, and (with ``damage``, a function of data and an item that
    returns it damaged) damaged. At least 2 items are kept."""
    actions = ["lose", "swap", "hold back", "duplicate"] + (["damage"] if damage else [])
    for _ in range(data.draw(st.integers(*times))):
        i = data.draw(st.integers(0, len(batch) - 1))
        action = data.draw(st.sampled_from(actions))
        if action == "lose" and len(batch) > 2:
            del batch[i]
        elif action == "swap" and i + 1 < len(batch):
            batch[i], batch[i + 1] = batch[i + 1], batch[i]
        elif action == "hold back":
            batch.append(batch.pop(i))
        elif action == "duplicate":
            batch.insert(i + 1, batch[i])
        elif action == "damage":
            batch[i] = damage(data, batch[i])
