"""The code under test: a copy of the dataplane's packages (from a git revision or the working tree) that
the rows run, with a digest the report names, and the flags it offers."""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

from benchmarks.topology import DataplaneError

CODE_PACKAGES = ("udpflannel", "tun", "lease")


def snapshot_code(repo: Path, dest: Path, rev: str | None = None) -> dict:
    """Copy the dataplane's packages to ``dest`` (from git ``rev``, or the working tree as it is now).

    Returns where the code came from and a digest of its ``.py`` files, so the report says what ran.
    """
    dest.mkdir(parents=True, exist_ok=True)
    head = subprocess.run(["git", "-C", str(repo), "rev-parse", "--short", rev or "HEAD"], capture_output=True,
                          text=True, timeout=10)
    if rev is not None:
        if head.returncode != 0:
            raise DataplaneError(f"--code {rev}: not a git revision ({head.stderr.strip()})")
        archive = subprocess.run(["git", "-C", str(repo), "archive", "--format=tar", rev, *CODE_PACKAGES],
                                 capture_output=True, timeout=30, check=True).stdout
        subprocess.run(["tar", "-x", "-C", str(dest)], input=archive, timeout=30, check=True)
        source = f"commit {head.stdout.strip()}"
    else:
        for package in CODE_PACKAGES:
            shutil.copytree(repo / package, dest / package, ignore=shutil.ignore_patterns("__pycache__"),
                            dirs_exist_ok=True)
        dirty = subprocess.run(["git", "-C", str(repo), "status", "--porcelain", "--", *CODE_PACKAGES],
                               capture_output=True, text=True, timeout=10).stdout.strip()
        source = f"working tree at {head.stdout.strip() or '?'}" + (" with uncommitted changes" if dirty else "")
    digest = hashlib.sha256()
    for path in sorted([*dest.rglob("*.py"), *dest.rglob("*.c")]):
        digest.update(str(path.relative_to(dest)).encode() + b"\0" + path.read_bytes())
    return {"source": source, "sha256": digest.hexdigest()[:12], "path": str(dest), "kernels": build_kernels(dest)}


def build_kernels(dest: Path) -> str:
    """Build the snapshot's C kernels (``tun/_gso_c.c``) next to its sources, as an install would: the
    rows then run the C of that revision, not a stale build copied with the working tree. Returns what
    the rows will run: "C" or "numpy (why)"."""
    source = dest / "tun" / "_gso_c.c"
    for old in (dest / "tun").glob("_gso_c*.so"):
        old.unlink()
    if not source.exists():
        return "no C kernels in this revision"
    build = ("from setuptools import Extension, setup; setup(script_args=['-q', 'build_ext', '--inplace', "
             "'--build-temp', 'build'], ext_modules=[Extension('tun._gso_c', ['tun/_gso_c.c'], extra_compile_args=['-O3'])])")
    proc = subprocess.run([sys.executable, "-c", build], cwd=dest, capture_output=True, text=True, timeout=120)
    shutil.rmtree(dest / "build", ignore_errors=True)
    if proc.returncode != 0 or not list((dest / "tun").glob("_gso_c*.so")):
        return f"numpy (the C kernels did not build: {(proc.stderr or proc.stdout).strip()[-300:]})"
    return "C"


def static_flags(code: Path | None) -> frozenset[str]:
    """The long options ``udpflannel static --help`` lists (to find optional features such as --no-fast-path)."""
    env = {**os.environ, **({"PYTHONPATH": str(code)} if code else {})}
    proc = subprocess.run([sys.executable, "-m", "udpflannel", "static", "--help"], capture_output=True, text=True,
                          timeout=30, env=env, cwd=str(code) if code else None)
    return frozenset(re.findall(r"(--[a-z][a-z0-9-]+)", proc.stdout))
