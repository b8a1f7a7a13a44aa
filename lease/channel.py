"""How to reach one etcd member: flanneld-style endpoint URLs, TLS files, and aetcd's client over a
secure channel (aetcd 1.0 only opens insecure ones), with the gRPC keepalive settings every channel
uses. :mod:`lease.etcd` picks the member and runs the calls; this module only builds the way there.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from urllib.parse import urlsplit

import aetcd
import grpc
import grpc.aio
from aetcd import rpc

from lease.errors import ConfigError

log = logging.getLogger(__name__)

CHANNEL_OPTIONS = {
    # Ping every 10 s (etcd's default --grpc-keepalive-min-time is 5 s) and give up on a silent server.
    "grpc.keepalive_time_ms": 10_000,
    "grpc.keepalive_timeout_ms": 5_000,
    "grpc.keepalive_permit_without_calls": 1,
    "grpc.http2.max_pings_without_data": 0,
    "grpc.initial_reconnect_backoff_ms": 100,
    "grpc.max_reconnect_backoff_ms": 2_000,
}


@dataclass(frozen=True, slots=True)
class Endpoint:
    host: str
    port: int
    tls: bool

    def __str__(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{'https' if self.tls else 'http'}://{host}:{self.port}"


def parse_endpoints(value: str | Sequence[str]) -> tuple[Endpoint, ...]:
    """``--etcd-endpoints``: a comma-separated string or a list of ``http(s)://host:port`` URLs."""
    items = value.split(",") if isinstance(value, str) else list(value)
    endpoints = []
    for item in (i.strip() for i in items):
        if not item:
            continue
        url = urlsplit(item if "://" in item else f"http://{item}")
        if url.scheme not in ("http", "https"):
            raise ConfigError("etcd-endpoints", f"{item!r}: only http:// and https:// endpoints are supported")
        try:
            port = url.port or 2379
        except ValueError as e:
            raise ConfigError("etcd-endpoints", f"{item!r}: {e}") from None
        if not url.hostname:
            raise ConfigError("etcd-endpoints", f"{item!r} has no host")
        endpoints.append(Endpoint(url.hostname, port, url.scheme == "https"))
    if not endpoints:
        raise ConfigError("etcd-endpoints", "no endpoint given")
    return tuple(endpoints)


def _read(path: str | None, flag: str) -> bytes | None:
    if not path:
        return None
    try:
        with open(path, "rb") as f:
            return f.read()
    except OSError as e:
        raise ConfigError(flag, f"cannot read {path}: {e.strerror}") from None


def tls_credentials(
    keyfile: str | None, certfile: str | None, cafile: str | None, *, https: bool
) -> grpc.ChannelCredentials | None:
    """TLS when an endpoint is https or a client key+cert is given (like flanneld); None for plain http."""
    if bool(keyfile) != bool(certfile):
        flag = "etcd-certfile" if keyfile else "etcd-keyfile"
        raise ConfigError(flag, "--etcd-keyfile and --etcd-certfile must be given together")
    if not (https or keyfile):
        if cafile:
            log.warning("--etcd-cafile is ignored: no https endpoint and no client certificate")
        return None
    return grpc.ssl_channel_credentials(
        root_certificates=_read(cafile, "etcd-cafile"),
        private_key=_read(keyfile, "etcd-keyfile"),
        certificate_chain=_read(certfile, "etcd-certfile"),
    )


class Client(aetcd.Client):
    """aetcd's client, plus TLS: aetcd 1.0 only opens insecure channels."""

    def __init__(self, *, credentials: grpc.ChannelCredentials | None, **kwargs) -> None:
        super().__init__(**kwargs)
        self._credentials = credentials

    async def connect(self) -> None:
        if self._credentials is None:
            return await super().connect()
        if self._connected.is_set():
            return
        # The same steps as aetcd.Client.connect, over a secure channel.
        self.channel = grpc.aio.secure_channel(
            f"{self._host}:{self._port}", self._credentials, options=list(self._options.items())
        )
        if self._username is not None and self._password is not None:
            self.auth_stub = rpc.AuthStub(self.channel)
            resp = await self.auth_stub.Authenticate(
                rpc.AuthenticateRequest(name=self._username, password=self._password), timeout=self._timeout
            )
            self.metadata = (("token", resp.token),)
        self.kvstub = rpc.KVStub(self.channel)
        self.clusterstub = rpc.ClusterStub(self.channel)
        self.leasestub = rpc.LeaseStub(self.channel)
        self.maintenancestub = rpc.MaintenanceStub(self.channel)
        self._connected.set()  # no aetcd watcher: EtcdSession.watch speaks the Watch RPC itself
