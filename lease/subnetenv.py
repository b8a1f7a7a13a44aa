"""subnet.env (§6): the file CNI plugins read, and where a restart finds its previous subnet.

:func:`format_subnet_env` is pure; :func:`write_subnet_env` writes it atomically (temporary file in the
same directory, fsync, rename, then fsync of the directory) with mode 0644 regardless of the umask, or
the existing file's mode. :func:`read_previous_subnet` reads ``FLANNEL_SUBNET`` back as flanneld does.
"""

from __future__ import annotations

import logging
import os
import secrets
from ipaddress import IPv4Interface, IPv4Network, IPv6Network

log = logging.getLogger(__name__)

DEFAULT_SUBNET_FILE = "/run/flannel/subnet.env"  # flanneld's --subnet-file, and the CNI plugin's subnetFile


def format_subnet_env(
    *,
    network: IPv4Network,
    subnet: IPv4Network,
    mtu: int,
    ip_masq: bool,
    ipv6_network: IPv6Network | None = None,
    ipv6_subnet: IPv6Network | None = None,
) -> str:
    """The file's text: the subnet is written as its first host address with the lease's length."""
    lines = [
        f"FLANNEL_NETWORK={network}",
        f"FLANNEL_SUBNET={subnet.network_address + 1}/{subnet.prefixlen}",
    ]
    if ipv6_network is not None and ipv6_subnet is not None:
        lines.append(f"FLANNEL_IPV6_NETWORK={ipv6_network}")
        lines.append(f"FLANNEL_IPV6_SUBNET={ipv6_subnet.network_address + 1}/{ipv6_subnet.prefixlen}")
    lines.append(f"FLANNEL_MTU={mtu}")
    lines.append(f"FLANNEL_IPMASQ={'true' if ip_masq else 'false'}")
    return "".join(line + "\n" for line in lines)


def write_subnet_env(path: str | os.PathLike[str], text: str) -> None:
    """Atomically replace ``path`` with ``text`` (creating parent directories with mode 0755)."""
    path = os.fspath(path)
    directory = os.path.dirname(path) or "."
    os.makedirs(directory, mode=0o755, exist_ok=True)
    try:
        mode = os.stat(path).st_mode & 0o7777
    except FileNotFoundError:
        mode = 0o644
    tmp = os.path.join(directory, f".{os.path.basename(path)}{secrets.token_hex(6)}")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
    try:
        try:
            os.fchmod(fd, mode)  # not subject to the umask
            os.write(fd, text.encode())
            os.fsync(fd)
        finally:
            os.close(fd)
        os.rename(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise
    dfd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(dfd)
    finally:
        os.close(dfd)


def parse_env(text: str) -> dict[str, str]:
    """The subset of dotenv syntax flanneld's reader accepts in practice (comments, ``export``, quotes)."""
    values = {}
    for raw in text.splitlines():
        line = raw.strip()
        if not line or line.startswith("#") or "=" not in line:
            continue
        key, _, value = line.partition("=")
        key = key.strip()
        if key.startswith("export "):
            key = key[len("export "):].strip()
        value = value.strip()
        if len(value) >= 2 and value[0] == value[-1] and value[0] in "'\"":
            value = value[1:-1]
        elif " #" in value:
            value = value.split(" #", 1)[0].rstrip()
        values[key] = value
    return values


def previous_subnet_from_text(text: str) -> IPv4Network | None:
    """``FLANNEL_SUBNET`` with host bits masked; ``None`` unless it holds exactly one IPv4 CIDR."""
    value = parse_env(text).get("FLANNEL_SUBNET", "")
    parts = [p.strip() for p in value.split(",")] if value else []
    if len(parts) != 1 or "/" not in parts[0]:
        return None
    try:
        return IPv4Interface(parts[0]).network
    except ValueError:
        return None


def read_previous_subnet(path: str | os.PathLike[str]) -> IPv4Network | None:
    """The subnet a previous run leased, or ``None`` (missing or unreadable file, no usable entry)."""
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    except FileNotFoundError:
        return None
    except (OSError, UnicodeDecodeError) as e:
        log.warning("cannot read previous subnet from %s: %s", path, e)
        return None
    subnet = previous_subnet_from_text(text)
    if subnet is None:
        log.warning("%s has no single IPv4 FLANNEL_SUBNET; ignoring it", path)
    return subnet

