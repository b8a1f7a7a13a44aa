"""Shared test plumbing: root/CI rules, and a leak check for namespaces and processes."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

from udpflannel.lab.netns import leftover_namespaces

IN_CI = os.environ.get("CI", "").lower() in ("1", "true", "yes")


def require(condition: bool, reason: str) -> None:
    """Skip locally, but fail loudly in CI: nothing may be skipped there for lack of root or a tool."""
    if condition:
        return
    if IN_CI:
        pytest.fail(f"CI must provide this: {reason}")
    pytest.skip(reason)


def require_compiled_kernels() -> None:
    """The compiled (C) GSO/GRO kernels, loaded: required in CI, skipped elsewhere where they were not
    built, and skipped where ``UDPFLANNEL_JIT=0`` asks for the numpy kernels (the suite's second run)."""
    from tun import kernels

    if os.environ.get(kernels.ENV) == "0":
        pytest.skip(f"{kernels.ENV}=0: this run is for the numpy kernels")
    require(kernels.load() is not None, f"the compiled GSO/GRO kernels: {kernels.why_not}")


def require_lone_pass() -> None:
    """The C pass (udpflannel/_lone.c), loaded: as :func:`require_compiled_kernels`."""
    from udpflannel import lone

    if os.environ.get(lone.ENV) == "0":
        pytest.skip(f"{lone.ENV}=0: this run is for the Python passes")
    require(lone.why_not == "", f"the C pass: {lone.why_not}")


def pytest_sessionstart(session) -> None:
    """Run tun's GSO/GRO kernels once (gso.warm_up) before any test: a broken build fails here, first."""
    from tun import gso

    gso.warm_up()


def check_lab_tools() -> None:
    require(os.geteuid() == 0, "needs root (network namespaces, TUN devices)")
    for tool in ("ip", "ping"):
        require(shutil.which(tool) is not None, f"needs `{tool}` (./dev setup installs it)")
    require(os.path.exists("/dev/net/tun"), "needs /dev/net/tun")


@pytest.fixture
def root_lab_tools() -> None:
    check_lab_tools()


@pytest.fixture
def lab(root_lab_tools):
    """A fresh namespace lab, always torn down; the test fails if it leaked a namespace."""
    from udpflannel.lab.netns import Lab

    with Lab() as lab:
        yield lab
    leaked = leftover_namespaces(lab.tag)
    assert not leaked, f"namespaces left behind: {leaked}"


@pytest.fixture(scope="session")
def flannel_binaries(tmp_path_factory) -> tuple[Path, Path]:
    """(flanneld, flannel's CNI plugin), unpacked for this test run from ../shared/bin (or $FLANNELD and
    $FLANNEL_CNI). Elsewhere the interop tests skip without them; CI must have them."""
    from udpflannel.lab.flanneld import BinaryNotFound, find_flannel_cni, find_flanneld

    directory = tmp_path_factory.mktemp("flannel-bin")
    try:
        return find_flanneld(directory), find_flannel_cni(directory)
    except BinaryNotFound as exc:
        require(False, str(exc))
        raise
