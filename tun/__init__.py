"""The TUN device: open it (python-pytun), configure it (pyroute2), and later its offloads.

Nothing outside this package touches a TUN ioctl or a virtio header.
"""

from tun.configure import configure_tun
from tun.device import TunDevice, open_tun

__all__ = ["TunDevice", "open_tun", "configure_tun"]
