"""TUN offloads: ask the kernel for TSO/USO super-packets instead of MTU-sized ones (and to take them back).

A TUN opened with ``IFF_VNET_HDR`` gets a 10-byte virtio_net_hdr (``tun/vnet.py``) in front of every
read and write. ``TUNSETOFFLOAD`` then tells the kernel which offloads our end of the device handles:

- ``TUN_F_CSUM``: packets may arrive with a partial checksum (``NEEDS_CSUM``); required by the others;
- ``TUN_F_TSO4``/``TSO6``: TCP super-packets up to 64 KB (``GSO_TCPV4``/``GSO_TCPV6``);
- ``TUN_F_USO4``/``USO6``: UDP super-packets (``GSO_UDP_L4``, Linux >= 6.2; optional).

What we *write* may always carry GSO (the kernel segments it if it must): the flags only govern reads.

ioctl numbers: ``_IOW('T', nr, unsigned int)`` packs direction, argument size, type and number into 32
bits. On the generic layout (x86, arm, arm64, riscv, s390, loongarch) "write" is 1 in bits 30-31 and the
size takes 14 bits: TUNSETOFFLOAD = 0x400454d0. Alpha, MIPS, PowerPC and SPARC use 3 direction bits with
write = 4 (read = 2) and a 13-bit size, which gives 0x800454d0 there; :func:`_ioc` computes the right one
for the machine it runs on.
"""

from __future__ import annotations

import fcntl
import logging
import platform
from dataclasses import dataclass

log = logging.getLogger(__name__)

TUN_F_CSUM = 0x01
TUN_F_TSO4 = 0x02
TUN_F_TSO6 = 0x04
TUN_F_TSO_ECN = 0x08
TUN_F_UFO = 0x10
TUN_F_USO4 = 0x20
TUN_F_USO6 = 0x40

IFF_VNET_HDR = 0x4000

_OTHER_LAYOUT = platform.machine().lower().startswith(("alpha", "mips", "ppc", "powerpc", "sparc"))


def _ioc(direction: str, type_: str, nr: int, size: int) -> int:
    """Linux ``_IOC`` for this machine's layout (see the module docstring)."""
    if _OTHER_LAYOUT:
        bits = {"w": 4, "r": 2}[direction] << 29
    else:
        bits = {"w": 1, "r": 2}[direction] << 30
    return bits | size << 16 | ord(type_) << 8 | nr


TUNSETOFFLOAD = _ioc("w", "T", 208, 4)


@dataclass(frozen=True)
class TunOffloads:
    """What the kernel agreed to, probed once when the device is opened."""

    tso: bool = False  # TUN_F_TSO4 | TUN_F_TSO6 (Linux 2.6.27)
    uso: bool = False  # TUN_F_USO4 | TUN_F_USO6 (Linux 6.2)


def enable_offloads(fd: int, *, uso: bool = True) -> TunOffloads:
    """Turn on CSUM|TSO4|TSO6 on a TUN opened with IFF_VNET_HDR, then USO4|USO6 if ``uso`` and the
    kernel has them. Never raises: what failed is simply off (and the caller falls back)."""
    base = TUN_F_CSUM | TUN_F_TSO4 | TUN_F_TSO6
    try:
        fcntl.ioctl(fd, TUNSETOFFLOAD, base)
    except OSError as exc:
        log.info("TUN offloads unavailable (TUNSETOFFLOAD: %s)", exc)
        return TunOffloads()
    if uso:
        try:
            fcntl.ioctl(fd, TUNSETOFFLOAD, base | TUN_F_USO4 | TUN_F_USO6)
        except OSError:
            uso = False
    return TunOffloads(tso=True, uso=uso)
