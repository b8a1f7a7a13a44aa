"""The asyncio engine on loopback: a SOCK_SEQPACKET pair stands in for the TUN (one read = one packet).

No devices, no namespaces: this checks the drain loop, the budget, the counters and the
backpressure path, which the namespace tests exercise only indirectly. The ``rig`` fixture runs each
test through the Python callbacks and through the C pass; the tests that inject faults through Python
socket wrappers build a Python rig (tests/test_lone.py injects real faults into the C pass).
"""

from __future__ import annotations

import asyncio
import errno
import socket
import struct
from ipaddress import IPv4Address, IPv4Network

import pytest

from lease.events import PeerAdded, PeerRemoved, Snapshot
from tests.conftest import require_lone_pass
from tests.strategies import slow_header_checksum
from udpflannel.engine import Engine
from udpflannel.packet import Verdict, decrement_ttl
from udpflannel.perpacket import PacketMover
from udpflannel.routes import follow

OWN = IPv4Network("10.5.1.0/24")
PEER_SUBNET = IPv4Network("10.5.2.0/24")


def ip_packet(src: str, dst: str, ttl: int = 64, size: int = 60, *, df: bool = False) -> bytes:
    header = bytearray(struct.pack("!BBHHHBBH4s4s", 0x45, 0, size, 1, 0x4000 if df else 0, ttl, 17, 0,
                                   socket.inet_aton(src), socket.inet_aton(dst)))
    header[10:12] = slow_header_checksum(bytes(header)).to_bytes(2, "big")
    udp = struct.pack("!HHHH", 40000, 9999, size - 20, 0)  # UDP without a checksum: a whole transport header
    return bytes(header) + udp + bytes(i % 251 for i in range(size - 28))


class Rig:
    """tun_app <-> (tun_fd) engine (udp) <-> peer socket, all on this host's loopback."""

    def __init__(self, budget: int = 64, *, compiled: bool = False, **dataplane_args) -> None:
        self.tun_app, tun_end = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        tun_end.setblocking(False)
        self.tun_end = tun_end
        self.udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.udp.bind(("127.0.0.1", 0))
        self.udp.setblocking(False)
        self.peer = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.peer.bind(("127.0.0.1", 0))
        self.peer.settimeout(2)
        self.dp = Engine(**{"icmp_sock": None, **dataplane_args}, tun_fd=tun_end.fileno(), udp=self.udp,
                            tun_mtu=1472, tun_address=OWN.network_address,
                            budget=budget)
        self.dp.plug(PacketMover(self.dp, compiled=compiled))
        self.port = self.peer.getsockname()[1]  # every peer's UDP port
        follow(self.dp.routes, PeerAdded(PEER_SUBNET, IPv4Address("127.0.0.1")), self.port)

    def close(self) -> None:
        self.dp.detach()
        for s in (self.tun_app, self.tun_end, self.udp, self.peer):
            s.close()


@pytest.fixture(params=[False, True], ids=["python", "c"])
async def rig(request):
    """The rig through the Python callbacks, and through the C pass (udpflannel/lone.py)."""
    if request.param:
        require_lone_pass()
    r = Rig(compiled=request.param)
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
    """Removed: the next packet meets no route and nothing leaves. Back in a snapshot: the next one goes
    to the peer, one hop older. Moved to another PublicIP: the next one goes there, and only there."""
    rig.peer.setblocking(False)
    follow(rig.dp.routes, PeerRemoved(PEER_SUBNET), rig.port)
    rig.tun_app.send(ip_packet("10.5.1.2", "10.5.2.9"))
    await until(lambda: rig.dp.counters.tun_drops[Verdict.NO_ROUTE] == 1)
    with pytest.raises(BlockingIOError):
        rig.peer.recv(2000)
    follow(rig.dp.routes, Snapshot((PeerAdded(PEER_SUBNET, IPv4Address("127.0.0.1")),)), rig.port)
    first = ip_packet("10.5.1.2", "10.5.2.9", size=61)
    rig.tun_app.send(first)
    await until(lambda: rig.dp.counters.sent_packets == 1)
    assert rig.peer.recv(2000) == after_one_hop(first)
    moved = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    try:
        moved.bind(("127.0.0.2", rig.port))
        moved.settimeout(2)
        follow(rig.dp.routes, PeerAdded(PEER_SUBNET, IPv4Address("127.0.0.2")), rig.port)
        second = ip_packet("10.5.1.2", "10.5.2.9", size=62)
        rig.tun_app.send(second)
        await until(lambda: rig.dp.counters.sent_packets == 2)
        assert moved.recv(2000) == after_one_hop(second)
        with pytest.raises(BlockingIOError):
            rig.peer.recv(2000)
    finally:
        moved.close()


def after_one_hop(packet: bytes) -> bytes:
    """The packet as the per-packet path forwards it: TTL − 1, header checksum patched."""
    out = bytearray(packet)
    assert decrement_ttl(out)
    return bytes(out)


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


class NarrowPath:
    """The UDP socket as the kernel shows it once it has learnt a path MTU of ``mtu`` to the peer
    (``IP_PMTUDISC_DO``): a send with a datagram above it fails with EMSGSIZE, a GSO send when its
    segment size is above it. The datagrams it lets through go out on loopback."""

    def __init__(self, sock: socket.socket, mtu: int) -> None:
        self.sock, self.mtu, self.refused = sock, mtu, 0

    def _check(self, size: int) -> None:
        if size + 28 > self.mtu:
            self.refused += 1
            raise OSError(errno.EMSGSIZE, "Message too long")

    def sendto(self, data, address):
        self._check(len(data))
        return self.sock.sendto(data, address)

    def sendmsg(self, buffers, ancdata=(), flags=0, address=None):
        self._check(struct.unpack("=H", ancdata[0][2])[0] if ancdata else sum(len(b) for b in buffers))
        return self.sock.sendmsg(buffers, ancdata, flags, address)

    def __getattr__(self, name):
        return getattr(self.sock, name)


class IcmpRecorder:
    """Stands in for the raw ICMP socket: keeps what would have been sent."""

    def __init__(self) -> None:
        self.sent: list[tuple[bytes, tuple[str, int]]] = []

    def sendto(self, packet, address) -> int:
        self.sent.append((bytes(packet), address))
        return len(packet)


def reassemble(fragments: list[bytes]) -> bytes:
    """IPv4 fragments (in order) → the packet they were cut from (its header as the first's, MF off)."""
    header_len = (fragments[0][0] & 0x0F) * 4
    data = b"".join(f[(f[0] & 0x0F) * 4:] for f in fragments)
    header = bytearray(fragments[0][:header_len])
    struct.pack_into("!HH", header, 2, header_len + len(data), struct.unpack_from("!H", header, 4)[0])
    struct.pack_into("!H", header, 6, struct.unpack_from("!H", fragments[-1], 6)[0] & 0x2000)
    struct.pack_into("!H", header, 10, slow_header_checksum(bytes(header)))
    return bytes(header) + data


async def test_a_packet_too_big_for_the_path_is_answered_as_a_router_would():
    """The kernel learnt MTU 1400 to the peer and refuses larger sends (EMSGSIZE): a 1472-byte packet
    with DF is dropped and its sender gets ICMP frag-needed, next-hop MTU 1372, from flannel0's
    address; one without DF is fragmented to fit; smaller packets pass. Nothing counts as an error."""
    icmp_sock = IcmpRecorder()
    r = Rig(icmp_sock=icmp_sock, path_mtu=lambda peer: 1400)
    r.dp.udp = NarrowPath(r.udp, 1400)  # type: ignore[assignment]
    r.dp.attach()
    try:
        with_df, without_df = ip_packet("10.5.1.2", "10.5.2.9", size=1472, df=True), ip_packet("10.5.1.2", "10.5.2.9", size=1472)
        small = ip_packet("10.5.1.2", "10.5.2.9", size=1372, df=True)
        for packet in (with_df, without_df, small):
            r.tun_app.send(packet)
        await until(lambda: r.dp.counters.sent_packets == 3)
        [(error, address)] = icmp_sock.sent
        assert address == ("10.5.1.2", 0)
        assert error[12:16] == OWN.network_address.packed and error[20:22] == b"\x03\x04"
        assert struct.unpack_from("!H", error, 26)[0] == 1372
        assert error[28:48] == after_ttl(with_df)[:20]  # the offender quoted
        fragments = [r.peer.recv(2000) for _ in range(2)]
        assert [len(f) for f in fragments] == [1372, 120] and reassemble(fragments) == after_ttl(without_df)
        assert r.peer.recv(2000) == after_ttl(small)
        c = r.dp.counters
        assert c.tun_drops[Verdict.TOO_BIG] == 1 and c.fragmented_packets == 1 and c.send_errors == 0
        assert r.dp.path_mtus.limits == {("127.0.0.1", r.peer.getsockname()[1]): 1372}
    finally:
        r.close()


async def test_the_path_widens_when_the_kernels_mtu_goes_up():
    """Nothing pins a path low: a narrowed peer's path MTU is read again every ``pmtu_recheck`` s, and
    once the kernel's entry has expired (it reads 1500 again) our copy goes too."""
    kernel = {"mtu": 1400}
    r = Rig(path_mtu=lambda peer: kernel["mtu"], pmtu_recheck=0.02)
    r.dp.udp = NarrowPath(r.udp, 1400)  # type: ignore[assignment]
    r.dp.attach()
    try:
        r.tun_app.send(ip_packet("10.5.1.2", "10.5.2.9", size=1472, df=True))
        await until(lambda: r.dp.path_mtus.limits)
        await asyncio.sleep(0.1)  # re-read a few times, still narrow: kept
        assert list(r.dp.path_mtus.limits.values()) == [1372]
        kernel["mtu"] = 1500
        await until(lambda: not r.dp.path_mtus.limits)
    finally:
        r.close()


def after_ttl(packet: bytes) -> bytes:
    out = bytearray(packet)
    assert decrement_ttl(out)
    return bytes(out)
