"""How to reach etcd and where flannel's keys live: flanneld's ``--etcd-*`` flags as one record.

Light on purpose (no gRPC): the command line imports it for its defaults before any etcd code loads.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

DEFAULT_ENDPOINTS = ("http://127.0.0.1:4001", "http://127.0.0.1:2379")  # flanneld's
DEFAULT_PREFIX = "/coreos.com/network"


@dataclass(frozen=True)
class EtcdOptions:
    """``endpoints``: ``http(s)://host:port`` URLs, or one comma-separated string of them; TLS files and
    BasicAuth as flanneld takes them (empty means not given); ``timeout``: seconds per request."""

    endpoints: str | Sequence[str] = DEFAULT_ENDPOINTS
    keyfile: str | None = None
    certfile: str | None = None
    cafile: str | None = None
    username: str | None = None
    password: str | None = None
    timeout: float = 5.0
