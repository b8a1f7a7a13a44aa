"""Request/response latency over one TCP connection (like netperf TCP_RR), standard library only.

    python rr.py server PORT SIZE [IDLE_SECONDS]
    python rr.py client HOST PORT SIZE COUNT WARMUP MAX_SECONDS [samples]
    python rr.py udp-server PORT [IDLE_SECONDS]
    python rr.py udp-client HOST PORT SIZE COUNT INTERVAL_MS

The client sends SIZE bytes, waits for the SIZE-byte echo, and times each round trip with
``perf_counter_ns``; after WARMUP untimed round trips it does up to COUNT timed ones (fewer if
MAX_SECONDS pass first) and prints one JSON line: n, p50/p90/p99/min/max/mean in µs (with ``samples``,
also every round trip in ns, so several runs can be pooled: see :func:`summarize`). TCP_NODELAY on
both ends, so each message is one packet each way. The server echoes one connection at a time and
exits after IDLE_SECONDS without a new connection (the lab kills it anyway).

The UDP pair measures *sparse* request/response: one SIZE-byte datagram every INTERVAL_MS (200 Hz at
5 ms), each waiting up to one interval for its echo, so every hop sleeps between two packets and pays a
wake-up — the traffic of real request/response services, unlike the back-to-back TCP loop above. A
datagram whose echo does not come within the interval counts as lost (its late echo is discarded by
its sequence number).
"""

from __future__ import annotations

import json
import math
import socket
import sys
import time


def recv_exact(sock: socket.socket, view: memoryview) -> bool:
    """Fill ``view``; False on EOF. Bounded: every recv returns ≥ 1 byte or ends the loop."""
    got = 0
    while got < len(view):
        n = sock.recv_into(view[got:])
        if n == 0:
            return False
        got += n
    return True


def server(port: int, size: int, idle: float = 600.0) -> None:
    srv = socket.socket()
    srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    srv.bind(("0.0.0.0", port))
    srv.listen(8)
    srv.settimeout(idle)
    print("listening", flush=True)
    buf = bytearray(size)
    view = memoryview(buf)
    for _ in range(10000):  # connections
        try:
            conn, _ = srv.accept()
        except TimeoutError:
            return
        with conn:
            conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            conn.settimeout(idle)
            try:
                while recv_exact(conn, view):
                    conn.sendall(view)
            except OSError:
                continue


def percentile(sorted_values: list[int], q: float) -> int:
    """Nearest-rank percentile of an already sorted list."""
    rank = max(1, math.ceil(q * len(sorted_values)))
    return sorted_values[rank - 1]


def client(host: str, port: int, size: int, count: int, warmup: int, max_seconds: float, *,
           keep_samples: bool = False) -> dict:
    sock = socket.create_connection((host, port), timeout=5)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    msg = b"r" * size
    buf = bytearray(size)
    view = memoryview(buf)
    clock = time.perf_counter_ns
    deadline = time.monotonic() + max_seconds
    samples: list[int] = []
    for i in range(warmup + count):
        t0 = clock()
        sock.sendall(msg)
        if not recv_exact(sock, view):
            raise SystemExit("server closed the connection")
        t1 = clock()
        if i >= warmup:
            samples.append(t1 - t0)
        if (i & 63) == 0 and time.monotonic() > deadline:
            break
    sock.close()
    if not samples:
        raise SystemExit("no timed round trips (MAX_SECONDS too small?)")
    out = summarize(samples, size=size, count=count)
    if keep_samples:
        out["samples_ns"] = samples
    return out


def summarize(samples: list[int], *, size: int, count: int) -> dict:
    """Percentiles (µs) of round trips measured in ns; ``count`` is how many were asked for."""
    samples = sorted(samples)
    n = len(samples)
    us = 1e-3
    return {
        "n": n, "size": size, "stopped_by_time": n < count,
        "p50_us": percentile(samples, 0.50) * us, "p90_us": percentile(samples, 0.90) * us,
        "p99_us": percentile(samples, 0.99) * us, "min_us": samples[0] * us, "max_us": samples[-1] * us,
        "mean_us": sum(samples) / n * us,
    }


def udp_server(port: int, idle: float = 600.0) -> None:
    """Echo every datagram to its sender until IDLE seconds pass without one."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.bind(("0.0.0.0", port))
    sock.settimeout(idle)
    print("listening", flush=True)
    buf = bytearray(65535)
    for _ in range(10_000_000):  # datagrams
        try:
            n, peer = sock.recvfrom_into(buf)
        except TimeoutError:
            return
        sock.sendto(memoryview(buf)[:n], peer)


def udp_client(host: str, port: int, size: int, count: int, interval_ms: float) -> dict:
    """``count`` datagrams, one every ``interval_ms`` on a fixed schedule; each echo's round trip in ns."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.connect((host, port))
    interval = interval_ms / 1e3
    clock = time.perf_counter_ns
    buf = bytearray(max(size, 8))
    samples: list[int] = []
    lost = 0
    start = time.monotonic()
    for seq in range(count):
        pause = start + seq * interval - time.monotonic()
        if pause > 0:
            time.sleep(pause)
        msg = seq.to_bytes(8, "big") + b"u" * (size - 8)
        t0 = clock()
        sock.send(msg)
        wait_until = time.monotonic() + interval
        for _ in range(count):  # late echoes of earlier datagrams are skipped
            left = wait_until - time.monotonic()
            if left <= 0:
                lost += 1
                break
            sock.settimeout(left)
            try:
                n = sock.recv_into(buf)
            except TimeoutError:
                lost += 1
                break
            if n >= 8 and int.from_bytes(buf[:8], "big") == seq:
                samples.append(clock() - t0)
                break
    sock.close()
    if not samples:
        raise SystemExit(f"no echo came back ({lost} lost)")
    return {**summarize(samples, size=size, count=count), "lost": lost, "interval_ms": interval_ms}


def main(argv: list[str]) -> None:
    if argv[:1] == ["server"]:
        server(int(argv[1]), int(argv[2]), float(argv[3]) if len(argv) > 3 else 600.0)
    elif argv[:1] == ["client"]:
        host, port, size, count, warmup, max_seconds = argv[1:7]
        print(json.dumps(client(host, int(port), int(size), int(count), int(warmup), float(max_seconds),
                                keep_samples=argv[7:8] == ["samples"])), flush=True)
    elif argv[:1] == ["udp-server"]:
        udp_server(int(argv[1]), float(argv[2]) if len(argv) > 2 else 600.0)
    elif argv[:1] == ["udp-client"]:
        host, port, size, count, interval_ms = argv[1:6]
        print(json.dumps(udp_client(host, int(port), int(size), int(count), float(interval_ms))), flush=True)
    else:
        raise SystemExit(__doc__)


if __name__ == "__main__":
    main(sys.argv[1:])
