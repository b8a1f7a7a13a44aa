"""One UDP flow between two pods, every datagram checkable on arrival.

    python udpflow.py recv PORT COUNT SECONDS       # prints {"received", "intact", "distinct"} as JSON
    python udpflow.py send HOST PORT COUNT SIZE BURST
    python udpflow.py sweep-recv PORT MAXSIZE SECONDS  # prints {"intact": [sizes], "damaged": n} as JSON
    python udpflow.py sweep-send HOST PORT MAXSIZE     # one datagram of every size 1..MAXSIZE

Datagram i carries i (4 bytes, big-endian) and then bytes that depend only on i and its size, so the
receiver can tell a datagram that arrived intact from one that was cut, merged or damaged. The
sender pauses 2 ms after every BURST datagrams: bursts give the dataplane batches to merge, the pauses
keep the receiving socket's buffer from overflowing (which would lose datagrams for a reason that is
not the dataplane's).
"""

import hashlib
import json
import socket
import sys
import time


def payload(i: int, size: int) -> bytes:
    seed = hashlib.sha256(i.to_bytes(4, "big")).digest()
    return (i.to_bytes(4, "big") + seed * (size // 32 + 1))[:size]


def listen(port: int) -> socket.socket:
    """A bound receiving socket with room for bursts; says "listening" once it is."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 << 20)
    sock.bind(("0.0.0.0", port))
    sock.settimeout(0.2)
    print("listening", flush=True)
    return sock


def recv(port: int, count: int, seconds: float) -> None:
    sock = listen(port)
    received = intact = 0
    seen: set[int] = set()
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline and len(seen) < count:
        try:
            data = sock.recv(65535)
        except TimeoutError:
            continue
        received += 1
        i = int.from_bytes(data[:4], "big")
        if data == payload(i, len(data)):
            intact += 1
            seen.add(i)
    print(json.dumps({"received": received, "intact": intact, "distinct": len(seen)}), flush=True)


def send(host: str, port: int, count: int, size: int, burst: int) -> None:
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.connect((host, port))  # a connected socket: consecutive IP IDs, as GRO wants them
    for i in range(count):
        sock.send(payload(i, size))
        if i % burst == burst - 1:
            time.sleep(0.002)


def sweep_payload(size: int) -> bytes:
    """The datagram of ``size`` bytes in a sweep: its content depends only on its size."""
    return (hashlib.sha256(size.to_bytes(4, "big")).digest() * (size // 32 + 1))[:size]


def sweep_recv(port: int, maxsize: int, seconds: float) -> None:
    sock = listen(port)
    intact: set[int] = set()
    damaged = 0
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline and len(intact) < maxsize:
        try:
            data = sock.recv(65535)
        except TimeoutError:
            continue
        if 1 <= len(data) <= maxsize and data == sweep_payload(len(data)):
            intact.add(len(data))
        else:
            damaged += 1
    print(json.dumps({"intact": sorted(intact), "damaged": damaged}), flush=True)


def sweep_send(host: str, port: int, maxsize: int) -> None:
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.connect((host, port))
    for size in range(1, maxsize + 1):
        sock.send(sweep_payload(size))
        if size % 4 == 0:
            time.sleep(0.002)  # ~2 kpps: far below what flanneld or a per-packet node moves, even on a busy machine


if __name__ == "__main__":
    if sys.argv[1] == "sweep-recv":
        sweep_recv(int(sys.argv[2]), int(sys.argv[3]), float(sys.argv[4]))
    elif sys.argv[1] == "sweep-send":
        sweep_send(sys.argv[2], int(sys.argv[3]), int(sys.argv[4]))
    elif sys.argv[1] == "recv":
        recv(int(sys.argv[2]), int(sys.argv[3]), float(sys.argv[4]))
    else:
        send(sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5]), int(sys.argv[6]))
