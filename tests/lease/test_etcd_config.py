"""lease.etcd: flanneld-style endpoints and the TLS/auth flag rules (no server needed)."""

from __future__ import annotations

import pytest

from lease.channel import Endpoint, parse_endpoints
from lease.etcd import Backoff, EtcdSession
from lease.options import EtcdOptions
from udpflannel.errors import ConfigError


def test_flanneld_default_endpoints_and_forms():
    assert parse_endpoints("http://127.0.0.1:4001,http://127.0.0.1:2379") == (
        Endpoint("127.0.0.1", 4001, False), Endpoint("127.0.0.1", 2379, False),
    )
    assert parse_endpoints(["https://etcd.example:2379", "10.0.0.1", "http://[fd00::1]:2379/"]) == (
        Endpoint("etcd.example", 2379, True), Endpoint("10.0.0.1", 2379, False), Endpoint("fd00::1", 2379, False),
    )
    assert str(Endpoint("fd00::1", 2379, True)) == "https://[fd00::1]:2379"


@pytest.mark.parametrize("value", ["", " , ", "unix:///run/etcd.sock", "http://:2379", "http://h:99999"])
def test_bad_endpoints(value):
    with pytest.raises(ConfigError) as info:
        parse_endpoints(value)
    assert info.value.field == "etcd-endpoints"


def test_key_and_cert_go_together(tmp_path):
    key = tmp_path / "k.pem"
    key.write_text("x")
    with pytest.raises(ConfigError) as info:
        EtcdSession(EtcdOptions("https://127.0.0.1:2379", keyfile=str(key)))
    assert info.value.field == "etcd-certfile"


def test_unreadable_tls_file_names_its_flag(tmp_path):
    with pytest.raises(ConfigError) as info:
        EtcdSession(EtcdOptions("https://127.0.0.1:2379", cafile=str(tmp_path / "missing-ca.pem")))
    assert info.value.field == "etcd-cafile"


def test_username_and_password_go_together():
    with pytest.raises(ConfigError) as info:
        EtcdSession(EtcdOptions("http://127.0.0.1:2379", username="flannel"))
    assert info.value.field == "etcd-password"


def test_backoff_100ms_doubling_to_5s_and_reset():
    b = Backoff()
    assert [b.next() for _ in range(9)] == [0.1, 0.2, 0.4, 0.8, 1.6, 3.2, 5.0, 5.0, 5.0]
    b.reset()
    assert b.next() == 0.1
