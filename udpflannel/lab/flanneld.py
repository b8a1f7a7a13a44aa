"""flannel's own daemon and CNI plugin in the lab: where the binaries come from.

The interop tests and the benchmark run a real ``flanneld`` (and flannel's CNI plugin) beside
udpflannel. They are looked up in this order:

1. the path in the environment variable ``FLANNELD`` (``FLANNEL_CNI`` for the plugin), so anyone
   can test against their own build;
2. ``../shared/bin/<name>-*-linux-<arch>.gz`` beside this checkout (built from flannel's tagged
   sources; see that folder's README), checked against its ``SHA256SUMS`` and unpacked into a
   directory of the caller's (a test run's temporary directory: the binary is never committed).

What is not found raises :class:`BinaryNotFound`, whose message says what was looked for.
"""

from __future__ import annotations

import gzip
import hashlib
import os
import platform
import shutil
from pathlib import Path

SHARED_BIN = Path(__file__).resolve().parents[2].parent / "shared" / "bin"
_GO_ARCH = {"x86_64": "amd64", "aarch64": "arm64", "armv7l": "arm", "ppc64le": "ppc64le", "s390x": "s390x"}


class BinaryNotFound(LookupError):
    """Neither the environment variable nor ``shared/bin`` gave a usable binary."""


def find_flanneld(unpack_into: Path) -> Path:
    """flanneld: ``$FLANNELD``, else ``shared/bin/flanneld-*.gz`` unpacked into ``unpack_into``."""
    return _find("flanneld", "FLANNELD", "flanneld", unpack_into)


def find_flannel_cni(unpack_into: Path) -> Path:
    """flannel's CNI meta-plugin (type ``flannel``): ``$FLANNEL_CNI``, else ``shared/bin/flannel-cni-*.gz``.
    Unpacked as ``flannel`` (the name a CNI runtime looks for) into ``unpack_into``."""
    return _find("flannel-cni", "FLANNEL_CNI", "flannel", unpack_into)


def _find(stem: str, variable: str, name: str, unpack_into: Path) -> Path:
    given = os.environ.get(variable)
    if given:
        path = Path(given)
        if not os.access(path, os.X_OK):
            raise BinaryNotFound(f"${variable}={given} is not an executable file")
        return path
    arch = _GO_ARCH.get(platform.machine(), platform.machine())
    packed = sorted(SHARED_BIN.glob(f"{stem}-v*-linux-{arch}.gz"))
    if not packed:
        raise BinaryNotFound(f"no {stem} binary: set ${variable}, or put {stem}-vX.Y.Z-linux-{arch}.gz "
                             f"in {SHARED_BIN}")
    source = packed[-1]
    _check_sum(source)
    target = Path(unpack_into) / name
    target.parent.mkdir(parents=True, exist_ok=True)
    with gzip.open(source) as packed_file, open(target, "wb") as out:
        shutil.copyfileobj(packed_file, out)
    target.chmod(0o755)
    return target


def _check_sum(path: Path) -> None:
    """Compare with the folder's SHA256SUMS when it lists the file (a truncated copy fails loudly)."""
    sums = path.parent / "SHA256SUMS"
    if not sums.exists():
        return
    for line in sums.read_text().splitlines():
        digest, _, listed = line.partition("  ")
        if listed.strip().lstrip("*") == path.name:
            actual = hashlib.sha256(path.read_bytes()).hexdigest()
            if actual != digest.strip():
                raise BinaryNotFound(f"{path} does not match SHA256SUMS ({actual} != {digest.strip()})")
            return
