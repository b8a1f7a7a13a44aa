"""The packet trace's events — sans-IO: what ``udpflannel trace`` shows of one packet's journey.

A mover that has decided about a packet hands the packet, its verdict and next hop to the trace hub
(``udpflannel/tracehub.py``), which asks :class:`TraceFilter` whether any client wants it and, if so,
builds one :class:`TraceEvent` here: the steps the code took, in its words, and the bytes for a pcap.

    out: tun read → route (subnet → node) → ttl → encap (outer src:port → dst:port, size) → verdict
    in:  udp recv → decap → peer (lease, inner source) → checks → ttl → tun write → verdict

The builders run after the decision (``udpflannel.forward``), which decrements the TTL in place of a
packet it forwards: they put it back (:func:`with_ttl_restored`) where the packet is shown as it was
before that step — on ``flannel0`` going out, on the underlay coming in. Outer datagrams are rebuilt
from what the daemon knows (:func:`outer_datagram`): which of their header fields are placeholders is
said in :data:`OUTER_NOTE`, which the pcap and the docs repeat. Nothing here does I/O or raises for a
bad packet.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, field
from ipaddress import IPv4Address, IPv4Network

from tun.layout import PROTO_ICMP, PROTO_TCP, PROTO_UDP
from udpflannel.forward import PROTOCOL_NAMES
from udpflannel.packet import (
    BAD_CHECKSUM,
    BAD_HEADER,
    BAD_L4_CHECKSUM,
    FORWARD,
    NO_ROUTE,
    NOT_IPV4,
    OVERSIZE,
    SPOOFED_SOURCE,
    TOO_BIG,
    TOO_SHORT,
    TTL_EXPIRED,
    UNKNOWN_PEER,
    Verdict,
    check_ipv4,
    internet_checksum,
    ipv4_header_checksum,
)
from udpflannel.routes import NextHop, RouteTable

OUTER_TTL = 64  # placeholder: the kernel's default TTL for the UDP socket
OUTER_NOTE = ("outer IPv4 and UDP headers rebuilt by udpflannel trace from the addresses, ports and "
              "lengths the daemon used: DF set as sent, checksums computed; IP ID 0 and TTL 64 are "
              "placeholders (the kernel chose the real ones); no Ethernet header")
GSO_NAMES = {1: "GSO_TCPV4", 5: "GSO_UDP_L4"}
ICMP_TYPES = {0: "echo reply", 3: "unreachable", 8: "echo request", 11: "time exceeded"}
ANSWERS = {NO_ROUTE: "ICMP net-unreachable", TTL_EXPIRED: "ICMP time-exceeded", TOO_BIG: "ICMP frag-needed"}
PROTOCOLS = {name: number for number, name in PROTOCOL_NAMES.items()}

_OUTER_IP = struct.Struct("!BBHHHBBH4s4s")  # version/IHL, TOS, total length, ID, flags/fragment, TTL, proto, checksum, src, dst
_UDP = struct.Struct("!HHHH")  # source port, destination port, length, checksum
_PORTS = struct.Struct("!HH")
_ICMP_ECHO = struct.Struct("!BBHHH")  # type, code, checksum, id, sequence


def _ip(buf, at: int) -> str:
    return ".".join(str(b) for b in bytes(buf[at:at + 4]))


def summary(buf, n: int) -> str:
    """``10.5.1.2 > 10.5.2.2 icmp echo request id 7 seq 1, 84 bytes`` (ports for TCP and UDP)."""
    if n < 20 or len(buf) < 20 or buf[0] >> 4 != 4:
        return f"not IPv4 ({n} bytes)"
    ihl, proto = (buf[0] & 0x0F) << 2, buf[9]
    src, dst = _ip(buf, 12), _ip(buf, 16)
    name = PROTOCOL_NAMES.get(proto, f"proto {proto}")
    first = not (buf[6] << 8 | buf[7]) & 0x1FFF
    if first and proto in (PROTO_TCP, PROTO_UDP) and n >= ihl + 4:
        sport, dport = _PORTS.unpack_from(buf, ihl)
        return f"{src}:{sport} > {dst}:{dport} {name}, {n} bytes"
    if first and proto == PROTO_ICMP and n >= ihl + 8:
        kind, _, _, ident, seq = _ICMP_ECHO.unpack_from(buf, ihl)
        what = ICMP_TYPES.get(kind, f"type {kind}")
        tail = f" id {ident} seq {seq}" if kind in (0, 8) else ""
        return f"{src} > {dst} icmp {what}{tail}, {n} bytes"
    return f"{src} > {dst} {name}, {n} bytes"


def with_ttl_restored(buf, n: int) -> bytes:
    """A copy of the packet with its TTL one higher and the header checksum recomputed: the packet as it
    was before ``forward`` decremented it."""
    pkt = bytearray(buf[:n])
    if n >= 20 and pkt[8] < 255:
        pkt[8] += 1
        pkt[10:12] = ipv4_header_checksum(pkt).to_bytes(2, "big")
    return bytes(pkt)


def outer_datagram(src: NextHop, dst: NextHop, payload: bytes) -> bytes:
    """The IPv4 + UDP packet that carried ``payload`` from ``src`` to ``dst``, rebuilt (:data:`OUTER_NOTE`)."""
    length = 8 + len(payload)
    s, d = IPv4Address(src[0]).packed, IPv4Address(dst[0]).packed
    pseudo = s + d + struct.pack("!BBH", 0, PROTO_UDP, length)
    udp_check = internet_checksum(pseudo + _UDP.pack(src[1], dst[1], length, 0) + payload) or 0xFFFF
    header = bytearray(_OUTER_IP.pack(0x45, 0, 20 + length, 0, 0x4000, OUTER_TTL, PROTO_UDP, 0, s, d))
    header[10:12] = ipv4_header_checksum(header).to_bytes(2, "big")
    return bytes(header) + _UDP.pack(src[1], dst[1], length, udp_check) + payload


@dataclass(frozen=True)
class TraceFilter:
    """Which packets a client wants: all of the given conditions hold (none given: every packet).
    ``host``: inner source or destination in it; ``proto``: the inner protocol number; ``port``: the
    inner TCP/UDP source or destination port; ``peer``: the other node's public IP; ``drops``: only
    packets that were dropped."""

    host: IPv4Network | None = None
    proto: int | None = None
    port: int | None = None
    peer: str | None = None
    drops: bool = False

    @classmethod
    def from_query(cls, query: dict[str, str]) -> TraceFilter:
        """From the ``/trace`` request's parameters; ValueError naming the field if one is bad."""
        unknown = sorted(set(query) - {"host", "proto", "port", "peer", "drops", "count", "bytes"})
        if unknown:
            raise ValueError(f"unknown trace parameter(s): {', '.join(unknown)}")
        try:
            host = IPv4Network(query["host"], strict=False) if query.get("host") else None
        except ValueError as exc:
            raise ValueError(f"host: not an IPv4 address or network: {query['host']!r} ({exc})") from None
        proto = None
        if query.get("proto"):
            value = query["proto"].lower()
            proto = PROTOCOLS.get(value) if not value.isdigit() else int(value)
            if proto is None or not 0 <= proto <= 255:
                raise ValueError(f"proto: {query['proto']!r} is not icmp, tcp, udp or a number 0-255")
        port = None
        if query.get("port"):
            if not query["port"].isdigit() or not 0 <= int(query["port"]) <= 0xFFFF:
                raise ValueError(f"port: {query['port']!r} is not a port number 0-65535")
            port = int(query["port"])
        peer = None
        if query.get("peer"):
            try:
                peer = str(IPv4Address(query["peer"]))
            except ValueError:
                raise ValueError(f"peer: not an IPv4 address: {query['peer']!r}") from None
        return cls(host, proto, port, peer, query.get("drops", "") in ("1", "true", "yes"))

    def as_query(self) -> dict[str, str]:
        out = {"host": str(self.host) if self.host else "", "proto": "" if self.proto is None else str(self.proto),
               "port": "" if self.port is None else str(self.port), "peer": self.peer or "",
               "drops": "1" if self.drops else ""}
        return {k: v for k, v in out.items() if v}

    def matches(self, buf, n: int, peer: str | None, verdict: int) -> bool:
        """Whether the packet in the first ``n`` bytes of ``buf`` passes; never raises."""
        if self.drops and not verdict:
            return False
        if self.peer is not None and peer != self.peer:
            return False
        if self.host is None and self.proto is None and self.port is None:
            return True
        n = min(n, len(buf))
        if n < 20 or buf[0] >> 4 != 4:
            return False
        if self.proto is not None and buf[9] != self.proto:
            return False
        if self.host is not None:
            net, mask = int(self.host.network_address), int(self.host.netmask)
            src, dst = int.from_bytes(buf[12:16], "big"), int.from_bytes(buf[16:20], "big")
            if src & mask != net and dst & mask != net:
                return False
        if self.port is not None:
            ihl = (buf[0] & 0x0F) << 2
            if buf[9] not in (PROTO_TCP, PROTO_UDP) or n < ihl + 4 or (buf[6] << 8 | buf[7]) & 0x1FFF:
                return False
            if self.port not in _PORTS.unpack_from(buf, ihl):
                return False
        return True


@dataclass(frozen=True)
class TraceEvent:
    """One packet's journey through the daemon. ``inner``: the packet as on ``flannel0`` (empty when it
    never got there: dropped on the way in); ``payloads``: the UDP payload of each datagram on the
    underlay (empty when none was sent or received), carried from ``outer_src`` to ``outer_dst``."""

    direction: str  # "out": flannel0 → peer; "in": peer → flannel0
    verdict: str
    steps: tuple[tuple[str, str], ...]
    inner: bytes = b""
    payloads: tuple[bytes, ...] = ()
    outer_src: NextHop | None = None
    outer_dst: NextHop | None = None
    time_us: int = 0
    notes: tuple[str, ...] = field(default=())

    def outer(self) -> list[bytes]:
        """The datagrams as on the underlay, their IPv4 and UDP headers rebuilt (:data:`OUTER_NOTE`)."""
        if self.outer_src is None or self.outer_dst is None:
            return []
        return [outer_datagram(self.outer_src, self.outer_dst, p) for p in self.payloads]

    def one_line(self) -> str:
        """The journey on one line, for the daemon's ``--trace`` log."""
        return f"{self.direction} " + "; ".join(f"{name}: {text}" for name, text in self.steps)


def _verdict_step(verdict: int, where: str, buf, n: int, direction: str) -> tuple[str, str]:
    v = Verdict(verdict)
    if v == FORWARD:
        return ("verdict", f"FORWARD: {where}")
    answer = ANSWERS.get(v)
    src = _ip(buf, 12) if n >= 20 else "?"
    tail = f"; {answer} sent to {src}" if answer else ""
    return ("verdict", f"{v.name}: dropped, counted in udpflannel_drops_total{{direction=\"{direction}\","
                       f"reason=\"{v.name.lower()}\"}}{tail}")


def outbound_event(buf, n: int, verdict: int, hop: NextHop | None, *, routes: RouteTable, local: NextHop,
                   tun_name: str = "flannel0", gso: tuple[int, int] | None = None,
                   segments: tuple[bytes, ...] = (), time_us: int = 0) -> TraceEvent:
    """A packet read from the TUN (``n`` bytes of ``buf``, after ``forward.outbound`` said ``verdict``,
    ``hop``). ``gso``: (type, size) of a TSO/USO super-packet; ``segments``: the datagrams it was cut
    into (none: the packet is sent as it is)."""
    forwarded = verdict == FORWARD
    inner = with_ttl_restored(buf, n) if forwarded else bytes(buf[:n])
    what = summary(inner, n)
    if gso is not None:
        what = f"super-packet {what}, {GSO_NAMES.get(gso[0], f'GSO type {gso[0]}')} gso_size {gso[1]}"
        if segments:
            what += f", cut into {len(segments)} segments"
    steps = [("tun read", f"{tun_name} → daemon: {what}")]
    where = "sent" if forwarded else "not sent"
    if verdict not in (TOO_SHORT, NOT_IPV4, BAD_HEADER) and n >= 20:
        dst = int.from_bytes(bytes(inner[16:20]), "big")
        subnet = routes.subnet_of(dst)
        if verdict == NO_ROUTE or subnet is None:
            steps.append(("route", f"{IPv4Address(dst)} is in no leased subnet"))
        else:
            to = hop or routes.lookup(dst)
            steps.append(("route", f"{IPv4Address(dst)} in {subnet} → node {to[0]}:{to[1]}" if to else f"{subnet}"))
            if forwarded:
                steps.append(("ttl", f"{inner[8]} → {buf[8]} (header checksum patched, RFC 1624)"))
            elif verdict == TTL_EXPIRED:
                steps.append(("ttl", f"{inner[8]}: cannot be forwarded"))
    payloads = segments or ((bytes(buf[:n]),) if forwarded else ())
    if forwarded and hop is not None:
        sizes = sorted({len(p) for p in payloads})
        size = (f"{len(payloads)} datagrams of {sizes[-1] + 28} bytes (last {len(payloads[-1]) + 28}), sent in "
                "UDP_SEGMENT batches (up to 64 a sendmsg, where the socket has GSO)") \
            if len(payloads) > 1 else f"datagram {n + 28} bytes (IPv4 20 + UDP 8 + {n})"
        steps.append(("encap", f"UDP {local[0]}:{local[1]} → {hop[0]}:{hop[1]}, {size}"))
        where = f"sent to {hop[0]}:{hop[1]}"
    steps.append(_verdict_step(verdict, where, inner, n, "tun_to_udp"))
    return TraceEvent("out", Verdict(verdict).name, tuple(steps), inner, payloads if forwarded else (),
                      local, hop, time_us)


def _failed_at(buf, n: int, verdict: int) -> str:
    """Which receive step refused the datagram (``forward.inbound``'s order)."""
    if verdict == OVERSIZE:
        return "udp recv"
    if verdict in (TOO_SHORT, NOT_IPV4) or verdict == BAD_HEADER and check_ipv4(buf, n):
        return "decap"
    if verdict in (UNKNOWN_PEER, SPOOFED_SOURCE):
        return "peer"
    if verdict in (BAD_CHECKSUM, BAD_HEADER, BAD_L4_CHECKSUM):
        return "checks"
    return "ttl"


def inbound_event(buf, n: int, verdict: int, peer: NextHop, *, routes: RouteTable, local: NextHop,
                  tun_mtu: int, tun_name: str = "flannel0", merged: int = 0, time_us: int = 0) -> TraceEvent:
    """A datagram received from ``peer`` (``n`` bytes of ``buf``, after ``forward.inbound`` said
    ``verdict``). ``merged``: this is a GRO run of that many datagrams, merged into the one TUN write
    in ``buf`` (its datagrams are not kept)."""
    forwarded = verdict == FORWARD
    received = with_ttl_restored(buf, n) if forwarded else bytes(buf[:n])
    if merged:
        steps = [("udp recv", f"{peer[0]}:{peer[1]} → {local[0]}:{local[1]}, GRO: {merged} datagrams of one flow, "
                              f"merged into one {n}-byte packet")]
    else:
        steps = [("udp recv", f"{peer[0]}:{peer[1]} → {local[0]}:{local[1]}, datagram {n + 28} bytes "
                              f"(IPv4 20 + UDP 8 + {n}); {tun_name} MTU {tun_mtu}")]
    failed = "" if forwarded else _failed_at(received, n, verdict)
    order = ["udp recv", "decap", "peer", "checks", "ttl", "tun write"]
    upto = order.index(failed) if failed else len(order)
    if upto >= 1:
        steps.append(("decap", f"inner {summary(received, n)}"))
    if upto >= 2:
        subnets = routes.subnets_of(peer)
        leased = ", ".join(map(str, subnets)) or "no lease"
        src = _ip(received, 12)
        if failed == "peer":
            steps.append(("peer", f"{peer[0]}:{peer[1]} holds {leased}; inner source {src}: {Verdict(verdict).name}"))
        else:
            steps.append(("peer", f"{peer[0]}:{peer[1]} holds {leased}; inner source {src} inside it"))
    if upto >= 3:
        steps.append(("checks", "IPv4 header, length and checksum, transport checksum: "
                                + (Verdict(verdict).name if failed == "checks" else "ok")))
    if upto >= 4:
        if forwarded:
            steps.append(("ttl", f"{received[8]} → {buf[8]} (header checksum patched, RFC 1624)"))
        else:
            steps.append(("ttl", f"{received[8]}: cannot be forwarded"))
    if forwarded:
        how = f"one GSO write of {merged} segments" if merged else "one write"
        steps.append(("tun write", f"daemon → {tun_name}, {how}, {n} bytes; the kernel routes it on to "
                                   f"{_ip(buf, 16)} (cni0)"))
    steps.append(_verdict_step(verdict, f"written to {tun_name}", received, n, "udp_to_tun"))
    payloads = () if merged else (received,)
    return TraceEvent("in", Verdict(verdict).name, tuple(steps), bytes(buf[:n]) if forwarded else b"",
                      payloads, peer, local, time_us)
