"""A bad wire between two interfaces: loses, delays (and so reorders), duplicates and corrupts frames.

    python impair.py IFACE_A IFACE_B SEED [loss=P] [reorder=P] [delay=SECONDS] [duplicate=P] [corrupt=P]

Runs in a namespace that holds both interfaces and bridges them in userspace with two AF_PACKET
sockets, deciding per frame with a seeded RNG (this kernel has no netem). Probabilities are fractions:
``loss=0.01`` drops 1 % of frames; ``reorder=0.25 delay=0.001`` holds a quarter of them back by 1 ms
while the others pass, so they arrive out of order; ``duplicate`` sends a frame twice; ``corrupt``
flips one random bit after the Ethernet header. Every frame is one datagram, as on a real wire: the
senders' interfaces must segment and checksum in software (``ethtool -K eth0 tx off``).
Prints "ready", then, on SIGTERM, a JSON line with what it did (``overflow``: frames lost because the
far side's receive ring stayed full, as a NIC's would).
"""

import errno
import heapq
import json
import os
import random
import select
import selectors
import signal
import socket
import sys
import time

ETH_P_ALL = 0x0003
SOL_PACKET = 263  # linux/socket.h (not in Python 3.11's socket module)
PACKET_IGNORE_OUTGOING = 23  # linux/if_packet.h: do not hand us the frames we send ourselves
ETH_HLEN = 14


def open_port(name: str) -> socket.socket:
    sock = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(ETH_P_ALL))
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 8 << 20)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 8 << 20)
    sock.setsockopt(SOL_PACKET, PACKET_IGNORE_OUTGOING, 1)
    sock.bind((name, ETH_P_ALL))
    sock.setblocking(False)
    return sock


def main(a: str, b: str, seed: int, settings: dict[str, float]) -> None:
    rng = random.Random(seed)
    loss, reorder = settings.get("loss", 0.0), settings.get("reorder", 0.0)
    delay, duplicate, corrupt = settings.get("delay", 0.001), settings.get("duplicate", 0.0), settings.get("corrupt", 0.0)
    ports = {a: open_port(a), b: open_port(b)}
    other = {ports[a]: ports[b], ports[b]: ports[a]}
    selector = selectors.DefaultSelector()
    for sock in ports.values():
        selector.register(sock, selectors.EVENT_READ)
    held: list[tuple[float, int, socket.socket, bytes]] = []  # (due, order, out port, frame)
    counts = {"frames": 0, "lost": 0, "delayed": 0, "duplicated": 0, "corrupted": 0, "overflow": 0}
    stop = []
    signal.signal(signal.SIGTERM, lambda *_: stop.append(1))

    def send(out: socket.socket, frame: bytes) -> None:
        """A full receive ring on the far side is waited out for up to ~50 ms, then the frame is lost as a
        NIC would lose it (``overflow``); any other send error is counted under its name."""
        for _ in range(50):
            try:
                out.send(frame)
                return
            except OSError as exc:
                if exc.errno not in (errno.EAGAIN, errno.ENOBUFS):
                    name = f"send_{errno.errorcode.get(exc.errno, exc.errno)}"
                    counts[name] = counts.get(name, 0) + 1
                    return
                select.select([], [out], [], 0.001)
        counts["overflow"] += 1

    print("ready", flush=True)
    order = 0
    while not stop:
        timeout = max(0.0, held[0][0] - time.monotonic()) if held else 0.2
        for key, _ in selector.select(timeout):
            sock = key.fileobj
            for _ in range(256):  # drain, bounded
                try:
                    frame = sock.recv(65536)
                except BlockingIOError:
                    break
                counts["frames"] += 1
                if rng.random() < loss:
                    counts["lost"] += 1
                    continue
                if rng.random() < corrupt and len(frame) > ETH_HLEN:
                    spot = rng.randrange(ETH_HLEN, len(frame))
                    frame = frame[:spot] + bytes([frame[spot] ^ (1 << rng.randrange(8))]) + frame[spot + 1:]
                    counts["corrupted"] += 1
                copies = 2 if rng.random() < duplicate else 1
                counts["duplicated"] += copies - 1
                for _ in range(copies):
                    if rng.random() < reorder:
                        order += 1
                        heapq.heappush(held, (time.monotonic() + delay, order, other[sock], frame))
                        counts["delayed"] += 1
                    else:
                        send(other[sock], frame)
        now = time.monotonic()
        while held and held[0][0] <= now:
            _, _, out, frame = heapq.heappop(held)
            send(out, frame)
    print(json.dumps(counts), flush=True)
    os._exit(0)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], int(sys.argv[3]),
         {k: float(v) for k, v in (arg.split("=", 1) for arg in sys.argv[4:])})
