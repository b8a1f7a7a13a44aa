"""lease.manager with flanneld's security flags: TLS client certificates and username/password."""

from __future__ import annotations

import asyncio
import shutil
import subprocess

import pytest

from lease.manager import EtcdSubnetManager
from lease.options import EtcdOptions
from tests.conftest import require
from tests.lease.conftest import need_etcd
from tests.lease.helpers import NETWORK_CONFIG
from udpflannel.errors import EtcdUnavailable
from udpflannel.lab.etcd import EtcdServer

pytestmark = [pytest.mark.etcd, pytest.mark.timeout(60)]

ME = "192.168.1.10"


def openssl(*args: str, cwd) -> None:
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True, timeout=30)


@pytest.fixture
def certs(tmp_path):
    """A throw-away CA and one certificate for 127.0.0.1, good for both server and client auth."""
    require(shutil.which("openssl") is not None, "needs the openssl command")
    ec = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"]
    openssl("req", "-x509", *ec, "-keyout", "ca.key", "-out", "ca.pem", "-days", "1", "-subj", "/CN=udpflannel test CA", cwd=tmp_path)
    openssl("req", *ec, "-keyout", "node.key", "-out", "node.csr", "-subj", "/CN=127.0.0.1", cwd=tmp_path)
    (tmp_path / "ext.cnf").write_text("subjectAltName=IP:127.0.0.1\nextendedKeyUsage=serverAuth,clientAuth\n")
    openssl("x509", "-req", "-in", "node.csr", "-CA", "ca.pem", "-CAkey", "ca.key", "-CAcreateserial",
            "-out", "node.pem", "-days", "1", "-extfile", "ext.cnf", cwd=tmp_path)
    return {name: str(tmp_path / name) for name in ("ca.pem", "node.pem", "node.key")}


async def test_tls_with_client_certificates(certs):
    need_etcd()
    with EtcdServer(cert_file=certs["node.pem"], key_file=certs["node.key"], ca_file=certs["ca.pem"]) as etcd:
        etcd.ctl("put", "/coreos.com/network/config", NETWORK_CONFIG)
        assert etcd.endpoint.startswith("https://")
        m = EtcdSubnetManager(EtcdOptions(etcd.endpoint, keyfile=certs["node.key"], certfile=certs["node.pem"],
                                      cafile=certs["ca.pem"], timeout=2.0), public_ip=ME)
        try:
            lease = await m.acquire()
            assert etcd.ctl("get", lease.key, "--print-value-only").strip() == '{"PublicIP":"192.168.1.10","PublicIPv6":null}'
        finally:
            await m.close()
        # Without a client certificate the server refuses us: an error, not a hang.
        anonymous = EtcdSubnetManager(EtcdOptions(etcd.endpoint, cafile=certs["ca.pem"], timeout=2.0), public_ip=ME)
        try:
            with pytest.raises(EtcdUnavailable):
                await anonymous.get_config()
        finally:
            await anonymous.close()


async def test_username_and_password_and_an_expired_token():
    need_etcd()
    with EtcdServer(extra_args=("--auth-token-ttl", "1")) as etcd:  # simple tokens die after 1 s unused
        etcd.ctl("put", "/coreos.com/network/config", NETWORK_CONFIG)
        etcd.ctl("user", "add", "root", "--new-user-password=s3cret")
        etcd.ctl("auth", "enable")
        good = EtcdSubnetManager(EtcdOptions(etcd.endpoint, username="root", password="s3cret", timeout=2.0), public_ip=ME)
        bad = EtcdSubnetManager(EtcdOptions(etcd.endpoint, username="root", password="wrong", timeout=2.0), public_ip=ME)
        try:
            lease = await good.acquire()
            assert lease.subnet.prefixlen == 24
            await asyncio.sleep(2.5)  # like the ~23 h between renewals: the token has expired
            assert (await good.get_config()).network == lease.config.network  # logged in again
            with pytest.raises(EtcdUnavailable, match="authentication failed"):
                await bad.get_config()
        finally:
            await good.close()
            await bad.close()
