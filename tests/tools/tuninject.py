"""Write IPv4 packets into this namespace's kernel through a plain TUN and report what the kernel
thought of them: deltas of /proc/net/snmp counters (what ``nstat`` reads) as one JSON line.

    python tuninject.py PACKETS_FILE    # file: 4-byte big-endian length + packet, repeated

Run inside a namespace of its own (the test does). The TUN gets 10.99.0.1/24 and MTU 65535, so
packets from 10.99.0.2 to 10.99.0.1 of any size are delivered locally. Waits (bounded) until the
kernel has counted every packet before reading the counters.
"""

import json
import os
import subprocess
import sys
import time

import pytun

NAME = "ufinj0"


def snmp() -> dict[str, int]:
    out: dict[str, int] = {}
    with open("/proc/net/snmp") as f:
        lines = f.read().splitlines()
    for names, values in zip(lines[::2], lines[1::2], strict=True):
        proto, names = names.split(":", 1)
        for name, value in zip(names.split(), values.split(":", 1)[1].split(), strict=True):
            out[f"{proto}{name}"] = int(value)
    return out


def main(path: str) -> None:
    with open(path, "rb") as f:
        data = f.read()
    packets = []
    at = 0
    while at < len(data):
        n = int.from_bytes(data[at:at + 4], "big")
        packets.append(data[at + 4:at + 4 + n])
        at += 4 + n
    tun = pytun.TunTapDevice(name=NAME, flags=pytun.IFF_TUN | pytun.IFF_NO_PI)
    try:
        for cmd in (["addr", "add", "10.99.0.1/24", "dev", NAME], ["link", "set", NAME, "mtu", "65535", "up"]):
            subprocess.run(["ip", *cmd], check=True)
        before = snmp()
        for packet in packets:
            os.write(tun.fileno(), packet)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            after = snmp()
            if after["IpInReceives"] - before["IpInReceives"] >= len(packets):
                break
            time.sleep(0.01)
        time.sleep(0.05)  # let the softirq finish the last packet's L4 processing
        after = snmp()
        print(json.dumps({k: v - before.get(k, 0) for k, v in after.items() if v != before.get(k, 0)}), flush=True)
    finally:
        tun.close()


if __name__ == "__main__":
    main(sys.argv[1])
