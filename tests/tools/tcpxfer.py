"""Move N pseudo-random bytes over one TCP connection and print the SHA-256 each end saw.

    python tcpxfer.py recv PORT          # prints "<sha256> <bytes>" after the sender closes
    python tcpxfer.py send HOST PORT N [RATE [SEED]]   # prints "<sha256> <bytes>" of what it sent

The payload is generated from a fixed seed (2026, or SEED: parallel transfers each send other bytes, so
a mix-up between them shows in the SHA-256) in 64 KiB chunks, so neither end holds it all in memory.
RATE (bytes per second) paces the sender, so a transfer can span a slow event (a rolling restart).
A connection reset ends either side with a traceback and a non-zero exit.
"""

import hashlib
import random
import socket
import sys
import time

CHUNK = 65536


def recv(port: int) -> None:
    srv = socket.socket()
    srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    srv.bind(("0.0.0.0", port))
    srv.listen(1)
    srv.settimeout(60)
    print("listening", flush=True)
    conn, _ = srv.accept()
    conn.settimeout(60)
    digest, total = hashlib.sha256(), 0
    while True:
        data = conn.recv(1 << 20)
        if not data:
            break
        digest.update(data)
        total += len(data)
    print(digest.hexdigest(), total, flush=True)


def send(host: str, port: int, size: int, rate: float = 0.0, seed: int = 2026) -> None:
    rng = random.Random(seed)
    sock = socket.create_connection((host, port), timeout=60)
    digest, left = hashlib.sha256(), size
    start = time.monotonic()
    while left:
        chunk = rng.randbytes(min(CHUNK, left))
        sock.sendall(chunk)
        digest.update(chunk)
        left -= len(chunk)
        if rate:
            ahead = start + (size - left) / rate - time.monotonic()
            if ahead > 0:
                time.sleep(ahead)
    sock.shutdown(socket.SHUT_WR)
    sock.recv(1)
    sock.close()
    print(digest.hexdigest(), size, flush=True)


if __name__ == "__main__":
    if sys.argv[1] == "recv":
        recv(int(sys.argv[2]))
    else:
        send(sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), float(sys.argv[5]) if len(sys.argv) > 5 else 0.0,
             int(sys.argv[6]) if len(sys.argv) > 6 else 2026)
