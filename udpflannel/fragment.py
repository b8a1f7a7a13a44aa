"""Fragmenting an inner IPv4 packet without DF to fit a narrower path, as a router does — sans-IO.

When the path to a peer is narrower than the packet, a router has two answers (RFC 1812 §4.2.2.7,
§5.2.6): with DF set, drop it and send ICMP frag-needed (``udpflannel.icmp.frag_needed``); without
DF, fragment it. The sender of a packet without DF does no path-MTU discovery (RFC 1191 routers send
frag-needed only for DF packets), so a dropped packet would simply vanish, again and again: a black
hole. The dataplane therefore fragments the *inner* packet (RFC 791 §3.2), each fragment its own
UDP datagram that fits the path, and the destination pod reassembles them. The outer datagrams are
never fragmented.
"""

from __future__ import annotations

import struct

from udpflannel.packet import check_ipv4, ipv4_header_checksum

DF = 0x4000
MF = 0x2000
OFFSET_MASK = 0x1FFF
_COPIED = 0x80  # option type bit: copy this option into every fragment (RFC 791)
_EOL, _NOP = 0, 1
_u16 = struct.Struct("!H")


def copied_options(options: bytes) -> bytes:
    """The options every fragment after the first carries: those with the copied flag, padded with
    end-of-list to whole words. Malformed options end the walk (what was read so far is kept)."""
    out = bytearray()
    i = 0
    while i < len(options):
        kind = options[i]
        if kind == _EOL:
            break
        if kind == _NOP:
            i += 1
            continue
        if i + 1 >= len(options) or options[i + 1] < 2 or i + options[i + 1] > len(options):
            break
        length = options[i + 1]
        if kind & _COPIED:
            out += options[i:i + length]
        i += length
    out += bytes(-len(out) % 4)
    return bytes(out)


def fragment(packet, n: int, mtu: int) -> list[bytes]:
    """The first ``n`` bytes of ``packet`` as fragments of at most ``mtu`` bytes, in order.

    ``[]`` if they cannot be: not one whole IPv4 packet, DF set (answer with frag-needed instead),
    ``mtu`` too small for a header and 8 bytes of data, or a fragment that ends past 64 KB. A packet that fits comes back whole. A
    fragment that is fragmented again keeps its offset, and its last piece its MF bit. Never raises.
    """
    if check_ipv4(packet, n):
        return []
    data = bytes(packet[:n])
    header_len = (data[0] & 0x0F) << 2
    if n <= mtu:
        return [data]
    (flags,) = _u16.unpack_from(data, 6)
    if flags & DF:
        return []
    first_header = data[:header_len]
    later_options = copied_options(data[20:header_len])
    later_header = bytearray(data[:20] + later_options)
    later_header[0] = 0x40 | (len(later_header) >> 2)
    offset = (flags & OFFSET_MASK) << 3
    last_mf = flags & MF
    payload = memoryview(data)[header_len:]
    if offset + len(payload) > 0xFFFF:  # a fragment reaching past 64 KB: no offset field can say where
        return []
    out = []
    at = 0
    while at < len(payload):
        header = bytearray(first_header if at == 0 else later_header)
        room = (mtu - len(header)) & ~7
        if room < 8:
            return []
        chunk = payload[at:at + room]
        at += len(chunk)
        more = MF if at < len(payload) else last_mf
        _u16.pack_into(header, 2, len(header) + len(chunk))
        _u16.pack_into(header, 6, more | ((offset + at - len(chunk)) >> 3))
        _u16.pack_into(header, 10, ipv4_header_checksum(header))
        out.append(bytes(header) + chunk)
    return out
