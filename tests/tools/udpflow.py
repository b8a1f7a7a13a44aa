"""One UDP flow between two pods, every datagram checkable on arrival.

    python udpflow.py recv PORT COUNT SECONDS       # prints {"received", "intact", "distinct"} as JSON
    python udpflow.py send HOST PORT COUNT SIZE BURST

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


def recv(port: int, count: int, seconds: float) -> None:
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 << 20)
    sock.bind(("0.0.0.0", port))
    sock.settimeout(0.2)
    print("listening", flush=True)
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


if __name__ == "__main__":
    if sys.argv[1] == "recv":
        recv(int(sys.argv[2]), int(sys.argv[3]), float(sys.argv[4]))
    else:
        send(sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5]), int(sys.argv[6]))
