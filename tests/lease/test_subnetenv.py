"""lease.subnetenv: flanneld's exact text, atomic 0644 writes, and reading the previous subnet back."""

from __future__ import annotations

import os
import stat
from ipaddress import IPv4Network, IPv6Network

import pytest

from lease.subnetenv import format_subnet_env, read_previous_subnet, write_subnet_env

GOLDEN = "FLANNEL_NETWORK=10.5.0.0/16\nFLANNEL_SUBNET=10.5.35.1/24\nFLANNEL_MTU=1472\nFLANNEL_IPMASQ=false\n"
GOLDEN_DUAL = (
    "FLANNEL_NETWORK=10.5.0.0/16\nFLANNEL_SUBNET=10.5.35.1/24\nFLANNEL_IPV6_NETWORK=fc00::/48\n"
    "FLANNEL_IPV6_SUBNET=fc00:0:0:1::1/64\nFLANNEL_MTU=1472\nFLANNEL_IPMASQ=true\n"
)


def test_format_is_flanneld_byte_for_byte():
    text = format_subnet_env(network=IPv4Network("10.5.0.0/16"), subnet=IPv4Network("10.5.35.0/24"), mtu=1472, ip_masq=False)
    assert text == GOLDEN


def test_dual_stack_format():
    text = format_subnet_env(
        network=IPv4Network("10.5.0.0/16"), subnet=IPv4Network("10.5.35.0/24"), mtu=1472, ip_masq=True,
        ipv6_network=IPv6Network("fc00::/48"), ipv6_subnet=IPv6Network("fc00:0:0:1::/64"),
    )
    assert text == GOLDEN_DUAL


def test_write_creates_dirs_mode_0644_despite_umask(tmp_path):
    path = tmp_path / "run" / "flannel" / "subnet.env"
    old = os.umask(0o077)
    try:
        write_subnet_env(path, GOLDEN)
    finally:
        os.umask(old)
    assert path.read_text() == GOLDEN
    assert stat.S_IMODE(path.stat().st_mode) == 0o644
    assert sorted(os.listdir(path.parent)) == ["subnet.env"]  # no temporary file left


def test_rewrite_is_a_rename_and_keeps_existing_mode(tmp_path):
    path = tmp_path / "subnet.env"
    write_subnet_env(path, "old\n")
    os.chmod(path, 0o600)
    inode = path.stat().st_ino
    write_subnet_env(path, GOLDEN)
    assert path.read_text() == GOLDEN
    assert path.stat().st_ino != inode  # replaced, never written in place
    assert stat.S_IMODE(path.stat().st_mode) == 0o600


def test_failed_write_leaves_old_file_and_no_temporary(tmp_path, monkeypatch):
    path = tmp_path / "subnet.env"
    write_subnet_env(path, GOLDEN)

    def boom(fd):
        raise OSError(5, "EIO")

    monkeypatch.setattr(os, "fsync", boom)
    with pytest.raises(OSError):
        write_subnet_env(path, "new\n")
    assert path.read_text() == GOLDEN
    assert os.listdir(tmp_path) == ["subnet.env"]


def test_previous_subnet_round_trip(tmp_path):
    path = tmp_path / "subnet.env"
    write_subnet_env(path, GOLDEN)
    assert read_previous_subnet(path) == IPv4Network("10.5.35.0/24")  # host bits masked, like ParseCIDR


@pytest.mark.parametrize(
    "text,expected",
    [
        ('# c\nexport FLANNEL_SUBNET="10.5.7.1/24"\n', "10.5.7.0/24"),
        ("FLANNEL_SUBNET=10.5.7.1/24 # comment\n", "10.5.7.0/24"),
        ("FLANNEL_SUBNET=10.5.7.1/24,10.5.8.1/24\n", None),  # exactly one entry is required
        ("FLANNEL_SUBNET=fc00::1/64\n", None),
        ("FLANNEL_SUBNET=garbage\n", None),
        ("FLANNEL_NETWORK=10.5.0.0/16\n", None),
        ("", None),
    ],
)
def test_previous_subnet_parsing(tmp_path, text, expected):
    path = tmp_path / "subnet.env"
    path.write_text(text)
    assert read_previous_subnet(path) == (IPv4Network(expected) if expected else None)


def test_missing_file_has_no_previous_subnet(tmp_path):
    assert read_previous_subnet(tmp_path / "nope.env") is None
