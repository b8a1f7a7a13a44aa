"""``udpflannel trace``: watch packets cross a running daemon, step by step, and write them to a pcap.

It attaches to the daemon's control socket (``GET /trace``, ``udpflannel/tracehub.py``): no restart and
no ``--trace`` needed, and the daemon stops tracing when the last client leaves. The filters run in the
daemon, so only matching packets cost anything. Each packet's journey is printed as the daemon's code
took it; with ``--pcap FILE`` the packets go to a pcapng file with two interfaces: ``flannel0`` (inner
packets, as ``tcpdump -i flannel0`` sees them) and the underlay (the UDP datagrams, headers rebuilt:
``udpflannel.tracing.OUTER_NOTE``).
"""

from __future__ import annotations

import argparse
import base64
import json
import socket
import sys
import time
from datetime import datetime
from typing import BinaryIO
from urllib.parse import urlencode

from udpflannel.ctlsocket import reachable
from udpflannel.pcapng import PcapngWriter
from udpflannel.tracing import OUTER_NOTE, TraceFilter


def parser() -> argparse.ArgumentParser:
    from udpflannel.flags import DEFAULT_CONTROL_SOCKET

    p = argparse.ArgumentParser(prog="udpflannel trace", description=__doc__.split("\n\n")[0])
    p.add_argument("--control-socket", default=DEFAULT_CONTROL_SOCKET, help="the daemon's (default %(default)s)")
    p.add_argument("--host", default="", help="only packets from or to this inner address or network")
    p.add_argument("--proto", default="", help="only this inner protocol: icmp, tcp, udp or a number")
    p.add_argument("--port", default="", help="only TCP/UDP packets from or to this port")
    p.add_argument("--peer", default="", help="only packets to or from this peer node (its public IP)")
    p.add_argument("--drops", action="store_true", help="only packets the daemon dropped")
    p.add_argument("--count", type=int, default=0, help="stop after this many packets")
    p.add_argument("--seconds", type=float, default=0.0, help="stop after this many seconds")
    p.add_argument("--pcap", default="", metavar="FILE", help="also write the packets to FILE (pcapng)")
    p.add_argument("--json", action="store_true", help="print the daemon's JSON lines as they come")
    return p


class PcapSink:
    """The pcapng file: interface 0 is flannel0, interface 1 the underlay."""

    def __init__(self, file: BinaryIO, hello: dict) -> None:
        self.file = file
        self.writer = PcapngWriter(file, application="udpflannel trace",
                                   comment=f"udpflannel trace on {hello.get('node', '?')}: {OUTER_NOTE}")
        tun = hello.get("tun", "flannel0")
        self.inner = self.writer.add_interface(tun, f"{tun}: inner IPv4 packets as read from / written to the TUN")
        self.outer = self.writer.add_interface("underlay", f"UDP {hello.get('local', '')}: {OUTER_NOTE}")

    def add(self, number: int, event: dict) -> None:
        inner = base64.b64decode(event.get("inner", ""))
        outer = [base64.b64decode(d) for d in event.get("outer", [])]
        t = int(event.get("t", 0))
        label = f"#{number} {event['dir']} {event['verdict']}"
        records = [(self.inner, inner, label)] if inner else []
        records_outer = [(self.outer, d, f"{label}, datagram {i + 1}/{len(outer)}; outer headers rebuilt")
                         for i, d in enumerate(outer)]
        records = records + records_outer if event["dir"] == "out" else records_outer + records
        for interface, data, comment in records:
            self.writer.add_packet(interface, t, data, comment=comment)
        self.file.flush()


def format_event(number: int, event: dict) -> str:
    """A journey as the terminal shows it: a heading, then one numbered line per step."""
    stamp = datetime.fromtimestamp(event.get("t", 0) / 1e6).strftime("%H:%M:%S.%f")
    way = "flannel0 → peer" if event["dir"] == "out" else "peer → flannel0"
    lines = [f"#{number} {stamp} {event['dir']} ({way}): {event['verdict']}"]
    width = max((len(name) for name, _ in event["steps"]), default=0)
    lines += [f"  {i}. {name:<{width}}  {text}" for i, (name, text) in enumerate(event["steps"], 1)]
    return "\n".join(lines)


def request(args: argparse.Namespace) -> bytes:
    flt = TraceFilter.from_query({"host": args.host, "proto": args.proto, "port": args.port, "peer": args.peer,
                                  "drops": "1" if args.drops else ""})  # refused here, with the field named
    query = {**flt.as_query(), **({"count": str(args.count)} if args.count else {}),
             **({"bytes": "1"} if args.pcap else {})}
    return f"GET /trace?{urlencode(query)} HTTP/1.1\r\nHost: udpflannel\r\nConnection: close\r\n\r\n".encode()


def main(argv: list[str]) -> int:
    args = parser().parse_args(argv)
    try:
        req = request(args)
    except ValueError as exc:
        print(f"udpflannel trace: {exc}", file=sys.stderr)
        return 2
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        with reachable(args.control_socket) as address:
            sock.connect(address)
    except OSError as exc:
        print(f"udpflannel trace: no daemon answers on {args.control_socket}: {exc}", file=sys.stderr)
        return 1
    deadline = time.monotonic() + args.seconds if args.seconds else None
    with sock:
        sock.sendall(req)
        stream = sock.makefile("rb")
        status = stream.readline().split()
        while stream.readline() not in (b"\r\n", b""):
            pass
        if len(status) < 2 or status[1] != b"200":
            print(f"udpflannel trace: the daemon refused: {stream.read().decode(errors='replace').strip()}", file=sys.stderr)
            return 2
        return follow(sock, stream, args, deadline)


def follow(sock: socket.socket, stream, args: argparse.Namespace, deadline: float | None) -> int:
    """Read the daemon's lines until ``--count``, ``--seconds``, the daemon's end or Ctrl-C."""
    traced, dropped, pcap, pcap_file = 0, 0, None, None
    try:
        while True:
            if deadline is not None:
                left = deadline - time.monotonic()
                if left <= 0:
                    break
                sock.settimeout(left)
            try:
                line = stream.readline()
            except TimeoutError:
                break
            if not line:
                break
            item = json.loads(line)
            if args.json:
                print(line.decode().rstrip(), flush=True)
            if "hello" in item:
                print(f"tracing {item.get('tun', 'flannel0')} on {args.control_socket} "
                      f"(filter: {item['filter'] or 'none'}); Ctrl-C stops", file=sys.stderr, flush=True)
                if args.pcap:
                    pcap_file = open(args.pcap, "wb")
                    pcap = PcapSink(pcap_file, item)
            elif "steps" in item:
                traced += 1
                if not args.json:
                    print(format_event(traced, item) + "\n", flush=True)
                if pcap is not None:
                    pcap.add(traced, item)
                if args.count and traced >= args.count:
                    break
            elif "dropped" in item:
                if item["dropped"] > dropped and not args.json:
                    print(f"! {item['dropped'] - dropped} more packets not shown: this client read too slowly "
                          f"(the daemon dropped them for it; {item['dropped']} in all)", flush=True)
                dropped = item["dropped"]
                if "end" in item:
                    break
    except KeyboardInterrupt:
        pass
    finally:
        if pcap_file is not None:
            pcap_file.close()
    print(f"{traced} packets traced, {dropped} not shown (client too slow)"
          + (f"; pcap: {args.pcap} (open it: wireshark {args.pcap}, or tshark -r {args.pcap})" if args.pcap else ""),
          file=sys.stderr)
    return 0
