"""flanneld's command line, for udpflannel's daemon mode (reference §9.2).

Accepted the way Go's ``flag`` package accepts them: ``--name value``, ``--name=value``, ``-name value``,
``-name=value``; booleans also as ``--ip-masq=true|false``. A flag not given on the command line is
read from ``FLANNELD_<NAME>`` (upper case, ``-`` → ``_``), as flanneld does.
"""

from __future__ import annotations

import argparse
import os
from ipaddress import IPv4Address
from typing import TYPE_CHECKING

from lease.options import DEFAULT_ENDPOINTS, DEFAULT_PREFIX, EtcdOptions
from lease.subnetenv import DEFAULT_SUBNET_FILE
from udpflannel import __version__, ctlsocket
from udpflannel.errors import ConfigError

if TYPE_CHECKING:
    from lease.protocol import SubnetManager

DEFAULT_CONTROL_SOCKET = "/run/flannel/udpflannel.sock"


def go_bool(value: str) -> bool:
    lowered = value.lower()
    if lowered in ("1", "t", "true"):
        return True
    if lowered in ("0", "f", "false"):
        return False
    raise argparse.ArgumentTypeError(f"invalid boolean {value!r} (use true or false)")


def daemon_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="udpflannel",
        description="flanneld's UDP backend in Python: lease a subnet in etcd, route pod traffic through flannel0.",
        epilog="Every flag can also be set as FLANNELD_<FLAG> in the environment (e.g. FLANNELD_ETCD_ENDPOINTS). "
        "Subcommands: 'udpflannel static --help', 'udpflannel status', 'udpflannel demo'.",
    )
    etcd = p.add_argument_group("etcd")
    etcd.add_argument("--etcd-endpoints", default=",".join(DEFAULT_ENDPOINTS), help="a comma-delimited list of etcd endpoints (default %(default)s)")
    etcd.add_argument("--etcd-prefix", default=DEFAULT_PREFIX, help="etcd prefix (default %(default)s)")
    etcd.add_argument("--etcd-keyfile", default="", help="SSL key file used to secure etcd communication")
    etcd.add_argument("--etcd-certfile", default="", help="SSL certification file used to secure etcd communication")
    etcd.add_argument("--etcd-cafile", default="", help="SSL Certificate Authority file used to secure etcd communication")
    etcd.add_argument("--etcd-username", default="", help="username for BasicAuth to etcd")
    etcd.add_argument("--etcd-password", default="", help="password for BasicAuth to etcd")
    net = p.add_argument_group("interface")
    net.add_argument("--iface", action="append", default=[], help="interface to use (IP or name) for inter-host communication; repeatable")
    net.add_argument("--iface-regex", action="append", default=[], help="regex of the interface IP or name to use; repeatable")
    net.add_argument("--iface-can-reach", default="", help="detect the interface by the route to this IP")
    net.add_argument("--public-ip", default="", help="IP accessible by other nodes for inter-host communication")
    node = p.add_argument_group("node")
    node.add_argument("--subnet-file", default=DEFAULT_SUBNET_FILE, help="filename where env variables are written (default %(default)s)")
    node.add_argument("--subnet-lease-renew-margin", type=int, default=60, help="minutes before expiry to renew the lease, 1-1439 (default %(default)s)")
    node.add_argument("--ip-masq", type=go_bool, nargs="?", const=True, default=False,
                      help="set up IP masquerade rules for traffic leaving the flannel network")
    node.add_argument("--ip-masq-fully-random-disable", type=go_bool, nargs="?", const=True, default=False,
                      help="don't add --random-fully to the MASQUERADE rules")
    node.add_argument("--iptables-resync", type=int, default=5, help="seconds between checks of the iptables or nftables rules and the blackhole route (default %(default)s)")
    node.add_argument("--iptables-forward-rules", type=go_bool, nargs="?", const=True, default=True,
                      help="add FORWARD accept rules for the network (default %(default)s)")
    node.add_argument("--ip-blackhole-route", type=go_bool, nargs="?", const=True, default=False,
                      help="add a blackhole route for the node's own subnet, checked every --iptables-resync seconds")
    node.add_argument("--healthz-ip", default="0.0.0.0", help="the IP address for the healthz server to listen on (default %(default)s)")
    node.add_argument("--healthz-port", type=int, default=0, help="the port for the healthz server; 0 disables it (default %(default)s)")
    node.add_argument("-v", "--v", dest="verbosity", type=int, default=0, help="log level: 1 more, 2 debug")
    node.add_argument("--version", action="version", version=__version__)
    ours = p.add_argument_group("udpflannel")
    ours.add_argument("--release-lease-on-exit", type=go_bool, nargs="?", const=True, default=False,
                      help="delete the lease on SIGTERM (flanneld keeps it for a restart to reuse; so do we by default)")
    ours.add_argument("--control-socket", default=DEFAULT_CONTROL_SOCKET, help="unix socket 'udpflannel status' reads (default %(default)s)")
    return p


def normalize_go_flags(argv: list[str], parser: argparse.ArgumentParser) -> list[str]:
    """``-etcd-endpoints=x`` → ``--etcd-endpoints=x``; ``-v=2`` → ``-v 2``."""
    long_names = {opt for action in parser._actions for opt in action.option_strings if opt.startswith("--")}
    out = []
    for arg in argv:
        name = arg.split("=", 1)[0]
        if arg.startswith("-v=") :
            out += ["-v", arg[3:]]
        elif name.startswith("-") and not name.startswith("--") and "-" + name in long_names:
            out.append("-" + arg)
        else:
            out.append(arg)
    return out


def env_defaults(argv: list[str], parser: argparse.ArgumentParser, environ: dict[str, str] | None = None) -> list[str]:
    """Prepend ``--flag=value`` for every ``FLANNELD_FLAG`` whose flag is not on the command line."""
    environ = os.environ if environ is None else environ
    given = {arg.split("=", 1)[0] for arg in argv if arg.startswith("--")}
    extra = []
    for action in parser._actions:
        longs = [opt for opt in action.option_strings if opt.startswith("--") and len(opt) > 3]
        if not longs or longs[0] in ("--help", "--version"):
            continue
        flag = longs[0]
        value = environ.get("FLANNELD_" + flag[2:].upper().replace("-", "_").replace(".", "_"))
        if value is not None and flag not in given:
            extra.append(f"{flag}={value}")
    return extra + argv


def parse_daemon_args(argv: list[str], environ: dict[str, str] | None = None,
                      parser: argparse.ArgumentParser | None = None) -> argparse.Namespace:
    parser = parser or daemon_parser()
    argv = normalize_go_flags(argv, parser)
    args = parser.parse_args(env_defaults(argv, parser, environ))
    if not 1 <= args.subnet_lease_renew_margin <= 1439:
        raise ConfigError("--subnet-lease-renew-margin", f"{args.subnet_lease_renew_margin} is outside 1-1439 minutes")
    if len(os.fsencode(os.path.basename(args.control_socket))) > ctlsocket.NAME_MAX:
        raise ConfigError("--control-socket", f"the file name of {args.control_socket!r} is longer than "
                                              f"{ctlsocket.NAME_MAX} bytes (a unix socket address is short)")
    if args.iptables_resync < 1:
        raise ConfigError("--iptables-resync", f"{args.iptables_resync} must be at least 1 second")
    if not 0 <= args.healthz_port <= 65535:
        raise ConfigError("--healthz-port", f"{args.healthz_port} is not a TCP port")
    args.etcd_endpoints = [e.strip() for e in args.etcd_endpoints.split(",") if e.strip()]
    if not args.etcd_endpoints:
        raise ConfigError("--etcd-endpoints", "no endpoint given")
    if bool(args.etcd_keyfile) != bool(args.etcd_certfile):
        raise ConfigError("--etcd-keyfile", "TLS needs both --etcd-keyfile and --etcd-certfile")
    return args


def etcd_options(args: argparse.Namespace) -> EtcdOptions:
    """The ``--etcd-*`` flags as the lease manager takes them (an empty flag is not given)."""
    return EtcdOptions(endpoints=args.etcd_endpoints, keyfile=args.etcd_keyfile or None,
                       certfile=args.etcd_certfile or None, cafile=args.etcd_cafile or None,
                       username=args.etcd_username or None, password=args.etcd_password or None)


def etcd_subnet_manager(args: argparse.Namespace, public_ip: IPv4Address) -> SubnetManager:
    """The daemon's subnet manager from its flags: flanneld's, on etcd (loaded now, not at import)."""
    from lease.manager import EtcdSubnetManager
    from lease.subnetenv import read_previous_subnet

    return EtcdSubnetManager(etcd_options(args), args.etcd_prefix, public_ip=public_ip,
                             previous_subnet=read_previous_subnet(args.subnet_file),
                             renew_margin=args.subnet_lease_renew_margin)
