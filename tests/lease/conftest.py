"""Fixtures for lease tests: a real etcd on 127.0.0.1 (loopback only, nothing else is touched).

One etcd serves the whole session (each test gets its own key prefix); tests that stop, pause or
compact etcd take ``fresh_etcd``, a server of their own. Without an etcd binary the tests are skipped
locally and fail in CI (``CI=true``).
"""

from __future__ import annotations

import uuid

import aetcd
import pytest

from lease.manager import EtcdSubnetManager
from lease.options import EtcdOptions
from tests.conftest import require
from udpflannel.errors import SetupError
from udpflannel.lab.etcd import EtcdServer, find_binary


def need_etcd() -> None:
    try:
        find_binary("etcd")
        find_binary("etcdctl")
    except SetupError as e:
        require(False, str(e))


@pytest.fixture(scope="session")
def etcd_server():
    need_etcd()
    with EtcdServer() as server:
        yield server


@pytest.fixture
def fresh_etcd():
    need_etcd()
    with EtcdServer() as server:
        yield server


@pytest.fixture
def prefix() -> str:
    return f"/udpflannel-test-{uuid.uuid4().hex[:8]}/network"


@pytest.fixture
def etcd(etcd_server):
    """The server a test talks to; tests that need their own override this by using fresh_etcd."""
    return etcd_server


@pytest.fixture
async def kv(etcd):
    """A plain aetcd client for the test's own reads and raw writes (as flanneld or an operator would)."""
    client = aetcd.Client(host=etcd.host, port=etcd.port, timeout=5)
    await client.connect()
    yield client
    await client.close()


@pytest.fixture
async def managers(etcd, prefix):
    """A factory of SubnetManagers on ``etcd`` and ``prefix``; all are closed after the test."""
    made: list[EtcdSubnetManager] = []

    def make(public_ip: str = "192.168.1.10", **kwargs) -> EtcdSubnetManager:
        options = EtcdOptions(kwargs.pop("endpoints", etcd.endpoint), timeout=kwargs.pop("request_timeout", 2.0))
        m = EtcdSubnetManager(options, prefix, public_ip=public_ip, **kwargs)
        made.append(m)
        return m

    yield make
    for m in made:
        await m.close()
