"""udpflannel.fragment: RFC 791 fragmentation of an inner packet without DF, against the rules
written out one fragment at a time (sizes, offsets, MF, options, checksums) and by reassembly."""

from __future__ import annotations

import struct

from hypothesis import given
from hypothesis import strategies as st

from tests.strategies import ipv4_packets, slow_header_checksum, u16
from udpflannel.fragment import DF, MF, copied_options, fragment

no_df = u16.filter(lambda flags: not flags & DF)
packets_without_df = ipv4_packets(payload=st.binary(max_size=3000), frag=no_df)


def fields(packet: bytes) -> tuple[int, int, int, int]:
    """(header length, total length, flags/offset word, header checksum as stored)."""
    header_len = (packet[0] & 0x0F) * 4
    total, flags = struct.unpack_from("!H", packet, 2)[0], struct.unpack_from("!H", packet, 6)[0]
    return header_len, total, flags, struct.unpack_from("!H", packet, 10)[0]


@given(packets_without_df, st.integers(68, 1600))
def test_fragments_fit_carry_the_rules_and_reassemble_into_the_packet(packet: bytearray, mtu: int) -> None:
    header_len, _, flags, _ = fields(packet)
    offset, payload = (flags & 0x1FFF) * 8, bytes(packet[header_len:])
    pieces = fragment(packet, len(packet), mtu)
    if len(packet) <= mtu:
        assert pieces == [bytes(packet)]
        return
    if header_len + 8 > mtu or offset + len(payload) > 0xFFFF:
        assert pieces == []
        return
    assert len(pieces) >= 2
    options = bytes(packet[20:header_len])
    data = b""
    for i, piece in enumerate(pieces):
        piece_header_len, total, piece_flags, checksum = fields(piece)
        last = i == len(pieces) - 1
        assert len(piece) <= mtu and total == len(piece)
        assert checksum == slow_header_checksum(piece)
        assert (piece[0] >> 4, piece[1], piece[4:6], piece[8:10], piece[12:20]) == (
            4, packet[1], packet[4:6], packet[8:10], packet[12:20])  # TOS, ID, TTL, protocol, addresses kept
        expected_options = options if i == 0 else copied_options(options)
        assert piece_header_len == 20 + len(expected_options) and piece[20:piece_header_len] == expected_options
        assert (piece_flags & 0x1FFF) * 8 == offset + len(data)
        assert piece_flags & MF == (flags & MF if last else MF)
        assert not piece_flags & DF
        chunk = piece[piece_header_len:]
        assert last or len(chunk) % 8 == 0
        data += chunk
    assert data == payload


@given(ipv4_packets(payload=st.binary(min_size=100, max_size=2000), frag=u16.map(lambda f: f | DF)),
       st.integers(68, 1500))
def test_a_packet_with_df_is_never_fragmented(packet: bytearray, mtu: int) -> None:
    expected = [bytes(packet)] if len(packet) <= mtu else []
    assert fragment(packet, len(packet), mtu) == expected


@given(st.binary(max_size=200), st.integers(0, 300), st.integers(0, 2000))
def test_garbage_is_refused_and_never_raises(data: bytes, n: int, mtu: int) -> None:
    pieces = fragment(data, n, mtu)
    assert isinstance(pieces, list)


def test_copied_options_by_example() -> None:
    """Security (0x82) and router alert (0x94) have the copied bit; timestamp (0x44) and record route
    (0x07) do not; NOPs go, end-of-list ends; a bad length ends the walk."""
    security = bytes([0x82, 11]) + bytes(9)
    alert = bytes([0x94, 4, 0, 0])
    timestamp = bytes([0x44, 8, 5, 0]) + bytes(4)
    record_route = bytes([0x07, 7, 4]) + bytes(4)
    assert copied_options(timestamp + security + b"\x01" + alert) == security + alert + b"\0"
    assert copied_options(record_route + b"\x01") == b""
    assert copied_options(alert + b"\x00" + security) == alert
    assert copied_options(alert + bytes([0x94, 1])) == alert  # a length below 2: stop
    assert copied_options(alert + bytes([0x82, 30, 0])) == alert  # a length past the end: stop
