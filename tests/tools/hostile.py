"""Forged traffic from a peer's address, and the yardstick it is judged by — stdlib only, so the
attacker's tool (``forge.py``), the pod's capture (``podcap.py``) and the tests share one copy.

- :func:`forge`: a seeded mix of datagrams by category — random bytes, and mutations of real traffic
  (truncated, oversize, bad IHL and total length, bad header and L4 checksums, TTL 0 and 1,
  non-IPv4, fragments, inner sources outside the peer's subnet, GRO-sized bursts of mutated flows).
- :func:`problem`: why a packet is malformed, or ``""``: what a receiving host checks, written out the
  long way (RFC 1071 word sums), independent of udpflannel's code.
- :func:`model`: what must happen to each forged datagram at a node that forwards only well-formed
  packets from the peer's subnet: accepted or not, and the bytes its pod then receives.
- :func:`resegment`: a captured super-packet (GSO) cut back into the packets it was merged from.

IP options are not judged (routers forward them; the receiving kernel checks them): forged packets
carry only NOP/end-of-list options, and a mutated IHL never leaves an in-bounds header whose checksum
still verifies. Well-formed fragments come only in complete sets, so a node that reassembles them
(conntrack's defragmentation) and one that does not deliver the same packets.
"""

from __future__ import annotations

import hashlib
import random
import struct
from collections import Counter
from ipaddress import IPv4Address, IPv4Network
from typing import NamedTuple

ICMP, TCP, UDP = 1, 6, 17
ACK, PSH, SYN, FIN, RST = 0x10, 0x08, 0x02, 0x01, 0x04
GSO_NONE, GSO_TCPV4, GSO_UDP_L4, NEEDS_CSUM = 0, 1, 5, 1
TRANSPORT_HEADER = {ICMP: 8, TCP: 20, UDP: 8}
MAX_BURST_ROWS = 64  # UDP_SEGMENT's limit per send on every kernel
MAX_DATAGRAM = 65507


def _checksum(data: bytes) -> int:
    """The same as :func:`checksum`, quicker (for building packets; :func:`problem` uses the other)."""
    value = int.from_bytes(data, "big") << (8 * (len(data) & 1))
    return 0xFFFF if not value else 0xFFFF - (value % 0xFFFF or 0xFFFF)


def checksum(data: bytes) -> int:
    """RFC 1071, word by word: the value to store (0 when the data, checksum included, verifies)."""
    if len(data) & 1:
        data = bytes(data) + b"\0"
    total = sum(struct.unpack(f"!{len(data) // 2}H", data))
    while total >> 16:
        total = (total & 0xFFFF) + (total >> 16)
    return ~total & 0xFFFF


def _pseudo(packet: bytes, ihl: int) -> bytes:
    return bytes(packet[12:20]) + bytes([0, packet[9]]) + struct.pack("!H", len(packet) - ihl)


def fix_ip(packet: bytearray) -> bytearray:
    """Recompute the header checksum (IHL as it stands, if the header fits)."""
    ihl = (packet[0] & 0x0F) * 4
    packet[10:12] = b"\0\0"
    if 20 <= ihl <= len(packet):
        packet[10:12] = _checksum(packet[:ihl]).to_bytes(2, "big")
    return packet


def fix_l4(packet: bytearray) -> bytearray:
    """Recompute the TCP, UDP or ICMP checksum of an unfragmented packet (UDP: never 0)."""
    ihl = (packet[0] & 0x0F) * 4
    proto = packet[9]
    at = {TCP: 16, UDP: 6, ICMP: 2}.get(proto)
    if at is None or len(packet) < ihl + at + 2:
        return packet
    packet[ihl + at:ihl + at + 2] = b"\0\0"
    body = bytes(packet[ihl:])
    value = _checksum(body if proto == ICMP else _pseudo(packet, ihl) + body)
    if proto == UDP and value == 0:
        value = 0xFFFF
    packet[ihl + at:ihl + at + 2] = value.to_bytes(2, "big")
    return packet


def ipv4(proto: int, body: bytes, src: bytes, dst: bytes, *, ttl: int = 64, ident: int = 0, frag: int = 0x4000,
         tos: int = 0, options: bytes = b"") -> bytearray:
    """A whole IPv4 packet with both checksums right."""
    ihl = 5 + len(options) // 4
    packet = bytearray(struct.pack("!BBHHHBBH4s4s", 0x40 | ihl, tos, ihl * 4 + len(body), ident & 0xFFFF, frag, ttl,
                                   proto, 0, src, dst) + options + body)
    if not frag & 0x3FFF:
        fix_l4(packet)
    return fix_ip(packet)


def tcp(sport: int, dport: int, seq: int, flags: int, payload: bytes = b"", *, ack: int = 0, window: int = 502,
        timestamps: bool = True, tsval: int = 1) -> bytes:
    options = b"\x01\x01\x08\x0a" + struct.pack("!II", tsval, 7) if timestamps else b""
    return struct.pack("!HHIIBBHHH", sport, dport, seq & 0xFFFFFFFF, ack, (5 + len(options) // 4) << 4, flags,
                       window, 0, 0) + options + payload


def udp(sport: int, dport: int, payload: bytes) -> bytes:
    return struct.pack("!HHHH", sport, dport, 8 + len(payload), 0) + payload


def echo(ident: int, seq: int, payload: bytes) -> bytes:
    return struct.pack("!BBHHH", 8, 0, 0, ident, seq) + payload


# -- the yardstick -----------------------------------------------------------------------------------


def problem(packet: bytes) -> str:
    """Why ``packet`` is not one well-formed IPv4 packet, or ``""``: version, IHL, total length =
    its size, header checksum; unfragmented TCP/UDP/ICMP: a whole header and a valid checksum (UDP 0:
    none); a fragment: ends within 65,535 bytes, and a first one holds its transport header."""
    n = len(packet)
    if n < 20:
        return "shorter than an IPv4 header"
    if packet[0] >> 4 != 4:
        return "not IPv4"
    ihl = (packet[0] & 0x0F) * 4
    if ihl < 20 or ihl > n:
        return "IHL out of bounds"
    if struct.unpack_from("!H", packet, 2)[0] != n:
        return "total length is not the size"
    if checksum(packet[:ihl]):
        return "IP header checksum"
    proto, length = packet[9], n - ihl
    fragment = struct.unpack_from("!H", packet, 6)[0] & 0x3FFF
    if fragment:
        if (fragment & 0x1FFF) * 8 + n > 0xFFFF:  # with a header as long as this one, at least
            return "fragment ends past 65535 bytes"
        if fragment == 0x2000 and length < TRANSPORT_HEADER.get(proto, 0):
            return "first fragment shorter than its transport header"
        return ""
    if proto not in TRANSPORT_HEADER:
        return ""
    if length < TRANSPORT_HEADER[proto]:
        return "transport header cut"
    body = bytes(packet[ihl:])
    if proto == TCP:
        offset = packet[ihl + 12] >> 4
        if offset < 5 or offset * 4 > length:
            return "TCP data offset"
        return "TCP checksum" if checksum(_pseudo(packet, ihl) + body) else ""
    if proto == UDP:
        if struct.unpack_from("!H", packet, ihl + 4)[0] != length:
            return "UDP length"
        if packet[ihl + 6:ihl + 8] == b"\0\0":
            return ""
        return "UDP checksum" if checksum(_pseudo(packet, ihl) + body) else ""
    return "ICMP checksum" if checksum(body) else ""


def after_hops(packet: bytes, hops: int) -> bytes:
    """``packet`` as it leaves ``hops`` routers: TTL − hops, the header checksum patched as the
    kernel's ip_decrease_ttl does (+0x0100 per hop, end-around carry)."""
    out = bytearray(packet)
    for _ in range(hops):
        out[8] -= 1
        check = struct.unpack_from("!H", out, 10)[0] + 0x0100
        struct.pack_into("!H", out, 10, (check + (check >= 0xFFFF)) & 0xFFFF)
    return bytes(out)


def digest(packet: bytes) -> str:
    return hashlib.blake2b(packet, digest_size=10).hexdigest()


def resegment(flags: int, gso_type: int, gso_size: int, packet: bytes) -> list[bytes]:
    """A captured unit back as the packets it carries: a TCP (UDP) super-packet cut every ``gso_size``
    payload bytes, IDs counting on, FIN/PSH on the last segment only and CWR on the first, checksums
    computed afresh; a partial checksum (NEEDS_CSUM) completed; anything else as it is."""
    if gso_type == GSO_NONE:
        return [bytes(fix_l4(bytearray(packet)))] if flags & NEEDS_CSUM else [bytes(packet)]
    ihl = (packet[0] & 0x0F) * 4
    proto = TCP if gso_type == GSO_TCPV4 else UDP
    hl = ihl + ((packet[ihl + 12] >> 4) * 4 if proto == TCP else 8)
    payload = packet[hl:]
    chunks = [payload[i:i + gso_size] for i in range(0, len(payload), gso_size)]
    ident = struct.unpack_from("!H", packet, 4)[0]
    out = []
    for i, chunk in enumerate(chunks):
        segment = bytearray(packet[:hl]) + chunk
        struct.pack_into("!HH", segment, 2, len(segment), (ident + i) & 0xFFFF)
        if proto == TCP:
            seq = struct.unpack_from("!I", packet, ihl + 4)[0] + i * gso_size
            struct.pack_into("!I", segment, ihl + 4, seq & 0xFFFFFFFF)
            flags_at = ihl + 13
            if i < len(chunks) - 1:
                segment[flags_at] &= ~(FIN | PSH) & 0xFF
            if i:
                segment[flags_at] &= 0x7F  # CWR
        else:
            struct.pack_into("!H", segment, ihl + 4, 8 + len(chunk))
        out.append(bytes(fix_ip(fix_l4(segment))))
    return out


# -- forging -----------------------------------------------------------------------------------------


class Send(NamedTuple):
    """One send: a single datagram, or (``burst``) rows for one UDP_SEGMENT send — every row the
    same size but a shorter last one."""

    category: str
    rows: list[bytes]
    burst: bool = False


class Target(NamedTuple):
    """Who is who: the spoofed peer's subnet and its pod (the inner source of everything meant to get
    in, so that whatever the target's pod answers is swallowed there), the target pod (every inner
    destination), and inner sources outside the peer's subnet."""

    subnet: IPv4Network
    peer_pod: IPv4Address
    pod: IPv4Address
    outside: tuple[IPv4Address, ...]
    closed_ports: tuple[int, int] = (20000, 29999)  # nothing listens there in the target pod


# Share of the datagrams per category (singles), and the share sent as GRO-sized bursts.
WEIGHTS = {
    "valid": 6, "random": 12, "truncated": 7, "oversize": 5, "bad_ihl": 6, "bad_total_length": 6,
    "bad_ip_checksum": 6, "bad_l4": 8, "ttl_0_1": 5, "non_ipv4": 5, "fragments": 6, "outside_source": 6,
    "gro_burst": 22,
}


class Forger:
    def __init__(self, target: Target, rng: random.Random, mtu: int) -> None:
        self.t, self.rng, self.mtu = target, rng, mtu
        self.src, self.dst = target.peer_pod.packed, target.pod.packed
        self.ident = rng.randrange(0x10000)

    def _id(self) -> int:
        self.ident = (self.ident + 1) & 0xFFFF
        return self.ident

    def _port(self) -> int:
        return self.rng.randint(*self.t.closed_ports)

    def valid(self, size: int | None = None, *, src: bytes | None = None, proto: int | None = None) -> bytearray:
        """An ordinary packet from the peer's pod to the target pod: TCP, UDP or ICMP echo, sometimes
        with NOP options, DF or not, TTL ≥ 3 (it crosses the daemon and the node's kernel)."""
        r = self.rng
        options = b"\x01\x01\x01\x01" * r.choice([0, 0, 0, 1, 2]) if r.random() < 0.2 else b""
        proto = proto or r.choice([TCP, UDP, ICMP])
        overhead = 20 + len(options) + {TCP: 32, UDP: 8, ICMP: 8}[proto]
        size = size if size is not None else r.choice([overhead, r.randint(overhead, 200), r.randint(overhead, self.mtu)])
        payload = r.randbytes(max(0, size - overhead))
        if proto == TCP:
            body = tcp(r.randrange(1024, 65536), self._port(), r.randrange(1 << 32),
                       r.choice([SYN, ACK, ACK | PSH, RST, FIN | ACK, SYN | ACK]), payload, ack=r.randrange(1 << 32),
                       tsval=r.randrange(1 << 32))
        elif proto == UDP:
            body = udp(r.randrange(1024, 65536), self._port(), payload)
        else:
            body = echo(r.randrange(0x10000), r.randrange(0x10000), payload)
        return ipv4(proto, body, src or self.src, self.dst, ttl=r.randint(3, 255), ident=self._id(),
                    frag=r.choice([0, 0x4000]), tos=r.choice([0, 0, 0x10, 0xB8]), options=options)

    # each returns the datagrams of one category, as sends
    def s_valid(self) -> list[Send]:
        return [Send("valid", [bytes(self.valid())])]

    def s_random(self) -> list[Send]:
        r = self.rng
        data = bytearray(r.randbytes(r.choice([0, r.randint(1, 19), r.randint(20, 60), r.randint(20, self.mtu + 200)])))
        if len(data) >= 20 and r.random() < 0.5:  # looks like IPv4 at first sight: version, IHL 5, length
            data[0] = 0x45
            data[2:4] = len(data).to_bytes(2, "big")
            if r.random() < 0.5:
                fix_ip(data)
        return [Send("random", [bytes(data)])]

    def s_truncated(self) -> list[Send]:
        packet = self.valid()
        cut = self.rng.randint(0, len(packet) - 1)
        return [Send("truncated", [bytes(packet[:cut])])]

    def s_oversize(self) -> list[Send]:
        r = self.rng
        if r.random() < 0.2:  # a packet longer than its total length says (trailing bytes)
            return [Send("oversize", [bytes(self.valid() + r.randbytes(r.randint(1, 64)))])]
        size = r.choice([self.mtu + 1, r.randint(self.mtu + 1, 9000), r.randint(9000, MAX_DATAGRAM)] if r.random() < 0.05
                        else [self.mtu + 1, r.randint(self.mtu + 1, 3000)])
        return [Send("oversize", [bytes(self.valid(size, proto=r.choice([UDP, ICMP])))])]

    def s_bad_ihl(self) -> list[Send]:
        r = self.rng
        packet = self.valid()
        ihl = r.choice([i for i in range(16) if i != packet[0] & 0x0F])
        packet[0] = 0x40 | ihl
        if ihl < 5 or ihl * 4 > len(packet):
            fix_ip(packet)  # a "valid" checksum over whatever that IHL covers: the IHL itself is wrong
        return [Send("bad_ihl", [bytes(packet)])]  # otherwise the old checksum, now over more words

    def s_bad_total_length(self) -> list[Send]:
        r = self.rng
        packet = self.valid()
        total = len(packet)
        wrong = r.choice([0, 1, 19, 20, total - 1, total + 1, r.randint(0, 0xFFFF), 0xFFFF])
        if wrong == total:
            wrong = total + 1
        packet[2:4] = wrong.to_bytes(2, "big")
        if r.random() < 0.7:
            fix_ip(packet)
        return [Send("bad_total_length", [bytes(packet)])]

    def s_bad_ip_checksum(self) -> list[Send]:
        r = self.rng
        packet = self.valid()
        at = r.choice([10, 11, r.randint(1, (packet[0] & 0x0F) * 4 - 1)])
        if at in (2, 3):
            at = 11
        packet[at] ^= r.randint(1, 255)
        return [Send("bad_ip_checksum", [bytes(packet)])]

    def s_bad_l4(self) -> list[Send]:
        """Header fine, transport broken: a flipped byte, a wrong UDP length, a TCP data offset out of
        bounds, a transport header cut short (total length fixed to match)."""
        r = self.rng
        packet = self.valid()
        ihl = (packet[0] & 0x0F) * 4
        proto = packet[9]
        kind = r.choice(["flip", "flip", "header"])
        if kind == "flip":
            at = r.randint(ihl, len(packet) - 1)
            packet[at] ^= r.randint(1, 255)
            if proto == UDP and packet[ihl + 6:ihl + 8] == b"\0\0":
                packet[ihl + 6] = 1  # not "no checksum": a wrong one
        elif proto == UDP:
            struct.pack_into("!H", packet, ihl + 4, r.choice([0, 7, len(packet) - ihl - 1, len(packet) - ihl + 1]))
            fix_l4(packet)
        elif proto == TCP:
            packet[ihl + 12] = (r.choice([0, 1, 4, 15]) << 4) | (packet[ihl + 12] & 0x0F)
            fix_l4(packet)
            if (packet[ihl + 12] >> 4) * 4 <= len(packet) - ihl and packet[ihl + 12] >> 4 >= 5:
                packet[ihl + 12] = 0x40  # (offset 15 may fit a long packet: make it wrong regardless)
                fix_l4(packet)
        else:
            del packet[ihl + r.randint(0, 7):]
            packet[2:4] = len(packet).to_bytes(2, "big")
        fix_ip(packet)
        return [Send("bad_l4", [bytes(packet)])]

    def s_ttl_0_1(self) -> list[Send]:
        packet = self.valid()
        packet[8] = self.rng.choice([0, 1])
        return [Send("ttl_0_1", [bytes(fix_ip(packet))])]

    def s_non_ipv4(self) -> list[Send]:
        r = self.rng
        if r.random() < 0.5:  # IPv6, as a pod would send it: UDP from a ULA to another
            payload = r.randbytes(r.randint(0, 300))
            six = struct.pack("!IHBB", 6 << 28, 8 + len(payload), 17, 64) + b"\xfd" + r.randbytes(15) + b"\xfd" + r.randbytes(15)
            data = six + udp(r.randrange(1024, 65536), self._port(), payload)
        else:  # another version nibble on an otherwise valid packet
            packet = self.valid()
            packet[0] = (r.choice([0, 1, 2, 3, 5, 6, 7, 15]) << 4) | (packet[0] & 0x0F)
            data = bytes(fix_ip(packet))
        return [Send("non_ipv4", [bytes(data)])]

    def s_fragments(self) -> list[Send]:
        """A complete set of well-formed fragments of one UDP datagram (in any order); or one broken
        fragment: ending past 64 KB, a first fragment too short for its header, a bad checksum."""
        r = self.rng
        if r.random() < 0.3:
            payload = r.randbytes(r.randint(16, 4000))
            whole = ipv4(UDP, udp(r.randrange(1024, 65536), self._port(), payload), self.src, self.dst,
                         ttl=r.randint(3, 255), ident=self._id(), frag=0)
            body, header = whole[20:], whole[:20]
            step = max(r.choice([8, 64, 512, 1024, 1448]), (len(body) // 4 + 7) & ~7)  # ≤ 4 pieces
            pieces = []
            for at in range(0, len(body), step):
                part = body[at:at + step]
                fragment = bytearray(header) + part
                more = 0x2000 if at + step < len(body) else 0
                struct.pack_into("!H", fragment, 2, len(fragment))
                struct.pack_into("!H", fragment, 6, more | at // 8)
                pieces.append(bytes(fix_ip(fragment)))
            if len(pieces) == 1:  # too short to cut: it stays a whole datagram
                return [Send("fragments", pieces)]
            if r.random() < 0.3:
                r.shuffle(pieces)
            return [Send("fragments", [p]) for p in pieces]
        packet = self.valid(proto=r.choice([TCP, UDP]))
        kind = r.choice(["past_64k", "tiny_first", "bad_checksum"])
        if kind == "past_64k":
            size = len(packet) - (packet[0] & 0x0F) * 4
            struct.pack_into("!H", packet, 6, r.choice([0, 0x2000]) | (0x1FFF - r.randint(0, max(0, (size - 8) // 8))))
            fix_ip(packet)
        elif kind == "tiny_first":
            ihl = (packet[0] & 0x0F) * 4
            del packet[ihl + r.randint(0, TRANSPORT_HEADER[packet[9]] - 1):]
            packet[2:4] = len(packet).to_bytes(2, "big")
            struct.pack_into("!H", packet, 6, 0x2000)
            fix_ip(packet)
        else:
            struct.pack_into("!H", packet, 6, 0x2000 | r.randint(0, 100))
            fix_ip(packet)
            packet[10] ^= 0x5A
        return [Send("fragments", [bytes(packet)])]

    def s_outside_source(self) -> list[Send]:
        return [Send("outside_source", [bytes(self.valid(src=self.rng.choice(self.t.outside).packed))])]

    def s_gro_burst(self) -> list[Send]:
        """2..64 rows of one flow (TCP segments or UDP datagrams), as a peer's GSO send makes them and
        as the target's UDP_GRO receive gets them, some rows mutated: a flipped byte, bad IP or L4
        checksum, TTL 0/1, a fragment past 64 KB, an outside source, a wrong total length, a break in
        the IDs or sequence numbers, PSH mid-flow, a duplicate, two rows swapped; maybe a short last."""
        r = self.rng
        proto = r.choice([TCP, TCP, UDP])
        seg = r.choice([r.randint(60, self.mtu), self.mtu, 1400, 1420]) & ~1 if r.random() < 0.8 else r.randint(29, self.mtu)
        overhead = 52 if proto == TCP else 28
        seg = max(seg, overhead + 2)
        rows_n = r.randint(2, min(MAX_BURST_ROWS, MAX_DATAGRAM // seg))
        sport, dport, seq, ttl, ack = r.randrange(1024, 65536), self._port(), r.randrange(1 << 32), r.randint(3, 255), r.randrange(1 << 32)
        tsval = r.randrange(1 << 32)  # one per burst: a flow's segments sent together share it
        ident = self.ident
        self.ident = (self.ident + rows_n + 1) & 0xFFFF
        rows = []
        for i in range(rows_n):
            size = seg if i < rows_n - 1 or r.random() < 0.6 else r.randint(overhead, seg - 1)
            payload = r.randbytes(size - overhead)
            if proto == TCP:
                flags = ACK | (PSH if i == rows_n - 1 and r.random() < 0.5 else 0)
                body = tcp(sport, dport, seq + i * (seg - overhead), flags, payload, ack=ack, tsval=tsval)
            else:
                body = udp(sport, dport, payload)
            rows.append(ipv4(proto, body, self.src, self.dst, ttl=ttl, ident=ident + i))
        for i in range(rows_n):
            if r.random() < 0.2:
                rows[i] = self._mutate_row(rows[i], rows, i)
        if rows_n > 2 and r.random() < 0.1:  # two full rows swapped
            a = r.randint(0, rows_n - 3)
            rows[a], rows[a + 1] = rows[a + 1], rows[a]
        return [Send("gro_burst", [bytes(x) for x in rows], burst=True)]

    def _mutate_row(self, row: bytearray, rows: list, i: int) -> bytearray:
        r = self.rng
        row = bytearray(row)
        ihl = 20
        kind = r.choice(["flip", "ip_checksum", "l4_checksum", "ttl", "fragment", "outside", "total_length",
                         "ident", "seq", "psh", "duplicate"])
        if kind == "flip":
            row[r.randrange(len(row))] ^= r.randint(1, 255)
        elif kind == "ip_checksum":
            row[10] ^= r.randint(1, 255)
        elif kind == "l4_checksum" and len(row) > ihl + 8:
            row[r.randint(ihl + 8, len(row) - 1)] ^= r.randint(1, 255)
            if row[9] == UDP and row[26:28] == b"\0\0":
                row[26] = 1
        elif kind == "ttl":
            row[8] = r.choice([0, 1])
            fix_ip(row)
        elif kind == "fragment":  # valid checksum, but it would end past 64 KB
            struct.pack_into("!H", row, 6, r.choice([0, 0x2000]) | 0x1FFF)
            fix_ip(row)
        elif kind == "outside":
            row[12:16] = r.choice(self.t.outside).packed
            fix_ip(fix_l4(row))
        elif kind == "total_length":
            struct.pack_into("!H", row, 2, r.choice([len(row) - 1, len(row) + 1, 0xFFFF, 20]))
            fix_ip(row)
        elif kind == "ident":
            struct.pack_into("!H", row, 4, r.randrange(0x10000))
            fix_ip(row)
        elif kind == "seq" and row[9] == TCP:
            struct.pack_into("!I", row, ihl + 4, r.randrange(1 << 32))
            fix_l4(row)
        elif kind == "psh" and row[9] == TCP:
            row[ihl + 13] |= PSH
            fix_l4(row)
        elif kind == "duplicate" and i > 0 and len(rows[i - 1]) == len(row):
            row = bytearray(rows[i - 1])
        return row


def forge(target: Target, *, seed: int, count: int, mtu: int = 1472) -> list[Send]:
    """At least ``count`` datagrams, categories drawn by :data:`WEIGHTS` from a seeded generator: the
    same arguments give the same bytes."""
    rng = random.Random(seed)
    forger = Forger(target, rng, mtu)
    names, weights = list(WEIGHTS), list(WEIGHTS.values())
    # a burst carries ~20 datagrams: draw bursts less often so that they are ~WEIGHTS["gro_burst"] % of datagrams
    weights[names.index("gro_burst")] /= 20
    sends: list[Send] = []
    total = 0
    while total < count:
        for send in getattr(forger, "s_" + rng.choices(names, weights)[0])():
            sends.append(send)
            total += len(send.rows)
    return sends


class Model(NamedTuple):
    """What a node that forwards only well-formed packets from the peer's subnet must do with the sends."""

    sent: dict[str, int]  # datagrams per category
    accepted: dict[str, int]  # of which it must accept (and write into its TUN), per category
    delivered: Counter  # digests of the packets the target pod must then receive (after two hops)
    bursts: int  # sends of more than one row
    burst_rows: int


def model(sends: list[Send], target: Target, *, mtu: int = 1472) -> Model:
    sent: Counter = Counter()
    accepted: Counter = Counter()
    delivered: Counter = Counter()
    bursts = burst_rows = 0
    for send in sends:
        if len(send.rows) > 1 and send.burst:
            bursts += 1
            burst_rows += len(send.rows)
        for row in send.rows:
            sent[send.category] += 1
            if len(row) > mtu or problem(row) or IPv4Address(row[12:16]) not in target.subnet or row[8] < 2:
                continue
            accepted[send.category] += 1
            assert row[16:20] == target.pod.packed and row[8] >= 3, "forged to be delivered: TTL ≥ 3, to the pod"
            delivered[digest(after_hops(row, 2))] += 1
    return Model(dict(sent), dict(accepted), delivered, bursts, burst_rows)
