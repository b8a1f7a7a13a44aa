"""Open a flannel-style TUN device: ``IFF_TUN | IFF_NO_PI``, name pattern ``flannel%d``, non-blocking.

python-pytun issues ``TUNSETIFF`` (``_IOW('T', 202, int)`` = 0x400454ca on every Linux architecture
that uses the generic ioctl encoding: x86, arm, arm64, riscv, s390; it differs only on
alpha/mips/powerpc/sparc, whose ``_IOW`` direction bits are laid out differently — pytun takes the
number from the C headers of the machine it was built on, so it is right everywhere).

With ``IFF_NO_PI`` each ``read`` returns one bare IP packet and each ``write`` takes one, which is
exactly what flannel's UDP backend puts into a datagram. The device is not persistent: it disappears
when the last descriptor closes, as flannel's does.
"""

from __future__ import annotations

import fcntl
import os

import pytun

from tun.errors import TunError

DEFAULT_NAME_PATTERN = "flannel%d"


class TunDevice:
    """Owns the TUN file descriptor. ``fd`` is -1 after ``close()`` so a reused number can't be hit."""

    def __init__(self, dev: pytun.TunTapDevice, *, vnet_hdr: bool = False) -> None:
        self._dev = dev
        self.name: str = dev.name
        self.fd: int = dev.fileno()
        self.vnet_hdr = vnet_hdr  # every read and write carries a virtio_net_hdr (tun/vnet.py)

    def close(self) -> None:
        if self.fd != -1:
            self.fd = -1
            self._dev.close()

    def __enter__(self) -> TunDevice:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"TunDevice(name={self.name!r}, fd={self.fd})"


def open_tun(name: str = DEFAULT_NAME_PATTERN, *, vnet_hdr: bool = False) -> TunDevice:
    """Create the device; a ``%d`` in ``name`` lets the kernel pick the lowest free index.

    ``vnet_hdr`` adds ``IFF_VNET_HDR`` for the fast path (offloads are then set by ``tun.offload``).
    """
    flags = pytun.IFF_TUN | pytun.IFF_NO_PI | (pytun.IFF_VNET_HDR if vnet_hdr else 0)
    try:
        dev = pytun.TunTapDevice(name=name, flags=flags)
    except pytun.Error as exc:
        raise TunError(f"cannot create TUN device {name!r}: {exc} (is /dev/net/tun there, are you root?)") from exc
    fd = dev.fileno()
    fcntl.fcntl(fd, fcntl.F_SETFL, fcntl.fcntl(fd, fcntl.F_GETFL) | os.O_NONBLOCK)
    return TunDevice(dev, vnet_hdr=vnet_hdr)
