"""A minimal pcapng writer (IETF draft-ietf-opsawg-pcapng): one section, a few interfaces, packets.

Sans-IO: the ``*_block`` functions return bytes; :class:`PcapngWriter` only appends them to a binary
file. Every field is written little-endian (``<``), which the section header's byte-order magic
0x1A2B3C4D declares, so readers on any host decode it. Timestamps are in microseconds since the epoch
(the default ``if_tsresol`` of 10^-6, so no option is needed for it).

``udpflannel trace --pcap`` writes two interfaces, both ``LINKTYPE_IPV4`` (a bare IPv4 packet, no
link header), so that tcpdump, whose libpcap refuses a file mixing link types, reads it as well as
tshark and Wireshark: ``flannel0`` (the inner packets) and the underlay (the UDP datagrams). Not
``LINKTYPE_RAW`` (101): libpcap 1.10 maps it to another DLT number for the first interface only and
then refuses the second as "a type 101 different from the type of the first interface".
"""

from __future__ import annotations

import struct
from typing import BinaryIO

LINKTYPE_IPV4 = 228  # a bare IPv4 packet, no link-layer header (tcpdump.org/linktypes.html)

SHB_TYPE = 0x0A0D0D0A  # section header block
IDB_TYPE = 0x00000001  # interface description block
EPB_TYPE = 0x00000006  # enhanced packet block
BYTE_ORDER_MAGIC = 0x1A2B3C4D

OPT_END = 0
OPT_COMMENT = 1
SHB_USERAPPL = 4
IF_NAME = 2
IF_DESCRIPTION = 3

MAX_SNAPLEN = 262144  # what tcpdump and Wireshark accept; a TSO super-packet (≤ 64 KB) fits whole

_OPTION_HEAD = struct.Struct("<HH")  # code, length
_BLOCK_HEAD = struct.Struct("<II")  # type, total length
_BLOCK_TAIL = struct.Struct("<I")  # total length again
_SHB_BODY = struct.Struct("<IHHq")  # byte-order magic, major, minor, section length (-1: unknown)
_IDB_BODY = struct.Struct("<HHI")  # link type, reserved, snaplen
_EPB_BODY = struct.Struct("<IIIII")  # interface id, timestamp high, timestamp low, captured, original length


def _pad(data: bytes) -> bytes:
    """``data`` zero-padded to a multiple of 4 bytes, as every pcapng field must be."""
    return data + b"\0" * (-len(data) % 4)


def options(items: list[tuple[int, str | bytes]]) -> bytes:
    """An option list (code, value) with its end marker; empty values are left out. Text is UTF-8."""
    out = b""
    for code, value in items:
        raw = value.encode() if isinstance(value, str) else value
        if raw:
            out += _OPTION_HEAD.pack(code, len(raw)) + _pad(raw)
    return out + _OPTION_HEAD.pack(OPT_END, 0) if out else b""


def _block(block_type: int, body: bytes) -> bytes:
    total = _BLOCK_HEAD.size + len(body) + _BLOCK_TAIL.size
    return _BLOCK_HEAD.pack(block_type, total) + body + _BLOCK_TAIL.pack(total)


def section_header_block(*, application: str = "", comment: str = "") -> bytes:
    """The file's first block: byte order, version 1.0, section length unknown."""
    return _block(SHB_TYPE, _SHB_BODY.pack(BYTE_ORDER_MAGIC, 1, 0, -1)
                  + options([(OPT_COMMENT, comment), (SHB_USERAPPL, application)]))


def interface_block(name: str, description: str = "", *, linktype: int = LINKTYPE_IPV4,
                    snaplen: int = MAX_SNAPLEN) -> bytes:
    """One interface; packets name it by its position among the section's interface blocks."""
    return _block(IDB_TYPE, _IDB_BODY.pack(linktype, 0, snaplen)
                  + options([(IF_NAME, name), (IF_DESCRIPTION, description)]))


def packet_block(interface: int, timestamp_us: int, data: bytes, *, original_length: int | None = None,
                 comment: str = "") -> bytes:
    """One packet on ``interface`` at ``timestamp_us`` (µs since the epoch), all of ``data`` captured."""
    length = len(data) if original_length is None else original_length
    body = _EPB_BODY.pack(interface, timestamp_us >> 32, timestamp_us & 0xFFFFFFFF, len(data), length)
    return _block(EPB_TYPE, body + _pad(bytes(data)) + options([(OPT_COMMENT, comment)]))


class PcapngWriter:
    """Appends blocks to ``file`` (opened binary): the section header now, interfaces and packets as
    they come. ``add_interface`` returns the id that ``add_packet`` takes."""

    def __init__(self, file: BinaryIO, *, application: str = "", comment: str = "") -> None:
        self.file = file
        self.interfaces = 0
        file.write(section_header_block(application=application, comment=comment))

    def add_interface(self, name: str, description: str = "", *, linktype: int = LINKTYPE_IPV4) -> int:
        self.file.write(interface_block(name, description, linktype=linktype))
        self.interfaces += 1
        return self.interfaces - 1

    def add_packet(self, interface: int, timestamp_us: int, data: bytes, *, comment: str = "") -> None:
        if not 0 <= interface < self.interfaces:
            raise ValueError(f"no interface {interface} (this section has {self.interfaces})")
        self.file.write(packet_block(interface, timestamp_us, data, comment=comment))
