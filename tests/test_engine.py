"""The asyncio engine on loopback: a SOCK_SEQPACKET pair stands in for the TUN (one read = one packet).

No devices, no namespaces: this checks the drain loop, the budget, the counters and the
backpressure path, which the namespace tests exercise only indirectly.
"""

from __future__ import annotations

import asyncio
import socket
import struct
from ipaddress import IPv4Address, IPv4Network

import pytest

from tests.strategies import slow_header_checksum
from udpflannel.engine import Dataplane
from udpflannel.events import PeerAdded, PeerRemoved, Snapshot
from udpflannel.packet import Verdict

OWN = IPv4Network("10.5.1.0/24")
PEER_SUBNET = IPv4Network("10.5.2.0/24")


def ip_packet(src: str, dst: str, ttl: int = 64, size: int = 60) -> bytes:
    header = bytearray(struct.pack("!BBHHHBBH4s4s", 0x45, 0, size, 1, 0, ttl, 17, 0,
                                   socket.inet_aton(src), socket.inet_aton(dst)))
    header[10:12] = slow_header_checksum(bytes(header)).to_bytes(2, "big")
    return bytes(header) + struct.pack("!HHHH", 40000, 9999, size - 20, 0) + bytes(size - 28)  # UDP, no checksum


class Rig:
    """tun_app <-> (tun_fd) engine (udp) <-> peer socket, all on this host's loopback."""

    def __init__(self, budget: int = 64) -> None:
        self.tun_app, tun_end = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        tun_end.setblocking(False)
        self.tun_end = tun_end
        self.udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.udp.bind(("127.0.0.1", 0))
        self.udp.setblocking(False)
        self.peer = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.peer.bind(("127.0.0.1", 0))
        self.peer.settimeout(2)
        self.dp = Dataplane(tun_fd=tun_end.fileno(), udp=self.udp, icmp_sock=None, tun_mtu=1472,
                            tun_address=OWN.network_address, port=self.peer.getsockname()[1], budget=budget)
        self.dp.apply(PeerAdded(PEER_SUBNET, IPv4Address("127.0.0.1")))

    def close(self) -> None:
        self.dp.detach()
        for s in (self.tun_app, self.tun_end, self.udp, self.peer):
            s.close()


@pytest.fixture
async def rig():
    r = Rig()
    r.dp.attach()
    yield r
    r.close()


async def until(predicate, timeout: float = 2.0) -> None:
    deadline = asyncio.get_running_loop().time() + timeout
    while not predicate():
        assert asyncio.get_running_loop().time() < deadline, "timed out"
        await asyncio.sleep(0.005)


async def test_tun_to_udp_batches_and_counts(rig: Rig):
    for i in range(100):
        rig.tun_app.send(ip_packet("10.5.1.2", f"10.5.2.{i % 250 + 1}"))
    await until(lambda: rig.dp.counters.sent_packets == 100)
    got = [rig.peer.recv(2000) for _ in range(100)]
    assert all(pkt[8] == 63 for pkt in got)  # TTL decremented on send
    c = rig.dp.counters
    assert c.tun_packets == 100 and c.udp_sends == 100
    assert c.tun_wakeups < 100, "each wake-up should drain more than one packet"
    assert c.tun_reads <= c.tun_packets + c.tun_wakeups  # one EAGAIN read at most per wake-up


async def test_budget_bounds_one_wakeup(rig: Rig):
    rig.dp.budget = 8
    for _ in range(40):
        rig.tun_app.send(ip_packet("10.5.1.2", "10.5.2.9"))
    await until(lambda: rig.dp.counters.sent_packets == 40)
    assert rig.dp.counters.tun_wakeups >= 5


async def test_udp_to_tun_only_from_peers(rig: Rig):
    stranger = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    stranger.bind(("127.0.0.1", 0))
    try:
        # the engine's peers are 127.0.0.1:<peer port>; a datagram from another port is a stranger
        stranger.sendto(ip_packet("10.5.2.7", "10.5.1.2"), rig.udp.getsockname())
        rig.peer.sendto(ip_packet("10.5.2.7", "10.5.1.2"), rig.udp.getsockname())
        rig.peer.sendto(ip_packet("10.5.9.7", "10.5.1.2"), rig.udp.getsockname())  # not the peer's subnet
        rig.peer.sendto(b"\x45garbage", rig.udp.getsockname())
        rig.peer.sendto(ip_packet("10.5.2.7", "10.5.1.2", size=1500), rig.udp.getsockname())  # > TUN MTU
        await until(lambda: rig.dp.counters.udp_packets == 5)
        rig.tun_app.settimeout(1)
        delivered = rig.tun_app.recv(2000)
        assert delivered[12:16] == socket.inet_aton("10.5.2.7") and delivered[8] == 63
        drops = rig.dp.counters.udp_drops
        assert drops[Verdict.UNKNOWN_PEER] == 1 and drops[Verdict.SPOOFED_SOURCE] == 1
        assert drops[Verdict.BAD_HEADER] + drops[Verdict.TOO_SHORT] == 1 and drops[Verdict.OVERSIZE] == 1
        assert rig.dp.counters.delivered_packets == 1
        assert rig.dp.peer_rx == {("127.0.0.1", rig.peer.getsockname()[1]): 1}
    finally:
        stranger.close()


async def test_route_events_apply_live(rig: Rig):
    rig.dp.apply(PeerRemoved(PEER_SUBNET))
    rig.tun_app.send(ip_packet("10.5.1.2", "10.5.2.9"))
    await until(lambda: rig.dp.counters.tun_drops[Verdict.NO_ROUTE] == 1)
    rig.dp.apply(Snapshot((PeerAdded(PEER_SUBNET, IPv4Address("127.0.0.1")),)))
    rig.tun_app.send(ip_packet("10.5.1.2", "10.5.2.9"))
    await until(lambda: rig.dp.counters.sent_packets == 1)


class EagainOnce:
    """A UDP socket whose first sendto reports a full send buffer (EAGAIN)."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock, self.refused = sock, 0

    def sendto(self, data, addr):
        if not self.refused:
            self.refused += 1
            raise BlockingIOError
        return self.sock.sendto(data, addr)

    def __getattr__(self, name):
        return getattr(self.sock, name)


async def test_eagain_parks_the_packet_and_pauses_reading_instead_of_spinning():
    r = Rig()
    r.dp.udp = EagainOnce(r.udp)  # type: ignore[assignment]
    r.dp.attach()
    try:
        for _ in range(3):
            r.tun_app.send(ip_packet("10.5.1.2", "10.5.2.9"))
        await until(lambda: r.dp.counters.sent_packets == 3)
        assert r.dp.counters.backpressure_pauses == 1
        assert [r.peer.recv(2000)[8] for _ in range(3)] == [63, 63, 63]  # nothing lost, order kept
        assert r.dp.counters.udp_sends == 4  # the refused attempt is counted as a syscall
    finally:
        r.close()
