"""The per-direction forwarding decisions (sans-IO): what each kind of packet turns into."""

from __future__ import annotations

import struct
from ipaddress import IPv4Network

from hypothesis import given
from hypothesis import strategies as st

from tests.strategies import ipv4_packets, slow_header_checksum
from tests.tools import hostile
from udpflannel.forward import describe, inbound, outbound
from udpflannel.packet import Verdict, check_ipv4
from udpflannel.routes import RouteTable

PEER = ("198.18.0.2", 8285)
ROUTES = RouteTable([(IPv4Network("10.5.2.0/24"), PEER)])
IN_PEER = 0x0A050200  # 10.5.2.0
IN_US = 0x0A050100  # 10.5.1.0


def packet(src: int, dst: int, ttl: int = 64, size: int = 84) -> bytearray:
    """An ICMP echo request, as ping sends it: valid IP and ICMP checksums."""
    from tests.strategies import slow_checksum

    header = bytearray(struct.pack("!BBHHHBBHII", 0x45, 0, size, 7, 0x4000, ttl, 1, 0, src, dst))
    header[10:12] = slow_header_checksum(bytes(header)).to_bytes(2, "big")
    echo = bytearray(struct.pack("!BBHHH", 8, 0, 0, 0x1234, 1) + bytes(size - 28))
    echo[2:4] = slow_checksum(bytes(echo)).to_bytes(2, "big")
    return header + echo


def test_outbound_routes_and_decrements():
    buf = packet(IN_US + 2, IN_PEER + 2)
    verdict, hop = outbound(buf, len(buf), ROUTES)
    assert (verdict, hop) == (Verdict.FORWARD, PEER)
    assert buf[8] == 63 and int.from_bytes(buf[10:12], "big") == slow_header_checksum(bytes(buf[:20]))


def test_outbound_no_route_leaves_the_packet_for_the_icmp_quote():
    buf = packet(IN_US + 2, 0x0A054D02)
    before = bytes(buf)
    assert outbound(buf, len(buf), ROUTES) == (Verdict.NO_ROUTE, None)
    assert bytes(buf) == before


def test_outbound_ttl_0_and_1_expire_instead_of_wrapping():
    for ttl in (0, 1):
        buf = packet(IN_US + 2, IN_PEER + 2, ttl=ttl)
        assert outbound(buf, len(buf), ROUTES) == (Verdict.TTL_EXPIRED, None)
        assert buf[8] == ttl


def test_inbound_accepts_a_peer_and_decrements():
    buf = packet(IN_PEER + 2, IN_US + 2)
    assert inbound(buf, len(buf), PEER, ROUTES, tun_mtu=1472, check_source=True) == Verdict.FORWARD
    assert buf[8] == 63


def test_inbound_rejections():
    def verdict(buf, peer=PEER, n=None, check_source=True, mtu=1472):
        return inbound(buf, len(buf) if n is None else n, peer, ROUTES, tun_mtu=mtu, check_source=check_source)

    good = packet(IN_PEER + 2, IN_US + 2)
    assert verdict(bytearray(good), mtu=83) == Verdict.OVERSIZE  # flannel truncates; we drop
    assert verdict(bytearray(good), peer=("198.18.0.9", 8285)) == Verdict.UNKNOWN_PEER
    assert verdict(bytearray(good), peer=("198.18.0.2", 40000)) == Verdict.UNKNOWN_PEER
    assert verdict(bytearray(good), peer=("198.18.0.9", 8285), check_source=False) == Verdict.UNKNOWN_PEER
    spoofed = packet(0x0A050302, IN_US + 2)  # claims 10.5.3.2, not in the peer's 10.5.2.0/24
    assert verdict(spoofed) == Verdict.SPOOFED_SOURCE
    assert verdict(packet(0x0A050302, IN_US + 2), check_source=False) == Verdict.FORWARD
    corrupt = bytearray(good)
    corrupt[10] ^= 0xFF
    assert verdict(corrupt) == Verdict.BAD_CHECKSUM
    assert verdict(bytearray(good), n=83) == Verdict.BAD_HEADER  # total length says 84
    assert verdict(packet(IN_PEER + 2, IN_US + 2, ttl=1)) == Verdict.TTL_EXPIRED
    ipv6 = bytearray(b"\x60" + bytes(47))
    assert verdict(ipv6) == Verdict.NOT_IPV4


def _flip(packet: bytes, spot: int, bit: int) -> bytes:
    spot %= len(packet)
    return packet[:spot] + bytes([packet[spot] ^ (1 << bit)]) + packet[spot + 1:]


# garbage, and packets a peer could send (inner source and destination in the peer's subnet), some damaged
_PEERS_PACKETS = ipv4_packets(src=st.integers(IN_PEER, IN_PEER + 255), dst=st.integers(IN_PEER, IN_PEER + 255))
_ANY_BYTES = st.binary(max_size=200) | _PEERS_PACKETS | st.builds(_flip, _PEERS_PACKETS, st.integers(0, 1 << 16),
                                                                  st.integers(0, 7))


@given(_ANY_BYTES, st.booleans())
def test_garbage_never_raises_and_is_never_forwarded_unchanged(data, check_source):
    """Whatever the bytes: a verdict, never an exception. Only a valid IPv4 packet is forwarded, and then
    not as it came (TTL one lower, header checksum patched, nothing else touched); a refused one stays as
    it was."""
    n = len(data)
    for direction in ("inbound", "outbound"):
        buf = bytearray(data) + bytearray(64)
        if direction == "inbound":
            verdict = inbound(buf, n, PEER, ROUTES, tun_mtu=1472, check_source=check_source)
        else:
            verdict, _ = outbound(buf, n, ROUTES)
        assert isinstance(verdict, Verdict)
        if verdict == Verdict.FORWARD:
            ihl = (data[0] & 15) * 4
            assert check_ipv4(bytearray(data), n) == Verdict.FORWARD
            assert direction == "outbound" or not hostile.problem(bytes(data)), "inbound let a malformed packet in"
            assert buf[8] == data[8] - 1 and buf[:8] == data[:8] and buf[12:n] == data[12:n]
            if int.from_bytes(data[10:12], "big") == slow_header_checksum(bytes(data[:ihl])):  # (inbound: always)
                assert int.from_bytes(buf[10:12], "big") == slow_header_checksum(bytes(buf[:ihl]))
            else:  # the kernel handed us a wrong one (outbound trusts it): patched, still wrong, as flannel's
                assert direction == "outbound" and buf[10:12] != data[10:12]
        else:
            assert buf[:n] == data
        assert isinstance(describe(buf, n), str)


# Payloads here are random bytes: protocols whose checksum inbound checks, and fragments, are left out
# (check_transport's tests cover them).
@given(ipv4_packets(ttl=st.integers(2, 255), src=st.just(IN_US + 5), dst=st.integers(IN_PEER, IN_PEER + 255),
                    protocol=st.integers(0, 255).filter(lambda p: p not in (1, 6, 17)), frag=st.sampled_from([0, 0x4000])))
def test_round_trip_through_both_directions(pkt):
    """outbound on one node, inbound on the peer: two TTL decrements, checksum valid throughout."""
    buf = bytearray(pkt)
    verdict, hop = outbound(buf, len(buf), ROUTES)
    assert verdict == Verdict.FORWARD
    peer_routes = RouteTable([(IPv4Network("10.5.1.0/24"), ("198.18.0.1", 8285))])
    ttl = buf[8]
    result = inbound(buf, len(buf), ("198.18.0.1", 8285), peer_routes, tun_mtu=65535, check_source=True)
    assert result == (Verdict.FORWARD if ttl > 1 else Verdict.TTL_EXPIRED)
    ihl = (buf[0] & 15) * 4
    assert int.from_bytes(buf[10:12], "big") == slow_header_checksum(bytes(buf[:ihl]))


def test_inbound_refuses_a_broken_transport_unless_the_caller_checked_it():
    """A bad ICMP checksum is BAD_L4_CHECKSUM; ``transport_checked`` (a run's first row, whose checksum
    the coalescer verified) skips only that sum: the IP checks still apply."""
    broken = packet(IN_PEER + 2, IN_US + 2)
    broken[40] ^= 0x01
    assert inbound(bytearray(broken), len(broken), PEER, ROUTES, tun_mtu=1472, check_source=True) == Verdict.BAD_L4_CHECKSUM
    assert inbound(bytearray(broken), len(broken), PEER, ROUTES, tun_mtu=1472, check_source=True,
                   transport_checked=True) == Verdict.FORWARD
    broken[10] ^= 0x01
    assert inbound(bytearray(broken), len(broken), PEER, ROUTES, tun_mtu=1472, check_source=True,
                   transport_checked=True) == Verdict.BAD_CHECKSUM
