"""The attacker: forge datagrams from a peer's PublicIP:port at a node, and say what was sent.

    forge.py CONFIG_JSON

CONFIG: ``target``, ``port`` (the node's flannel port), ``spoof`` (the peer's PublicIP), ``subnet``,
``peer_pod``, ``pod``, ``outside`` (see hostile.Target), ``seed``, ``count``, ``mtu`` (the node's TUN
MTU), ``window`` and ``control_socket`` (pacing, below), ``report`` (where the JSON goes).

One UDP socket with IP_TRANSPARENT binds the peer's address (not one of ours, and not added to our
interface: that would be an address conflict on the underlay) and sends every datagram from it:
singles with ``sendto``, GRO-sized bursts with one UDP_SEGMENT ``sendmsg`` each, as a peer's fast path
does, so that the node's UDP_GRO socket gets real GRO batches.

Pacing: at most ``window`` datagrams are in flight, counted from the node's own status (its
``udp_to_tun`` drops plus the datagrams it accepted from the peer's address) over its control socket,
so its socket buffer never overflows whatever the machine's speed, and every datagram is accounted
for when this exits.

Prints ``ready`` once the datagrams are made, sends them once a line comes on stdin, then writes JSON
to ``report``: datagrams sent per category, the model's expectations (hostile.model), the per-packet
verdicts ``udpflannel.forward.inbound`` gives each datagram alone, and the wall-clock start and end.
"""

from __future__ import annotations

import json
import socket
import struct
import sys
import time
from collections import Counter
from ipaddress import IPv4Address, IPv4Network

import hostile

IP_TRANSPARENT = 19  # linux/in.h: bind and send from an address that is not ours
IP_MTU_DISCOVER, IP_PMTUDISC_DONT = 10, 0  # let datagrams over the MTU leave as fragments (oversize ones)
SO_SNDBUFFORCE = 32
SOL_UDP, UDP_SEGMENT = 17, 103
DEADLINE = 300.0  # seconds for the whole run, pacing waits included
SETTLE = 30.0  # seconds for the node to decide about the last window (it never will about a lost one)


def status(path: str) -> dict:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(10)
        s.connect(path)
        s.sendall(b"GET /status HTTP/1.1\r\nHost: udpflannel\r\nConnection: close\r\n\r\n")
        raw = b""
        while chunk := s.recv(65536):
            raw += chunk
    return json.loads(raw.partition(b"\r\n\r\n")[2])


def processed(path: str, spoof: str) -> int:
    """Datagrams the node has decided about that can only have come from us: every udp_to_tun drop,
    plus what it accepted from the spoofed address."""
    st = status(path)
    rx = next((p["rx_packets"] for p in st["peers"] if p["public_ip"] == spoof), 0)
    return sum(st["counters"]["drops"]["udp_to_tun"].values()) + rx


def reference_verdicts(sends, target: hostile.Target, spoof: str, port: int, mtu: int) -> Counter:
    """What the per-packet decision says about each datagram alone: both engines must count the same."""
    from udpflannel.forward import inbound
    from udpflannel.routes import RouteTable

    routes = RouteTable([(target.subnet, (spoof, port))])
    verdicts: Counter = Counter()
    for send in sends:
        for row in send.rows:
            buf = bytearray(row) + bytearray(64)
            verdicts[inbound(buf, len(row), (spoof, port), routes, tun_mtu=mtu, check_source=True).name.lower()] += 1
    return verdicts


def main() -> None:
    cfg = json.loads(sys.argv[1])
    target = hostile.Target(IPv4Network(cfg["subnet"]), IPv4Address(cfg["peer_pod"]), IPv4Address(cfg["pod"]),
                            tuple(map(IPv4Address, cfg["outside"])))
    sends = hostile.forge(target, seed=cfg["seed"], count=cfg["count"], mtu=cfg["mtu"])
    model = hostile.model(sends, target, mtu=cfg["mtu"])
    reference = reference_verdicts(sends, target, cfg["spoof"], cfg["port"], cfg["mtu"])

    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.setsockopt(socket.SOL_IP, IP_TRANSPARENT, 1)
    sock.setsockopt(socket.SOL_IP, IP_MTU_DISCOVER, IP_PMTUDISC_DONT)
    sock.setsockopt(socket.SOL_SOCKET, SO_SNDBUFFORCE, 8 << 20)
    sock.bind((cfg["spoof"], cfg["port"]))
    dest = (cfg["target"], cfg["port"])
    path, spoof, window = cfg["control_socket"], cfg["spoof"], cfg["window"]

    print("ready", flush=True)  # generated: the caller starts its own traffic, then says go
    sys.stdin.readline()
    base = processed(path, spoof)
    start = time.time()
    deadline = time.monotonic() + DEADLINE
    sent = done = syscalls = waits = 0
    errors: Counter = Counter()
    for send in sends:
        while sent + len(send.rows) - done > window:  # wait for the node to catch up
            if time.monotonic() > deadline:
                raise SystemExit(f"stalled: {sent} sent, the node decided about {done}")
            done = processed(path, spoof) - base
            waits += 1
        try:
            if len(send.rows) == 1:
                sock.sendto(send.rows[0], dest)
            else:
                sock.sendmsg([b"".join(send.rows)], [(SOL_UDP, UDP_SEGMENT, struct.pack("=H", len(send.rows[0])))],
                               0, dest)
        except OSError as exc:
            errors[exc.strerror] += len(send.rows)
        syscalls += 1
        sent += len(send.rows)
    settle = min(deadline, time.monotonic() + SETTLE)
    while done < sent - sum(errors.values()) and time.monotonic() < settle:  # everything decided
        time.sleep(0.01)
        done = processed(path, spoof) - base
    finished = time.time()
    with open(cfg["report"], "w") as out:
        json.dump({
            "sent": model.sent, "total": sent, "syscalls": syscalls, "bursts": model.bursts, "burst_rows": model.burst_rows,
            "send_errors": dict(errors), "decided": done, "pacing_waits": waits, "started": start, "finished": finished,
            "accepted": model.accepted, "delivered": dict(model.delivered), "reference": dict(reference),
        }, out)


if __name__ == "__main__":
    main()
