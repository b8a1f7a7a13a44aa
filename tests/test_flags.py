"""flanneld's command line: Go-style spellings, FLANNELD_* environment, and refusals naming the flag."""

from __future__ import annotations

import pytest

from udpflannel.errors import ConfigError
from udpflannel.flags import etcd_options, parse_daemon_args


def test_defaults_match_flanneld():
    args = parse_daemon_args([], environ={})
    assert args.etcd_endpoints == ["http://127.0.0.1:4001", "http://127.0.0.1:2379"]
    assert etcd_options(args).endpoints == ["http://127.0.0.1:4001", "http://127.0.0.1:2379"]
    assert (etcd_options(args).keyfile, etcd_options(args).username) == (None, None)  # empty: not given
    assert args.etcd_prefix == "/coreos.com/network"
    assert args.subnet_file == "/run/flannel/subnet.env"
    assert args.subnet_lease_renew_margin == 60
    assert (args.ip_masq, args.healthz_ip, args.healthz_port) == (False, "0.0.0.0", 0)
    assert args.iface == [] and args.iface_regex == []


def test_go_style_spellings():
    args = parse_daemon_args(
        ["-etcd-endpoints=http://10.0.0.1:2379,http://10.0.0.2:2379", "-iface", "eth0", "--iface=10.1.2.3",
         "--ip-masq", "-v=2", "--subnet-lease-renew-margin=30", "-release-lease-on-exit=true"],
        environ={},
    )
    assert args.etcd_endpoints == ["http://10.0.0.1:2379", "http://10.0.0.2:2379"]
    assert args.iface == ["eth0", "10.1.2.3"]
    assert args.ip_masq is True and args.verbosity == 2 and args.subnet_lease_renew_margin == 30
    assert args.release_lease_on_exit is True
    assert parse_daemon_args(["--ip-masq=false"], environ={}).ip_masq is False


def test_environment_fills_only_flags_not_given():
    env = {"FLANNELD_ETCD_PREFIX": "/my/net", "FLANNELD_IFACE": "ens3", "FLANNELD_IP_MASQ": "true",
           "FLANNELD_SUBNET_FILE": "/tmp/x.env", "FLANNELD_HEALTHZ_PORT": "8471"}
    args = parse_daemon_args(["--subnet-file=/run/cmdline.env"], environ=env)
    assert args.etcd_prefix == "/my/net"
    assert args.iface == ["ens3"]
    assert args.ip_masq is True
    assert args.healthz_port == 8471
    assert args.subnet_file == "/run/cmdline.env"  # the command line wins


@pytest.mark.parametrize(("argv", "field"), [
    (["--subnet-lease-renew-margin=0"], "--subnet-lease-renew-margin"),
    (["--subnet-lease-renew-margin=1440"], "--subnet-lease-renew-margin"),
    (["--healthz-port=70000"], "--healthz-port"),
    (["--etcd-endpoints=,"], "--etcd-endpoints"),
    (["--etcd-keyfile=/k.pem"], "--etcd-keyfile"),
    (["--control-socket=/" + "x" * 120], "--control-socket"),
    (["--iptables-resync=0"], "--iptables-resync"),
])
def test_bad_values_are_refused_naming_the_flag(argv, field):
    with pytest.raises(ConfigError) as err:
        parse_daemon_args(argv, environ={})
    assert err.value.field == field


def test_bad_boolean_is_a_usage_error():
    with pytest.raises(SystemExit):
        parse_daemon_args(["--ip-masq=maybe"], environ={})


def test_ip_blackhole_route_flag_spellings_and_environment():
    assert parse_daemon_args([], environ={}).ip_blackhole_route is False
    assert parse_daemon_args(["-ip-blackhole-route"], environ={}).ip_blackhole_route is True
    assert parse_daemon_args(["--ip-blackhole-route=false"], environ={}).ip_blackhole_route is False
    assert parse_daemon_args([], environ={"FLANNELD_IP_BLACKHOLE_ROUTE": "true"}).ip_blackhole_route is True
    assert parse_daemon_args(["--ip-blackhole-route=false"],
                             environ={"FLANNELD_IP_BLACKHOLE_ROUTE": "true"}).ip_blackhole_route is False


def test_a_long_control_socket_path_with_a_short_file_name_is_accepted():
    path = "/" + "d" * 150 + "/udpflannel.sock"
    assert parse_daemon_args([f"--control-socket={path}"], environ={}).control_socket == path
