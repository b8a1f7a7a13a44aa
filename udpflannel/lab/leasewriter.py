"""Simulated nodes for scale tests: lease records written straight into etcd, as a thousand flanneld
nodes would have left them, and lease churn at a steady rate.

Run it where etcd is reachable (the lab's hub namespace, with ``Netns.popen``)::

    python -m udpflannel.lab.leasewriter ENDPOINT PREFIX fill FIRST COUNT
    python -m udpflannel.lab.leasewriter ENDPOINT PREFIX add FIRST COUNT INTERVAL
    python -m udpflannel.lab.leasewriter ENDPOINT PREFIX churn FIRST RATE SECONDS
    python -m udpflannel.lab.leasewriter ENDPOINT PREFIX delete FIRST COUNT
    python -m udpflannel.lab.leasewriter ENDPOINT PREFIX move FIRST COUNT

Simulated node ``i`` holds ``10.64.0.0/10``'s ``i``-th /24 (:func:`subnet`) at PublicIP
``198.18.(16 + i // 250).(1 + i % 250)`` (:func:`public_ip`): inside the lab's 198.18.0.0/15 range,
on no interface of any namespace, so no packet is ever sent to one (no namespace has a route there).
Records carry no etcd lease: the only etcd leases are the real daemons'.

``fill`` writes ``COUNT`` records at once (transactions of 128 puts); ``add`` writes them one by one,
``INTERVAL`` seconds apart; ``churn`` adds ``RATE`` records a second and removes each one second after
its addition, for ``SECONDS`` (``RATE`` additions and ``RATE`` removals a second); ``delete`` removes
records, ``move`` gives them another PublicIP (that of node ``i + MOVED``). Each prints one JSON
line per record written or deleted, ``{"op": "put"|"move"|"del", "subnet": ..., "t": <wall-clock time
the write returned>}``, and a last line ``{"done": true, ...}`` with the rate achieved.
"""

from __future__ import annotations

import asyncio
import json
import sys
import time
from ipaddress import IPv4Address, IPv4Network
from urllib.parse import urlsplit

import aetcd

from lease.records import encode_lease_value, make_subnet_key

BASE = IPv4Network("10.64.0.0/10")
MAX_INDEX = 16128  # 10.127.0.0/16 (from index 16128 on) is left to real daemons: SubnetMin 10.127.0.0
TXN_OPS = 128  # etcd's default --max-txn-ops
MOVED = 8000  # a moved record takes the PublicIP of this many nodes further


def subnet(i: int) -> IPv4Network:
    if not 0 <= i < MAX_INDEX:
        raise ValueError(f"simulated node index {i} is outside 0..{MAX_INDEX - 1}")
    return IPv4Network((int(BASE.network_address) + (i << 8), 24))


def public_ip(i: int) -> IPv4Address:
    return IPv4Address(f"198.18.{16 + i // 250}.{1 + i % 250}")


def record(prefix: str, i: int, *, moved: bool = False) -> tuple[bytes, bytes]:
    return make_subnet_key(prefix, subnet(i)).encode(), encode_lease_value(public_ip(i + MOVED if moved else i))


def emit(op: str, i: int) -> None:
    print(json.dumps({"op": op, "subnet": str(subnet(i)), "t": time.time()}), flush=True)


async def fill(client: aetcd.Client, prefix: str, first: int, count: int, *, op: str = "put") -> None:
    """``count`` records from ``first`` in transactions of TXN_OPS: written (``put``), written with
    another PublicIP (``move``) or deleted (``del``)."""
    for start in range(first, first + count, TXN_OPS):
        batch = range(start, min(first + count, start + TXN_OPS))
        if op == "del":
            ops = [client.transactions.delete(record(prefix, i)[0]) for i in batch]
        else:
            ops = [client.transactions.put(*record(prefix, i, moved=op == "move")) for i in batch]
        await client.transaction(compare=[], success=ops, failure=[])
        for i in batch:
            emit(op, i)


async def add(client: aetcd.Client, prefix: str, first: int, count: int, interval: float) -> None:
    loop = asyncio.get_running_loop()
    t0 = loop.time()
    for k in range(count):
        await asyncio.sleep(max(0.0, t0 + k * interval - loop.time()))
        await client.put(*record(prefix, first + k))
        emit("put", first + k)


async def churn(client: aetcd.Client, prefix: str, first: int, rate: int, seconds: float) -> None:
    """Tick ``rate`` times a second: add the next record, and delete the one added a second ago. Indexes
    run from ``first`` and wrap round at MAX_INDEX (a long soak), each long deleted by then."""
    loop = asyncio.get_running_loop()
    t0 = loop.time()
    ticks = int(rate * seconds)

    def index(k: int) -> int:
        return first + k % (MAX_INDEX - first)

    for k in range(ticks + rate):  # the last second only removes
        await asyncio.sleep(max(0.0, t0 + k / rate - loop.time()))
        if k < ticks:
            await client.put(*record(prefix, index(k)))
            emit("put", index(k))
        if k >= rate:
            await client.delete(record(prefix, index(k - rate))[0])
            emit("del", index(k - rate))
    elapsed = loop.time() - t0
    print(json.dumps({"done": True, "ops": 2 * ticks, "seconds": round(elapsed, 3),
                      "rate_achieved": round(2 * ticks / elapsed, 1)}), flush=True)


async def main(argv: list[str]) -> None:
    endpoint, prefix, command, *rest = argv
    url = urlsplit(endpoint)
    async with aetcd.Client(host=url.hostname, port=url.port or 2379, timeout=10) as client:
        if command == "fill":
            await fill(client, prefix, int(rest[0]), int(rest[1]))
        elif command == "add":
            await add(client, prefix, int(rest[0]), int(rest[1]), float(rest[2]))
        elif command == "churn":
            await churn(client, prefix, int(rest[0]), int(rest[1]), float(rest[2]))
        elif command in ("delete", "move"):
            await fill(client, prefix, int(rest[0]), int(rest[1]), op="del" if command == "delete" else "move")
        else:
            raise SystemExit(f"unknown command {command!r}\n{__doc__}")
    if command != "churn":
        print(json.dumps({"done": True}), flush=True)


if __name__ == "__main__":
    if len(sys.argv) < 6:
        raise SystemExit(__doc__)
    asyncio.run(main(sys.argv[1:]))
