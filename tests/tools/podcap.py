"""A pod's view: every IPv4 packet it receives from a peer's subnet, judged and fingerprinted.

    podcap.py IFACE PEER_SUBNET IGNORED_SUBNET

Prints ``listening`` once capturing; stops on a line ``stop N`` on stdin: it reads on until it has N
packets from PEER_SUBNET (or DRAIN_LIMIT seconds pass), and then until nothing more comes for QUIET
seconds, and prints JSON: how many packets came from PEER_SUBNET, which of them are malformed (hostile.problem),
their digests (hostile.digest, to compare with what the attacker's model says must arrive), the
packets from any other source but IGNORED_SUBNET (legitimate traffic) and link-local multicast (the node's
own IGMP reports), and the socket's drop count.

An AF_PACKET socket with PACKET_VNET_HDR: a super-packet a node wrote as one GSO unit arrives as one
frame, and its virtio_net_hdr says how it would be cut (``hostile.resegment``), so each packet it
carries is judged on its own. A classic BPF filter keeps the legitimate traffic (IGNORED_SUBNET) and
our own outgoing packets out of the socket.
"""

from __future__ import annotations

import ctypes
import json
import select
import socket
import struct
import sys
import time
from collections import Counter
from ipaddress import IPv4Address, IPv4Network

import hostile

ETH_P_IP = 0x0800
SOL_PACKET, PACKET_VNET_HDR, PACKET_STATISTICS = 263, 15, 6  # linux/if_packet.h
PACKET_OUTGOING = 4
SO_ATTACH_FILTER, SO_RCVBUFFORCE = 26, 33
SKF_AD_PKTTYPE = 0xFFFFF000 + 4  # SKF_AD_OFF + SKF_AD_PKTTYPE (linux/filter.h): ancillary load of pkttype
BPF_LD_B_ABS, BPF_LD_W_ABS, BPF_JEQ_K, BPF_AND_K, BPF_RET_K = 0x30, 0x20, 0x15, 0x54, 0x06
VNET = struct.Struct("=BBHHHH")  # virtio_net_hdr, host byte order
ETH_HLEN = 14
QUIET = 0.5  # seconds without a packet that end the drain after "stop"
DRAIN_LIMIT = 20.0
# The node's own bridge (cni0) sends IGMP reports to 224.0.0.22 now and then; link-local multicast is
# never routed, so no daemon can have delivered it: counted apart, not as a foreign packet.
LINK_LOCAL_MULTICAST = IPv4Network("224.0.0.0/24")


def attach_filter(sock: socket.socket, ignored: IPv4Network) -> ctypes.Array:
    """Accept IPv4 frames that we did not send and whose source is outside ``ignored``."""
    program = [
        (BPF_LD_B_ABS, 0, 0, SKF_AD_PKTTYPE),
        (BPF_JEQ_K, 3, 0, PACKET_OUTGOING),  # ours -> reject
        (BPF_LD_W_ABS, 0, 0, ETH_HLEN + 12),  # IPv4 source
        (BPF_AND_K, 0, 0, int(ignored.netmask)),
        (BPF_JEQ_K, 0, 1, int(ignored.network_address)),  # ignored -> reject, else accept
        (BPF_RET_K, 0, 0, 0),
        (BPF_RET_K, 0, 0, 0x40000),
    ]
    code = ctypes.create_string_buffer(b"".join(struct.pack("=HBBI", *insn) for insn in program))
    sock.setsockopt(socket.SOL_SOCKET, SO_ATTACH_FILTER, struct.pack("HP", len(program), ctypes.addressof(code)))
    return code  # (keep it alive while the socket is open)


def main() -> None:
    iface, peer, ignored = sys.argv[1], IPv4Network(sys.argv[2]), IPv4Network(sys.argv[3])
    sock = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(ETH_P_IP))
    sock.setsockopt(SOL_PACKET, PACKET_VNET_HDR, 1)
    sock.setsockopt(socket.SOL_SOCKET, SO_RCVBUFFORCE, 64 << 20)
    code = attach_filter(sock, ignored)
    sock.bind((iface, ETH_P_IP))
    sock.getsockopt(SOL_PACKET, PACKET_STATISTICS, 8)  # (reading resets them: count from here)
    print("listening", flush=True)

    buf = bytearray(VNET.size + ETH_HLEN + 0x10000)
    frames, packets, truncated = 0, 0, 0
    units: Counter = Counter()
    delivered: Counter = Counter()
    malformed: Counter = Counter()
    examples, foreign = [], []
    link_local = 0
    stopping_at, expected = None, 0
    while True:
        if stopping_at is None:
            ready, _, _ = select.select([sock, sys.stdin], [], [], 1.0)
            if sys.stdin in ready:
                expected = int(sys.stdin.readline().split()[1])
                stopping_at = time.monotonic()
                continue
        else:
            waited = time.monotonic() - stopping_at
            ready, _, _ = select.select([sock], [], [], QUIET if packets >= expected else max(0.0, DRAIN_LIMIT - waited))
            if not ready or waited > DRAIN_LIMIT:
                break
        if sock not in ready:
            continue
        n, _, flags, _ = sock.recvmsg_into([buf], 0, socket.MSG_TRUNC)
        if flags & socket.MSG_TRUNC:
            truncated += 1
            continue
        frames += 1
        vflags, gso_type, _, gso_size, _, _ = VNET.unpack_from(buf)
        packet = bytes(buf[VNET.size + ETH_HLEN:n])
        if len(packet) >= 20 and IPv4Address(packet[16:20]) in LINK_LOCAL_MULTICAST:
            link_local += 1
            continue
        if len(packet) < 20 or IPv4Address(packet[12:16]) not in peer:
            foreign.append(packet[:64].hex())
            continue
        units[f"gso_type {gso_type}" + (" needs_csum" if vflags & hostile.NEEDS_CSUM else "")] += 1
        for segment in hostile.resegment(vflags, gso_type, gso_size, packet):
            packets += 1
            why = hostile.problem(segment)
            if why:
                malformed[why] += 1
                if len(examples) < 20:
                    examples.append([why, segment[:64].hex()])
            delivered[hostile.digest(segment)] += 1
    received, drops = struct.unpack("=II", sock.getsockopt(SOL_PACKET, PACKET_STATISTICS, 8))
    del code
    print(json.dumps({
        "frames": frames, "packets": packets, "units": dict(units), "malformed": dict(malformed),
        "malformed_examples": examples, "foreign": len(foreign), "foreign_examples": foreign[:20], "link_local_multicast": link_local,
        "truncated": truncated, "socket_received": received, "socket_drops": drops, "delivered": dict(delivered),
    }))


if __name__ == "__main__":
    main()
