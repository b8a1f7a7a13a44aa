"""Lease records in etcd: the subnet key and the JSON value, byte-compatible with flanneld (§1, §3).

Pure functions. Parsing never raises: a record that Go flanneld would not accept (or that we refuse
on top of that) comes back as a :class:`Malformed` value, so that a watch can log it and carry on.

Keys are ``<prefix>/subnets/A.B.C.D-N``, optionally followed by ``&<ipv6>-<len>`` (a dual-stack
node). Only keys *directly* under ``<prefix>/subnets/`` are leases: flanneld's end-anchored regex also
takes ``subnets_old/...`` or deeper paths, we do not. Like Go, the prefix length must be 0–31. A key with
host bits set (``10.5.35.7-24``) parses (it still occupies address space) but is flagged ``host_bits``:
it is never routed nor reused.
"""

from __future__ import annotations

import json
import posixpath
import re
from dataclasses import dataclass
from ipaddress import AddressValueError, IPv4Address, IPv4Network, IPv6Address
from typing import Any

_KEY = re.compile(
    r"(?P<ip>[0-9]{1,3}(?:\.[0-9]{1,3}){3})-(?P<len>[0-9]{1,2})(?:&(?P<ip6>[0-9a-f:]+)-(?P<len6>[0-9]{1,3}))?",
    re.ASCII,
)


@dataclass(frozen=True, slots=True)
class Malformed:
    """Why a key or value was not understood (a value, not an exception: watches log and skip it)."""

    reason: str


@dataclass(frozen=True, slots=True)
class SubnetKey:
    """A parsed lease key: ``subnet`` is masked; ``host_bits`` says the key was not the network address."""

    subnet: IPv4Network
    host_bits: bool = False
    dual_stack: bool = False


@dataclass(frozen=True, slots=True)
class LeaseAttrs:
    """The parts of a lease value udpflannel uses; BackendType/BackendData of other backends are ignored."""

    public_ip: IPv4Address
    backend_type: str = ""


def clean_prefix(prefix: str) -> str:
    """``--etcd-prefix`` as Go's ``path.Join`` sees it: duplicate and trailing slashes dropped."""
    if not prefix:
        return ""
    cleaned = posixpath.normpath(prefix)
    return "/" + cleaned.lstrip("/") if cleaned.startswith("/") else cleaned


def config_key(prefix: str) -> str:
    return posixpath.join(clean_prefix(prefix), "config")


def subnets_dir(prefix: str) -> str:
    """The watched/listed key prefix, **with** its trailing slash so that ``subnets_old/`` is excluded."""
    return posixpath.join(clean_prefix(prefix), "subnets") + "/"


def make_subnet_key(prefix: str, subnet: IPv4Network) -> str:
    return f"{subnets_dir(prefix)}{subnet.network_address}-{subnet.prefixlen}"


def parse_subnet_key(prefix: str, key: str | bytes) -> SubnetKey | Malformed:
    """Parse a full etcd key; anything not directly under ``<prefix>/subnets/`` is :class:`Malformed`."""
    if isinstance(key, bytes):
        try:
            key = key.decode()
        except UnicodeDecodeError:
            return Malformed(f"key {key!r} is not UTF-8")
    base = subnets_dir(prefix)
    if not key.startswith(base):
        return Malformed(f"key {key!r} is not under {base}")
    tail = key[len(base):]
    m = _KEY.fullmatch(tail)
    if m is None:
        return Malformed(f"key {key!r} is not of the form A.B.C.D-N")
    plen = int(m["len"])
    if plen > 31:  # Go parses the length as a 5-bit number: -32 is rejected
        return Malformed(f"key {key!r}: prefix length {plen} is not 0-31")
    try:
        ip = IPv4Address(m["ip"])
    except AddressValueError:
        return Malformed(f"key {key!r}: {m['ip']!r} is not an IPv4 address")
    if m["ip6"] is not None:
        try:
            IPv6Address(m["ip6"])
        except ValueError:
            return Malformed(f"key {key!r}: {m['ip6']!r} is not an IPv6 address")
        if int(m["len6"]) > 127:
            return Malformed(f"key {key!r}: IPv6 prefix length {m['len6']} is not 0-127")
    subnet = IPv4Network((ip, plen), strict=False)
    return SubnetKey(subnet, host_bits=subnet.network_address != ip, dual_stack=m["ip6"] is not None)


def encode_lease_value(public_ip: IPv4Address) -> bytes:
    """Exactly what flanneld's UDP backend writes: ``{"PublicIP":"a.b.c.d","PublicIPv6":null}``."""
    return b'{"PublicIP":"%s","PublicIPv6":null}' % str(IPv4Address(public_ip)).encode()


def _folded_object(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    return {k.casefold(): v for k, v in pairs}


def decode_lease_value(value: bytes | str) -> LeaseAttrs | Malformed:
    """Read a lease value as Go's ``json.Unmarshal`` into LeaseAttrs would (case-insensitive keys)."""
    try:
        doc = json.loads(value, object_pairs_hook=_folded_object)
    except (ValueError, UnicodeDecodeError) as e:
        return Malformed(f"value is not JSON: {e}")
    if not isinstance(doc, dict):
        return Malformed("value is not a JSON object")
    raw_ip = doc.get("publicip")
    if raw_ip is None:
        public_ip = IPv4Address(0)  # Go leaves the zero value
    elif not isinstance(raw_ip, str):
        return Malformed(f"PublicIP {json.dumps(raw_ip)} is not a string")
    else:
        try:
            public_ip = IPv4Address(raw_ip)
        except AddressValueError:
            return Malformed(f"PublicIP {raw_ip!r} is not an IPv4 address")
    backend_type = doc.get("backendtype")
    if backend_type is None:
        backend_type = ""
    elif not isinstance(backend_type, str):
        return Malformed(f"BackendType {json.dumps(backend_type)} is not a string")
    return LeaseAttrs(public_ip=public_ip, backend_type=backend_type)
