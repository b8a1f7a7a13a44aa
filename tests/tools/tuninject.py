"""Write IPv4 packets into this namespace's kernel through a plain TUN and report what the kernel
thought of them: deltas of /proc/net/snmp counters (what ``nstat`` reads) as one JSON line.

    python tuninject.py PACKETS_FILE    # file: 4-byte big-endian length + packet, repeated
    python tuninject.py --vnet UNITS_FILE   # the same, each record a virtio_net_hdr + packet (GSO writes)

Run inside a namespace of its own (the test does). The TUN gets 10.99.0.1/24 and MTU 65535, so
packets from 10.99.0.2 to 10.99.0.1 of any size are delivered locally. Waits (bounded) until the
kernel has counted every packet before reading the counters.

``--vnet``: the TUN is opened with IFF_VNET_HDR and the fast path's offloads, and each record is one
write as the coalescer makes them (GSO_TCPV4 / GSO_UDP_L4 super-packets, or plain). A UDP socket is
bound on every UDP destination port first (no UDP_GRO: the kernel cuts a UDP super-packet back into
datagrams for it), and the JSON line gets ``"udp"``: per port, each datagram's payload (hex) as the
socket received it, so the caller sees exactly what the kernel made of its writes.
"""

import json
import os
import socket
import subprocess
import sys
import time

import pytun

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
from tun.offload import IFF_VNET_HDR, enable_offloads  # noqa: E402  (the repository's, for --vnet)

VNET_HDR_LEN = 10

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


def main(path: str, vnet: bool = False) -> None:
    with open(path, "rb") as f:
        data = f.read()
    packets = []
    at = 0
    while at < len(data):
        n = int.from_bytes(data[at:at + 4], "big")
        packets.append(data[at + 4:at + 4 + n])
        at += 4 + n
    tun = pytun.TunTapDevice(name=NAME, flags=pytun.IFF_TUN | pytun.IFF_NO_PI | (IFF_VNET_HDR if vnet else 0))
    sockets: dict[int, socket.socket] = {}
    try:
        if vnet:
            enable_offloads(tun.fileno())  # TSO; USO where the kernel has it (Linux >= 6.2)
        for cmd in (["addr", "add", "10.99.0.1/24", "dev", NAME], ["link", "set", NAME, "mtu", "65535", "up"]):
            subprocess.run(["ip", *cmd], check=True)
        for packet in packets:
            ip = packet[VNET_HDR_LEN:] if vnet else packet
            if vnet and ip[9] == 17 and len(ip) >= 28:
                port = int.from_bytes(ip[22:24], "big")
                if port not in sockets:
                    sockets[port] = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
                    sockets[port].setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 24)
                    sockets[port].bind(("10.99.0.1", port))
                    sockets[port].setblocking(False)
        before = snmp()
        errors = []
        for packet in packets:
            try:
                os.write(tun.fileno(), packet)
            except OSError as exc:
                errors.append(str(exc))
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            after = snmp()
            if after["IpInReceives"] - before["IpInReceives"] >= len(packets):
                break
            time.sleep(0.01)
        time.sleep(0.05)  # let the softirq finish the last packet's L4 processing
        after = snmp()
        report: dict = {k: v - before.get(k, 0) for k, v in after.items() if v != before.get(k, 0)}
        if vnet:
            report["write_errors"] = errors
            report["udp"] = {port: list(_drain(s)) for port, s in sockets.items()}
        print(json.dumps(report), flush=True)
    finally:
        for s in sockets.values():
            s.close()
        tun.close()


def _drain(s: socket.socket):
    while True:
        try:
            yield s.recv(65536).hex()
        except BlockingIOError:
            return


if __name__ == "__main__":
    if sys.argv[1] == "--vnet":
        main(sys.argv[2], vnet=True)
    else:
        main(sys.argv[1])
