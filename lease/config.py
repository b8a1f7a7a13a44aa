"""The network config stored at ``<prefix>/config``: parse and validate like flanneld (§2 of the reference).

Pure: bytes in, a frozen :class:`NetworkConfig` out, or a :class:`~lease.errors.ConfigError` naming the
field. Keys are matched case-insensitively and the last of several spellings wins, as Go's
``encoding/json`` does; unknown keys are ignored; ``null`` counts as absent. Beyond flanneld we also
reject ``SubnetMin > SubnetMax``, a ``Backend.Port`` of 0 or out of range, and backends other than udp.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from ipaddress import AddressValueError, IPv4Address, IPv4Network
from typing import Any

from lease.errors import ConfigError

DEFAULT_PORT = 8285
_CIDR = re.compile(r"[0-9]{1,3}(?:\.[0-9]{1,3}){3}/[0-9]{1,2}", re.ASCII)


@dataclass(frozen=True, slots=True)
class NetworkConfig:
    """A validated flannel network config; every default is already filled in."""

    network: IPv4Network
    subnet_len: int
    subnet_min: IPv4Address
    subnet_max: IPv4Address
    backend_type: str = "udp"
    port: int = DEFAULT_PORT
    enable_ipv6: bool = False
    enable_nftables: bool = False

    @property
    def subnet_size(self) -> int:
        return 1 << (32 - self.subnet_len)

    def is_compatible(self, subnet: IPv4Network) -> bool:
        """Could ``subnet`` be leased under this config? (An IPv4Network is aligned by construction.)"""
        return (
            subnet.prefixlen == self.subnet_len
            and self.subnet_min <= subnet.network_address <= self.subnet_max
        )


def _folded_object(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    """A JSON object with case-folded keys; of several spellings the last one wins, as in encoding/json."""
    out: dict[str, Any] = {}
    for k, v in pairs:
        out[k.casefold()] = v
    return out


def _uint(fields: dict[str, Any], key: str, name: str) -> int | None:
    value = fields.get(key.casefold())
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ConfigError(name, f"must be a non-negative JSON integer, got {json.dumps(value)}")
    return value


def _bool(fields: dict[str, Any], key: str, default: bool) -> bool:
    value = fields.get(key.casefold())
    if value is None:
        return default
    if not isinstance(value, bool):
        raise ConfigError(key, f"must be true or false, got {json.dumps(value)}")
    return value


def _ipv4(fields: dict[str, Any], key: str) -> IPv4Address | None:
    """An IPv4 address field; ``None`` when absent or ``0.0.0.0`` (meaning "use the default")."""
    value = fields.get(key.casefold())
    if value is None:
        return None
    if not isinstance(value, str):
        raise ConfigError(key, f"must be an IPv4 address string such as \"10.5.1.0\", got {json.dumps(value)}")
    try:
        addr = IPv4Address(value)
    except AddressValueError:
        raise ConfigError(key, f"invalid IPv4 address format: {value!r}") from None
    return None if int(addr) == 0 else addr


def _network(fields: dict[str, Any]) -> IPv4Network | None:
    value = fields.get("network")
    if value is None:
        return None
    if not isinstance(value, str):
        raise ConfigError("Network", f"must be an IPv4 CIDR string such as \"10.5.0.0/16\", got {json.dumps(value)}")
    if not _CIDR.fullmatch(value):
        raise ConfigError("Network", f"invalid IPv4 CIDR format: {value!r} (expected a.b.c.d/n)")
    try:
        return IPv4Network(value, strict=False)  # host bits are masked, like net.ParseCIDR
    except ValueError:
        raise ConfigError("Network", f"invalid IPv4 CIDR format: {value!r}") from None


def _backend(fields: dict[str, Any]) -> tuple[str, int]:
    if "backend" not in fields:
        return "udp", DEFAULT_PORT  # flanneld's code (not its docs) defaults to udp when Backend is absent
    backend = fields["backend"]
    if backend is None:
        backend = {}  # "Backend": null decodes to no type, as in flanneld
    if not isinstance(backend, dict):
        raise ConfigError("Backend", f"must be a JSON object such as {{\"Type\": \"udp\"}}, got {json.dumps(backend)}")
    btype = backend.get("type")
    if btype is None:
        btype = ""
    if not isinstance(btype, str):
        raise ConfigError("Backend.Type", f"must be a string, got {json.dumps(btype)}")
    btype = btype.lower()
    if btype == "":
        raise ConfigError("Backend.Type", "is missing; set \"Backend\": {\"Type\": \"udp\"} or drop Backend")
    if btype != "udp":
        raise ConfigError("Backend.Type", f"{btype!r} is not supported: udpflannel only implements \"udp\"")
    port = backend.get("port")
    if port is None:
        port = DEFAULT_PORT
    if isinstance(port, bool) or not isinstance(port, int):
        raise ConfigError("Backend.Port", f"must be a JSON integer, got {json.dumps(port)}")
    if not 1 <= port <= 65535:
        raise ConfigError("Backend.Port", f"must be between 1 and 65535, got {port}")
    return btype, port


def parse_network_config(data: bytes | str) -> NetworkConfig:
    """Parse and validate the JSON stored at ``<prefix>/config``: flanneld's checks in flanneld's order,
    one after another (long as that list is)."""
    try:
        doc = json.loads(data, object_pairs_hook=_folded_object)
    except (ValueError, UnicodeDecodeError) as e:
        raise ConfigError("config", f"is not valid JSON: {e}") from None
    if not isinstance(doc, dict):
        raise ConfigError("config", "must be a JSON object such as {\"Network\": \"10.5.0.0/16\"}")
    fields = doc

    if not _bool(fields, "EnableIPv4", True):
        raise ConfigError("EnableIPv4", "the udp backend needs IPv4; set it to true or drop it")
    enable_ipv6 = _bool(fields, "EnableIPv6", False)
    enable_nftables = _bool(fields, "EnableNFTables", False)
    network = _network(fields)
    subnet_len = _uint(fields, "SubnetLen", "SubnetLen") or 0
    subnet_min = _ipv4(fields, "SubnetMin")
    subnet_max = _ipv4(fields, "SubnetMax")
    backend_type, port = _backend(fields)

    if network is None or (int(network.network_address) == 0 and network.prefixlen == 0):
        raise ConfigError("Network", "please define a correct Network parameter in the flannel config")
    if subnet_len > 0:
        if subnet_len > 30:
            raise ConfigError("SubnetLen", f"must be less than /31, got {subnet_len}")
        if subnet_len < network.prefixlen + 2:
            raise ConfigError(
                "SubnetLen",
                f"network must be able to accommodate at least four subnets "
                f"(SubnetLen {subnet_len} < /{network.prefixlen} + 2)",
            )
    elif network.prefixlen > 28:
        raise ConfigError("Network", f"network is too small. Minimum useful network prefix is /28, got {network}")
    elif network.prefixlen <= 22:
        subnet_len = 24
    else:
        subnet_len = network.prefixlen + 2

    size = 1 << (32 - subnet_len)
    base = int(network.network_address)
    if subnet_min is None:
        subnet_min = IPv4Address(base + size)
    elif subnet_min not in network:
        raise ConfigError("SubnetMin", f"{subnet_min} is not in the range of the Network {network}")
    if subnet_max is None:
        subnet_max = IPv4Address(base + network.num_addresses - size)
    elif subnet_max not in network:
        raise ConfigError("SubnetMax", f"{subnet_max} is not in the range of the Network {network}")
    mask = (0xFFFFFFFF << (32 - subnet_len)) & 0xFFFFFFFF
    if int(subnet_min) & mask != int(subnet_min):
        raise ConfigError("SubnetMin", f"is not on a SubnetLen boundary: {subnet_min} (SubnetLen {subnet_len})")
    if int(subnet_max) & mask != int(subnet_max):
        raise ConfigError("SubnetMax", f"is not on a SubnetLen boundary: {subnet_max} (SubnetLen {subnet_len})")
    if subnet_min > subnet_max:
        raise ConfigError("SubnetMin", f"{subnet_min} is above SubnetMax {subnet_max}: no subnet could be leased")

    return NetworkConfig(
        network=network,
        subnet_len=subnet_len,
        subnet_min=subnet_min,
        subnet_max=subnet_max,
        backend_type=backend_type,
        port=port,
        enable_ipv6=enable_ipv6,
        enable_nftables=enable_nftables,
    )
