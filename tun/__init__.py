"""The TUN device: open it (``tun.device``, python-pytun), configure it (``tun.configure``, pyroute2),
its offloads (``tun.offload``, ``tun.vnet``) and GSO/GRO (``tun.gso``). Nothing outside this package
touches a TUN ioctl or a virtio header.

Deliberately empty: importing ``tun.layout`` (header constants) must not load pytun or pyroute2, so
``udpflannel status`` stays fast. Import the module you need.
"""
