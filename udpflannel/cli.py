"""Command line: ``udpflannel [flanneld flags]`` runs the daemon; subcommands do the rest.

    udpflannel static ...   the dataplane with routes from the command line (no etcd)
    udpflannel demo         a local multi-node cluster in network namespaces on an embedded etcd
    udpflannel status       what a running daemon holds: lease, peers, counters
    udpflannel trace        packets crossing a running daemon, step by step (and a pcap)

Errors map to exit codes by class (``exit_code`` of each family in ``udpflannel.errors.FAMILIES``): 2 for bad configuration, 1 for
set-up failures, 0 after a clean stop on SIGTERM/SIGINT.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import sys
from typing import NoReturn

import uvloop

from udpflannel import __version__
from udpflannel.engine import DEFAULT_BUDGET
from udpflannel.errors import FAMILIES
from udpflannel.features import OFFLOADS

log = logging.getLogger("udpflannel")


def setup_logging(verbosity: int, trace: bool = False) -> None:
    level = logging.DEBUG if verbosity >= 2 or trace else logging.INFO
    logging.basicConfig(level=level, format="%(asctime)s %(levelname).1s %(name)s: %(message)s", stream=sys.stderr)
    if not trace:
        logging.getLogger("udpflannel.trace").setLevel(logging.INFO)


def add_dataplane_flags(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("dataplane")
    group.add_argument("--budget", type=int, default=DEFAULT_BUDGET, help="packets drained per fd wake-up (default %(default)s)")
    group.add_argument(
        "--accept-any-inner-source", action="store_true",
        help="accept a peer's datagrams whatever their inner source address (default: only sources in that peer's subnet)",
    )
    group.add_argument("--trace", action="store_true", help="log one line per packet with its verdict (slow; for learning)")
    group.add_argument(
        "--no-fast-path", action="store_true",
        help="move one packet per syscall even where the kernel offers TUN offloads and UDP GSO/GRO (for teaching and comparison)",
    )
    group.add_argument(
        "--disable-offloads", type=offload_list, default=frozenset(), metavar="LIST",
        help=f"fast path: leave these kernel offloads off, comma-separated, of {','.join(OFFLOADS)} "
             "(a device or kernel that mishandles one; without tun_tso the per-packet path runs)",
    )


def offload_list(value: str) -> frozenset[str]:
    names = frozenset(n.strip() for n in value.split(",") if n.strip())
    unknown = sorted(names - set(OFFLOADS))
    if unknown:
        raise argparse.ArgumentTypeError(f"unknown offload(s) {', '.join(unknown)}; known: {', '.join(OFFLOADS)}")
    return names


def static_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="udpflannel static", description="Run the flannel0 dataplane with static routes, no etcd.")
    p.add_argument("--iface", action="append", default=[], help="external interface (name or IPv4 address); repeatable")
    p.add_argument("--public-ip", default="", help="address peers send to, if not the interface address")
    p.add_argument("--subnet", required=True, help="this node's subnet, e.g. 10.5.1.0/24")
    p.add_argument("--network", required=True, help="the whole overlay network, e.g. 10.5.0.0/16")
    p.add_argument("--route", action="append", default=[], metavar="SUBNET=PUBLIC_IP", help="a peer; repeatable")
    p.add_argument("--port", type=int, default=8285, help="UDP port, the same on every node (default %(default)s)")
    p.add_argument("--subnet-file", default="", help="write a flannel subnet.env here once the dataplane is up")
    p.add_argument("--ip-masq", action="store_true", help="only recorded in subnet.env (FLANNEL_IPMASQ)")
    p.add_argument("--control-socket", default="", help="serve /status, /metrics, /healthz here for 'udpflannel status'")
    p.add_argument("-v", "--verbose", action="count", default=0)
    add_dataplane_flags(p)
    return p


async def run_static(args: argparse.Namespace) -> int:
    from udpflannel.iface import select_interface
    from udpflannel.node import bring_up, wait_for_stop_signal
    from udpflannel.static import check_static_layout, parse_network, parse_route

    subnet = parse_network("--subnet", args.subnet)
    network = parse_network("--network", args.network)
    routes = [parse_route(spec) for spec in args.route]
    check_static_layout(subnet, network, routes, args.port)
    iface = await asyncio.to_thread(select_interface, args.iface, public_ip=args.public_ip or None)
    node = await asyncio.to_thread(bring_up, iface, subnet, network, args.port, budget=args.budget,
                                   check_source=not args.accept_any_inner_source, trace=args.trace,
                                   fast_path=not args.no_fast_path, disabled_offloads=args.disable_offloads)
    closers = []
    try:
        for route in routes:
            node.follow(route)
            log.info("route %s via %s:%d", route.subnet, route.public_ip, args.port)
        node.attach()
        if args.control_socket:
            from udpflannel.nodeapi import NodeApi, StaticState

            api = NodeApi(StaticState(node, {"subnet": str(subnet), "public_ip": str(iface.ext_addr), "static": True},
                                      str(network)))
            await api.http.serve_unix(args.control_socket)
            closers.append(api.http.close)
        if args.subnet_file:
            from lease.subnetenv import format_subnet_env, write_subnet_env

            write_subnet_env(args.subnet_file, format_subnet_env(network=network, subnet=subnet, mtu=node.tun_mtu, ip_masq=args.ip_masq))
        log.info("static dataplane running on %s (%d routes)", node.tun.name, len(routes))
        sig = await wait_for_stop_signal()
        log.info("signal %d: stopping; counters %s", sig, json.dumps(node.counters.as_dict()))
    finally:
        for close in closers:
            await close()
        node.close()
    return 0


def run_daemon(argv: list[str]) -> int:
    from udpflannel.daemon import Daemon
    from udpflannel.flags import daemon_parser, parse_daemon_args

    parser = daemon_parser()
    add_dataplane_flags(parser)
    args = parse_daemon_args(argv, parser=parser)
    setup_logging(args.verbosity, args.trace)
    exit_now(uvloop.run(Daemon(args).run()))


def exit_now(code: int) -> NoReturn:
    """End the process after a clean stop without the interpreter's finalization.

    Finalizing the interpreter's state at exit took ~0.6 s of CPU with numba and LLVM loaded (1.5 s on
    a loaded 2-core machine), which counted against the 2 s SIGTERM budget; it is still time spent for
    nothing. By now the daemon has closed its TUN device, sockets, rules' resync and etcd session
    itself, and nothing registered to run at exit is needed.
    """
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def status_main(argv: list[str]) -> int:
    """Print a running daemon's lease, peers and counters (from its control socket)."""
    from udpflannel.flags import DEFAULT_CONTROL_SOCKET
    from udpflannel.httpapi import get

    p = argparse.ArgumentParser(prog="udpflannel status", description=status_main.__doc__)
    p.add_argument("--control-socket", default=DEFAULT_CONTROL_SOCKET)
    p.add_argument("--json", action="store_true", help="print the raw JSON")
    args = p.parse_args(argv)
    try:
        code, body = asyncio.run(get("/status", unix_socket=args.control_socket))
    except OSError as exc:
        print(f"udpflannel status: no daemon answers on {args.control_socket}: {exc}", file=sys.stderr)
        return 1
    status = json.loads(body)
    if args.json:
        print(json.dumps(status, indent=2))
        return 0 if code == 200 else 1
    print(format_status(status))
    return 0


def format_status(status: dict) -> str:
    lease = status.get("lease") or {}
    lines = [
        f"lease    {lease.get('subnet', '-')}  public ip {lease.get('public_ip', '-')}  ready {status.get('ready')}",
        f"network  {status.get('network') or '-'}  tun {(status.get('tun') or {}).get('name', '-')}"
        f" mtu {(status.get('tun') or {}).get('mtu', '-')}",
        "",
        f"{'SUBNET':<20} {'PUBLIC IP':<16} {'PORT':>5} {'RX PKTS':>10} {'LAST SEEN':>10} {'PATH MTU':>8}",
    ]
    for peer in status.get("peers", []):
        seen = peer["last_seen_seconds_ago"]
        lines.append(f"{peer['subnet']:<20} {peer['public_ip']:<16} {peer['port']:>5} {peer['rx_packets']:>10} "
                     f"{'never' if seen is None else f'{seen:.0f}s ago':>10} {peer.get('path_mtu') or '-':>8}")
    counters = status.get("counters") or {}
    drops = {f"{reason} ({direction})": v for direction, reasons in (counters.get("drops") or {}).items()
             for reason, v in reasons.items() if v}
    lines += [
        "",
        f"tun->udp {counters.get('sent_packets', 0)} pkts  udp->tun {counters.get('delivered_packets', 0)} pkts  "
        f"syscalls/pkt {counters.get('syscalls_per_packet', 0)}  pkts/wakeup tun {counters.get('packets_per_tun_wakeup', 0)}"
        f" udp {counters.get('packets_per_udp_wakeup', 0)}",
        "drops    " + (", ".join(f"{k} {v}" for k, v in sorted(drops.items())) or "none"),
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["--version"]:
        print(__version__)
        return 0
    command = argv[0] if argv and not argv[0].startswith("-") else ""
    try:
        if command == "static":
            args = static_parser().parse_args(argv[1:])
            setup_logging(args.verbose, args.trace)
            return uvloop.run(run_static(args))
        if command == "demo":
            from udpflannel.demo import main as demo_main

            return demo_main(argv[1:])
        if command == "status":
            return status_main(argv[1:])
        if command == "trace":
            from udpflannel.traceclient import main as trace_main

            return trace_main(argv[1:])
        return run_daemon(argv)
    except FAMILIES as exc:
        log.error("%s", exc)
        print(f"udpflannel: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        return 0


if __name__ == "__main__":
    raise SystemExit(main())
