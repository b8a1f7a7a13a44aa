"""udpflannel: flannel's UDP backend (the flannel0 TUN dataplane), rebuilt as an asyncio daemon."""

__version__ = "0.1.0"
