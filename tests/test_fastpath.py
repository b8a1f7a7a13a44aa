"""The fast engine on loopback: a SOCK_SEQPACKET pair stands in for a TUN with IFF_VNET_HDR (one read =
vnet header + packet), real UDP sockets with UDP_SEGMENT/UDP_GRO on 127.0.0.1 for the wire.

Checks that what leaves is exactly the per-packet path's output (the kernel's segmentation with the TTL
decremented), that batches form and are counted, and the fallbacks: no GSO/GRO, EIO, EAGAIN. The
rig runs the Python callbacks (the tests set the pace's clock and inject faults through Python
socket wrappers); tests/test_lone.py runs the same kind of rig through the C pass.
"""

from __future__ import annotations

import asyncio
import errno
import socket
import struct
from ipaddress import IPv4Address, IPv4Network

import pytest

from lease.events import PeerAdded
from tests.gso_helpers import split
from tests.strategies import slow_header_checksum
from tests.test_engine import IcmpRecorder, NarrowPath, after_one_hop, ip_packet, reassemble, until
from tests.test_gso import slow_split
from tun import vnet
from udpflannel import fastpath
from udpflannel.engine import Engine
from udpflannel.fastpath import BatchMover, Features
from udpflannel.pace import QUIET_NS, Pace
from udpflannel.packet import Verdict
from udpflannel.routes import follow
from udpflannel.sockets import SOL_UDP, UDP_GRO, gso_cmsg, probe_udp_offloads

OWN = IPv4Network("10.5.1.0/24")
PEER_SUBNET = IPv4Network("10.5.2.0/24")
ALL = Features(tun_tso=True, tun_uso=True, udp_gso=True, udp_gro=True)


def tcp_flow(size: int, *, src: str = "10.5.1.2", dst: str = "10.5.2.2", ttl: int = 64, flags: int = 0x18,
             mss: int = 1420, seq: int = 1000) -> bytes:
    """A TSO super-packet with a timestamp option (data offset 8), IP ID 7."""
    payload = bytes(i * 13 % 256 for i in range(size))
    tcp = struct.pack("!HHIIBBHHH", 40000, 5201, seq, 5, 8 << 4, flags, 500, 0, 0) + b"\x01\x01\x08\x0a" + bytes(8)
    ip = bytearray(struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + len(tcp) + size, 7, 0x4000, ttl, 6, 0,
                               socket.inet_aton(src), socket.inet_aton(dst)))
    ip[10:12] = slow_header_checksum(bytes(ip)).to_bytes(2, "big")
    return bytes(ip) + tcp + payload


def tso_hdr(mss: int = 1420) -> bytes:
    return vnet.VnetHdr(vnet.NEEDS_CSUM, vnet.GSO_TCPV4, 52, mss, 20, 16).pack()


class Rig:
    """tun_app <-> (vnet-header "TUN") Engine with the batch mover (UDP, GSO/GRO) <-> peer socket on loopback."""

    def __init__(self, features: Features = ALL, *, compiled: bool = False, **dataplane_args) -> None:
        self.tun_app, self.tun_end = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        self.tun_end.setblocking(False)
        for s in (self.tun_app, self.tun_end):
            s.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 1 << 21)
            s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 21)
        self.udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.udp.bind(("127.0.0.1", 0))
        self.udp.setblocking(False)
        probe_udp_offloads(self.udp, gro=features.udp_gro)
        self.peer = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.peer.bind(("127.0.0.1", 0))
        self.peer.settimeout(2)
        self.peer.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 21)
        self.dp = Engine(**{"icmp_sock": None, **dataplane_args}, tun_fd=self.tun_end.fileno(), udp=self.udp,
                         tun_mtu=1472, tun_address=OWN.network_address)
        self.dp.plug(BatchMover(self.dp, features, compiled=compiled))
        self.port = self.peer.getsockname()[1]  # every peer's UDP port
        follow(self.dp.routes, PeerAdded(PEER_SUBNET, IPv4Address("127.0.0.1")), self.port)

    def recv_datagrams(self, count: int) -> list[bytes]:
        return [self.peer.recv(70000) for _ in range(count)]

    def close(self) -> None:
        self.dp.detach()
        for s in (self.tun_app, self.tun_end, self.udp, self.peer):
            s.close()


def read_tun(rig: Rig, count: int) -> list[bytes]:
    """``count`` packets from the engine's TUN writes, GSO units cut as the kernel would."""
    rig.tun_app.settimeout(2)
    out: list[bytes] = []
    while len(out) < count:
        data = rig.tun_app.recv(70000)
        out += split(data[10:], vnet.parse(data))
    return out


class Clock:
    """Stands in for the engine's clock: each reading ``step`` ns after the last."""

    def __init__(self, step: int) -> None:
        self.now, self.step = 0, step

    def __call__(self) -> int:
        self.now += self.step
        return self.now


@pytest.fixture(autouse=True)
def busy_clock(monkeypatch: pytest.MonkeyPatch) -> None:
    """Wake-ups 1 ns apart: every one drains its fd, whatever the test machine's speed."""
    monkeypatch.setattr(Pace, "clock", staticmethod(Clock(1)))


def quiet_clock(monkeypatch: pytest.MonkeyPatch) -> None:
    """Wake-ups far apart: a lone packet is forwarded and the engine waits for the next wake-up."""
    monkeypatch.setattr(Pace, "clock", staticmethod(Clock(QUIET_NS + 1)))


@pytest.fixture
async def rig():
    r = Rig()
    r.dp.attach()
    yield r
    r.close()


async def test_super_packets_leave_as_the_kernels_segments():
    """Two 46-segment TSO packets: 92 ordinary datagrams, TTL − 1 each, in 3 sends (the tail carried)."""
    r = Rig()
    first, second = tcp_flow(46 * 1420, flags=0x10), tcp_flow(46 * 1420, seq=1000 + 46 * 1420)
    r.tun_app.send(tso_hdr() + first)
    r.tun_app.send(tso_hdr() + second)
    r.dp.attach()
    try:
        await until(lambda: r.dp.counters.sent_packets == 92)
        expected = [after_one_hop(s) for s in slow_split(first, 1420) + slow_split(second, 1420)]
        assert r.recv_datagrams(92) == expected
        c = r.dp.counters
        assert c.tun_superpackets == 2 and c.tun_packets == 92
        assert c.udp_gso_datagrams == 92 and c.udp_sends == 3  # 1472-byte datagrams: 44 a send
    finally:
        r.close()


async def test_one_wake_up_with_super_packets_of_several_shapes():
    """Super-packets of two MSSs (two cut groups) with an ordinary packet between them, all read in
    one wake-up: every datagram is the kernel's segment, in the order read."""
    r = Rig()
    a1 = tcp_flow(30 * 500, flags=0x10, mss=500)
    a2 = tcp_flow(30 * 500, flags=0x10, mss=500, seq=1000 + 30 * 500)
    plain = tcp_flow(1000, flags=0x18, seq=1000 + 60 * 500)
    b = tcp_flow(10 * 1420, flags=0x10, seq=1000 + 60 * 500 + 1000)
    a3 = tcp_flow(7 * 500 - 123, flags=0x18, mss=500, seq=1000 + 60 * 500 + 1000 + 10 * 1420)
    plain_hdr = vnet.VnetHdr(0, 0, 0, 0, 0, 0).pack()
    for hdr, packet in [(tso_hdr(500), a1), (tso_hdr(500), a2), (plain_hdr, plain), (tso_hdr(1420), b),
                        (tso_hdr(500), a3)]:
        r.tun_app.send(hdr + packet)
    r.dp.attach()
    try:
        expected = [after_one_hop(s) for s in slow_split(a1, 500) + slow_split(a2, 500) + [plain]
                    + slow_split(b, 1420) + slow_split(a3, 500)]
        await until(lambda: r.dp.counters.sent_packets == len(expected))
        assert r.recv_datagrams(len(expected)) == expected
        assert r.dp.counters.tun_superpackets == 4 and r.dp.counters.send_errors == 0
    finally:
        r.close()


@pytest.mark.parametrize("quiet", [False, True], ids=["busy", "quiet"])
async def test_plain_packets_and_partial_checksums(quiet: bool, monkeypatch: pytest.MonkeyPatch):
    """gso NONE: NEEDS_CSUM is completed, the rest is the per-packet path. The first packet of a
    wake-up leaves at once (latency, as on the per-packet path); on a busy fd the same-size ones
    queued behind it share one send, while a quiet fd's wake-up ends with its lone packet (no read
    to EAGAIN: the event loop wakes us again for the next one, and nothing is lost)."""
    if quiet:
        quiet_clock(monkeypatch)
    r = Rig()
    ack = bytearray(tcp_flow(0, flags=0x10))
    pseudo = ack[12:20] + b"\0\x06" + struct.pack("!H", len(ack) - 20)
    ack[36:38] = (int.from_bytes(pseudo, "big") % 0xFFFF).to_bytes(2, "big")
    for _ in range(5):
        r.tun_app.send(vnet.VnetHdr(vnet.NEEDS_CSUM, 0, 0, 0, 20, 16).pack() + bytes(ack))
    r.dp.attach()
    try:
        await until(lambda: r.dp.counters.sent_packets == 5)
        assert r.recv_datagrams(5) == [after_one_hop(slow_split(tcp_flow(0, flags=0x10), 1420)[0])] * 5
        c = r.dp.counters
        if quiet:
            assert (c.tun_wakeups, c.tun_reads, c.udp_sends, c.udp_gso_datagrams) == (5, 5, 5, 0)
        else:
            assert (c.tun_wakeups, c.tun_reads, c.udp_sends, c.udp_gso_datagrams) == (1, 6, 2, 4)
    finally:
        r.close()


async def test_gro_batches_are_coalesced_into_one_tun_write(rig: Rig):
    """The peer sends 40 segments with UDP_SEGMENT; the engine's UDP_GRO receive gets them at once and
    writes one GSO_TCPV4 super-packet, whose segments are the originals with TTL − 1."""
    packet = tcp_flow(40 * 1420, src="10.5.2.2", dst="10.5.1.2", flags=0x10)
    segments = slow_split(packet, 1420)
    rig.peer.sendmsg([b"".join(segments)], gso_cmsg(len(segments[0])), 0, rig.udp.getsockname())
    await until(lambda: rig.dp.counters.delivered_packets == 40)
    data = rig.tun_app.recv(70000)
    hdr = vnet.parse(data)
    assert hdr.gso_type == vnet.GSO_TCPV4 and hdr.gso_size == 1420
    assert split(data[10:], hdr) == [after_one_hop(s) for s in segments]
    c = rig.dp.counters
    assert c.udp_gro_recvs == 1 and c.udp_gro_datagrams == 40 and c.tun_gso_writes == 1 and c.tun_writes == 1
    assert rig.dp.peer_rx == {("127.0.0.1", rig.peer.getsockname()[1]): 40}


async def test_no_fd_is_quiet_while_batches_move(monkeypatch: pytest.MonkeyPatch):
    """Right after a super-packet was cut, lone packets are the bulk flows' ACKs: however far apart
    the wake-ups, each one drains its fd, so none waits behind the next batch's processing."""
    quiet_clock(monkeypatch)
    r = Rig()
    r.tun_app.send(tso_hdr() + tcp_flow(10 * 1420, flags=0x10))
    r.dp.attach()
    try:
        await until(lambda: r.dp.counters.sent_packets == 10)
        ack = tcp_flow(0, flags=0x10)
        for _ in range(3):
            r.tun_app.send(vnet.PLAIN + ack)
        await until(lambda: r.dp.counters.sent_packets == 13)
        c = r.dp.counters
        assert (c.tun_wakeups, c.tun_reads) == (2, 6)  # each wake-up read on to EAGAIN
    finally:
        r.close()


@pytest.mark.parametrize("quiet", [False, True], ids=["busy", "quiet"])
async def test_lone_datagrams_on_a_quiet_socket(quiet: bool, monkeypatch: pytest.MonkeyPatch):
    """Three datagrams, sent one by one: a busy socket is drained in one wake-up (the three merged into
    one write); a quiet one gets a wake-up per datagram, each written at once, none read to EAGAIN."""
    if quiet:
        quiet_clock(monkeypatch)
    r = Rig()
    segments = slow_split(tcp_flow(3 * 1420, src="10.5.2.2", dst="10.5.1.2", flags=0x10), 1420)
    for s in segments:
        r.peer.sendto(s, r.udp.getsockname())
    r.dp.attach()
    try:
        await until(lambda: r.dp.counters.delivered_packets == 3)
        assert read_tun(r, 3) == [after_one_hop(s) for s in segments]
        c = r.dp.counters
        if quiet:
            assert (c.udp_wakeups, c.udp_recvs, c.tun_writes) == (3, 3, 3)
        else:
            assert (c.udp_wakeups, c.udp_recvs, c.tun_writes) == (1, 4, 2)  # the first alone, then two merged
    finally:
        r.close()


async def test_gro_rows_keep_per_packet_verdicts(rig: Rig):
    """A batch with a spoofed row and a damaged row: those two get the per-packet verdicts, the rest is
    merged around them, in order."""
    segments = slow_split(tcp_flow(10 * 1420, src="10.5.2.2", dst="10.5.1.2", flags=0x10), 1420)
    spoofed = bytearray(segments[3])
    spoofed[12:16] = socket.inet_aton("10.5.9.9")
    spoofed[10:12] = b"\0\0"
    spoofed[10:12] = slow_header_checksum(bytes(spoofed)).to_bytes(2, "big")
    segments[3] = bytes(spoofed)
    damaged = bytearray(segments[6])
    damaged[11] ^= 0xFF  # IP header checksum
    segments[6] = bytes(damaged)
    rig.peer.sendmsg([b"".join(segments)], gso_cmsg(len(segments[0])), 0, rig.udp.getsockname())
    await until(lambda: rig.dp.counters.udp_packets == 10 and rig.dp.counters.tun_writes >= 3)
    drops = rig.dp.counters.udp_drops
    assert drops[Verdict.SPOOFED_SOURCE] == 1 and drops[Verdict.BAD_CHECKSUM] == 1
    assert read_tun(rig, 8) == [after_one_hop(s) for i, s in enumerate(segments) if i not in (3, 6)]


async def test_ttl_expiry_of_a_super_packet_is_one_packets():
    """TTL 1 on a TSO packet: dropped as the per-packet path would, one ICMP error about segment 0."""
    r = Rig()
    sent: list[bytes] = []
    r.dp.send_icmp = sent.append  # type: ignore[method-assign]
    r.dp.attach()
    try:
        packet = tcp_flow(5 * 1420, ttl=1)
        r.tun_app.send(tso_hdr() + packet)
        await until(lambda: r.dp.counters.tun_drops[Verdict.TTL_EXPIRED] == 1)
        [icmp] = sent
        assert icmp is not None and icmp[20] == 11  # time exceeded
        assert icmp[28:28 + 28] == slow_split(packet, 1420)[0][:28]  # quotes the first segment
        assert r.dp.counters.sent_packets == 0
    finally:
        r.close()


async def test_a_refused_super_packet_does_not_disturb_the_ones_before_it():
    """A wake-up reads a good burst (its datagrams still waiting for a fuller send) and then one with
    TTL 1: the refused one is cut again to quote its first segment, and that must not overwrite the
    waiting datagrams."""
    r = Rig()
    sent: list[bytes] = []
    r.dp.send_icmp = sent.append  # type: ignore[method-assign]
    good = tcp_flow(10 * 1420, flags=0x10)
    expired = tcp_flow(5 * 1420, ttl=1, seq=1000 + 10 * 1420)
    r.tun_app.send(tso_hdr() + good)
    r.tun_app.send(tso_hdr() + expired)
    r.dp.attach()
    try:
        await until(lambda: r.dp.counters.sent_packets == 10 and r.dp.counters.tun_drops[Verdict.TTL_EXPIRED] == 1)
        assert r.recv_datagrams(10) == [after_one_hop(s) for s in slow_split(good, 1420)]
        [icmp] = sent
        assert icmp is not None and icmp[28:28 + 28] == slow_split(expired, 1420)[0][:28]
    finally:
        r.close()


def send_bursts(r: Rig, count: int, *, first: int = 0) -> list[bytes]:
    """Bursts ``first .. first+count-1`` of one flow (30 segments of 1420 bytes each) into the TUN."""
    bursts = [tcp_flow(30 * 1420, seq=1000 + (first + i) * 30 * 1420, flags=0x10) for i in range(count)]
    for burst in bursts:
        r.tun_app.send(tso_hdr() + burst)
    return bursts


class Refusing:
    """A UDP socket whose sends fail with ``error``: all GSO sends (``gso_only``), or just the first."""

    def __init__(self, sock: socket.socket, error: OSError, *, gso_only: bool) -> None:
        self.sock, self.error, self.gso_only, self.refused = sock, error, gso_only, 0

    def sendmsg(self, buffers, ancdata=(), flags=0, address=None):
        if (ancdata if self.gso_only else not self.refused):
            self.refused += 1
            raise self.error
        return self.sock.sendmsg(buffers, ancdata, flags, address)

    def __getattr__(self, name):
        return getattr(self.sock, name)


@pytest.mark.parametrize("error, gso_only", [(OSError(errno.EIO, "EIO"), True), (BlockingIOError(), False)],
                         ids=["eio-on-gso", "eagain-once"])
async def test_refused_sends_lose_nothing(error: OSError, gso_only: bool):
    """EIO on GSO sends (an egress device that cannot checksum, older kernels): GSO off for good, said
    once, datagrams one by one. EAGAIN: the batch is parked, the TUN paused, the order kept."""
    r = Rig()
    r.dp.udp = Refusing(r.udp, error, gso_only=gso_only)  # type: ignore[assignment]
    r.dp.attach()
    try:
        packets = send_bursts(r, 3)
        await until(lambda: r.dp.counters.sent_packets == 90)
        assert r.recv_datagrams(90) == [after_one_hop(s) for p in packets for s in slow_split(p, 1420)]
        assert r.dp.udp.refused == 1
        if gso_only:
            assert r.dp.counters.udp_gso_fallbacks == 1 and r.dp.counters.udp_gso_sends == 0
        else:
            assert r.dp.counters.backpressure_pauses == 1
    finally:
        r.close()


async def test_without_gso_and_gro_the_results_are_the_same():
    r = Rig(Features(tun_tso=True, udp_gso=False, udp_gro=False))
    r.dp.attach()
    try:
        packet = tcp_flow(20 * 1420, flags=0x10)
        r.tun_app.send(tso_hdr() + packet)
        await until(lambda: r.dp.counters.sent_packets == 20)
        assert r.recv_datagrams(20) == [after_one_hop(s) for s in slow_split(packet, 1420)]
        assert r.dp.counters.udp_sends == 20 and r.dp.counters.udp_gso_sends == 0
        assert r.udp.getsockopt(SOL_UDP, UDP_GRO) == 0
        inbound = slow_split(tcp_flow(4 * 1420, src="10.5.2.2", dst="10.5.1.2"), 1420)
        for s in inbound:
            r.peer.sendto(s, r.udp.getsockname())
        await until(lambda: r.dp.counters.delivered_packets == 4)
        # one datagram per receive, but consecutive ones of a flow are still merged on the way out
        assert read_tun(r, 4) == [after_one_hop(s) for s in inbound]
    finally:
        r.close()


def test_features_describe_and_disable():
    from tun.offload import TunOffloads
    from udpflannel.sockets import UdpOffloads

    f = Features.from_probes(TunOffloads(tso=True, uso=False), UdpOffloads(gso=True, gro=True),
                             disabled=frozenset({"udp_gro"}))
    assert f == Features(tun_tso=True, tun_uso=False, udp_gso=True, udp_gro=False)
    assert f.describe() == "tun tso on, tun uso off, udp gso on, udp gro off"


async def test_a_full_tun_parks_the_rest_and_pauses_the_socket():
    """The "TUN" takes two super-packets at a time (small socket buffers): writes hit EAGAIN, the rest
    of what was received is decided, copied and parked, reading stops, and everything arrives in order."""
    r = Rig()
    r.tun_end.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 32768)
    r.udp.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 21)
    segments = []
    for k in range(4):  # four GSO sends of 40 segments, all queued before the engine looks
        burst = slow_split(tcp_flow(40 * 1420, src="10.5.2.2", dst="10.5.1.2", flags=0x10,
                                    seq=1000 + k * 40 * 1420), 1420)
        r.peer.sendmsg([b"".join(burst)], gso_cmsg(len(burst[0])), 0, r.udp.getsockname())
        segments += burst
    r.dp.attach()
    try:
        await until(lambda: r.dp.counters.backpressure_pauses >= 1)
        got: list[bytes] = []
        r.tun_app.setblocking(False)
        for _ in range(2000):  # bounded: drain while the engine refills
            try:
                data = r.tun_app.recv(70000)
            except BlockingIOError:
                await asyncio.sleep(0.005)
                continue
            got += split(data[10:], vnet.parse(data))
            if len(got) >= 160:
                break
        # IDs restart at 7 in every burst here, so bursts are written apart but each stays whole
        assert got == [after_one_hop(s) for s in segments]
        assert r.dp.counters.delivered_packets == 160 and r.dp.counters.tun_write_errors == 0
    finally:
        r.close()


def test_only_the_fast_path_loads_the_compiled_kernels() -> None:
    """tun.kernels.load() is lazy: the daemon's modules import without the C extension (a
    ``--no-fast-path`` node never loads it), and the first Segmenter loads it where it is built."""
    import subprocess
    import sys

    code = ("import sys, udpflannel.cli, udpflannel.node; assert 'tun._gso_c' not in sys.modules, 'imported early'\n"
            "from tun import gso, kernels\n"
            "print(gso.Segmenter(gso.BUFFER_SIZE).jit, kernels.load() is not None, 'tun._gso_c' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    from tun import kernels

    loaded = kernels.load() is not None
    assert out.stdout.split() == [str(loaded)] * 3


# -- a narrower path to the peer -------------------------------------------------------------------------


def narrow_rig(**kwargs) -> tuple[Rig, IcmpRecorder]:
    """A rig whose kernel has learnt MTU 1400 to the peer: larger sends fail with EMSGSIZE."""
    icmp_sock = IcmpRecorder()
    r = Rig(icmp_sock=icmp_sock, path_mtu=lambda peer: 1400, **kwargs)
    r.dp.udp = NarrowPath(r.udp, 1400)  # type: ignore[assignment]
    return r, icmp_sock


def frag_needed_mtus(icmp_sock: IcmpRecorder) -> list[tuple[str, int]]:
    """(destination, next-hop MTU) of each ICMP frag-needed sent, from flannel0's address."""
    out = []
    for error, (dst, _) in icmp_sock.sent:
        assert error[12:16] == OWN.network_address.packed and error[20:22] == b"\x03\x04"
        out.append((dst, struct.unpack_from("!H", error, 26)[0]))
    return out


@pytest.mark.parametrize("features", [ALL, Features(tun_tso=True, udp_gso=False, udp_gro=False)], ids=["gso", "no-gso"])
async def test_a_refused_send_is_cut_to_fit_and_the_next_super_packets_before_they_are_sent(features: Features):
    """The kernel learns a narrower path (1400) than the one we cut for: the first send fails with
    EMSGSIZE. Nothing is lost: its datagrams are each cut to fit (1472 → 1372 + 152) and sent, and
    the pod is told (frag-needed, 1372). Super-packets read afterwards are cut at the narrower size at
    once (1320-byte segments), before any send. Nothing counts as an error."""
    r, icmp_sock = narrow_rig(features=features)
    r.dp.attach()
    try:
        first = send_bursts(r, 3)
        await until(lambda: r.dp.counters.sent_packets == 180)
        assert r.recv_datagrams(180) == [t for p in first for s in slow_split(p, 1420)
                                         for t in slow_split(after_one_hop(s), 1320)]
        assert frag_needed_mtus(icmp_sock)[0] == ("10.5.1.2", 1372)
        c = r.dp.counters
        assert c.send_errors == 0 and c.pmtu_refits >= 1 and r.dp.udp.refused >= 1
        refused = r.dp.udp.refused
        later = send_bursts(r, 2, first=3)
        await until(lambda: r.dp.counters.sent_packets == 180 + 2 * 33)
        assert r.recv_datagrams(66) == [after_one_hop(s) for p in later for s in slow_split(p, 1320)]
        assert r.dp.udp.refused == refused  # cut before sending: nothing more refused
        assert c.pmtu_cuts >= 2 and c.send_errors == 0
    finally:
        r.close()


async def test_super_packets_for_a_narrow_peer_are_cut_and_the_sender_told_at_a_bounded_rate():
    """A peer known to be behind MTU 1400: 40 super-packets of 1420-byte segments leave as 1320-byte
    ones (52 bytes of headers: 1372 in all), and the sender hears frag-needed (1372), but no more than
    the advice burst allows, whatever the number of packets cut."""
    r, icmp_sock = narrow_rig()
    r.dp.path_mtus.learn(("127.0.0.1", r.peer.getsockname()[1]), 1400)
    r.dp.attach()
    try:
        packets = [tcp_flow(10 * 1420, seq=1000 + i * 10 * 1420, flags=0x10) for i in range(40)]
        for p in packets:
            r.tun_app.send(tso_hdr() + p)
        await until(lambda: r.dp.counters.sent_packets == 40 * 11)
        assert r.recv_datagrams(40 * 11) == [after_one_hop(s) for p in packets for s in slow_split(p, 1320)]
        advice = frag_needed_mtus(icmp_sock)
        assert advice and set(advice) == {("10.5.1.2", 1372)}
        assert len(advice) <= fastpath.PMTU_ADVICE_BURST + 1
        assert r.dp.counters.pmtu_cuts == 40 and r.dp.udp.refused == 0
    finally:
        r.close()


async def test_what_cannot_be_cut_is_answered_as_a_router_would():
    """Plain UDP packets too big for the path (the fast path's lone-packet send is refused): with DF,
    dropped and answered with frag-needed; without DF, fragmented to fit."""
    r, icmp_sock = narrow_rig()
    r.dp.attach()
    try:
        with_df = ip_packet("10.5.1.2", "10.5.2.9", size=1472, df=True)
        without_df = ip_packet("10.5.1.2", "10.5.2.9", size=1472)
        for packet in (with_df, without_df):
            r.tun_app.send(vnet.PLAIN + packet)
        await until(lambda: r.dp.counters.sent_packets == 2)
        assert frag_needed_mtus(icmp_sock) == [("10.5.1.2", 1372)]
        assert reassemble(r.recv_datagrams(2)) == after_one_hop(without_df)
        c = r.dp.counters
        assert c.tun_drops[Verdict.TOO_BIG] == 1 and c.fragmented_packets == 1 and c.send_errors == 0
    finally:
        r.close()


# -- oversize on the way in ------------------------------------------------------------------------------


@pytest.mark.parametrize("quiet", [False, True], ids=["busy", "quiet"])
async def test_datagrams_and_gro_rows_larger_than_the_tun_mtu_are_dropped_and_counted(quiet: bool,
                                                                                       monkeypatch: pytest.MonkeyPatch):
    """As on the per-packet path: a 1500-byte datagram (flannel0 takes 1472) is dropped whole and counted
    as ``oversize``, alone (the wake-up's first receive) and as the rows of a GRO batch; a good batch
    after them is written as ever, and nothing else reaches the TUN."""
    if quiet:
        quiet_clock(monkeypatch)
    r = Rig()
    r.dp.attach()
    try:
        to_us = r.udp.getsockname()
        big = slow_split(tcp_flow(11 * 1448, src="10.5.2.2", dst="10.5.1.2", flags=0x10), 1448)
        assert {len(s) for s in big} == {1500}
        r.peer.sendto(big[0], to_us)
        await until(lambda: r.dp.counters.udp_drops[Verdict.OVERSIZE] == 1)
        r.peer.sendmsg([b"".join(big[1:])], gso_cmsg(1500), 0, to_us)
        await until(lambda: r.dp.counters.udp_drops[Verdict.OVERSIZE] == 11)
        good = slow_split(tcp_flow(3 * 1420, src="10.5.2.2", dst="10.5.1.2", flags=0x10, seq=99), 1420)
        r.peer.sendmsg([b"".join(good)], gso_cmsg(1472), 0, to_us)
        await until(lambda: r.dp.counters.delivered_packets == 3)
        assert read_tun(r, 3) == [after_one_hop(s) for s in good]
        assert nothing_more_on(r.tun_app)
        c = r.dp.counters
        assert c.udp_packets == 14 and c.udp_drops[Verdict.OVERSIZE] == 11 and c.tun_write_errors == 0
    finally:
        r.close()


class SmallRoom:
    """The UDP socket as if the engine's receive room were ``room`` bytes: a larger datagram or GRO batch
    comes back cut short and flagged MSG_TRUNC by the kernel."""

    def __init__(self, sock: socket.socket, room: int) -> None:
        self.sock, self.room = sock, room

    def recvmsg_into(self, buffers, ancbufsize=0, flags=0):
        return self.sock.recvmsg_into([memoryview(b)[:self.room] for b in buffers], ancbufsize, flags)

    def __getattr__(self, name):
        return getattr(self.sock, name)


async def test_a_truncated_receive_is_dropped_and_counted_never_written():
    """MSG_TRUNC — a datagram or GRO batch larger than the room it was received into — is dropped and
    counted as ``oversize``, never written to the TUN cut short; what fits after it goes through."""
    r = Rig()
    r.dp.udp = SmallRoom(r.udp, 8000)  # type: ignore[assignment]
    r.dp.attach()
    try:
        to_us = r.udp.getsockname()
        segments = slow_split(tcp_flow(10 * 1420, src="10.5.2.2", dst="10.5.1.2", flags=0x10), 1420)
        r.peer.sendmsg([b"".join(segments)], gso_cmsg(1472), 0, to_us)  # 14,720 bytes: one GRO batch
        r.peer.sendto(ip_packet("10.5.2.7", "10.5.1.2", size=9000), to_us)  # one datagram
        await until(lambda: r.dp.counters.udp_drops[Verdict.OVERSIZE] == 2)
        r.peer.sendto(segments[0], to_us)
        await until(lambda: r.dp.counters.delivered_packets == 1)
        assert read_tun(r, 1) == [after_one_hop(segments[0])]
        assert nothing_more_on(r.tun_app)
        assert r.dp.counters.tun_writes == 1
    finally:
        r.close()


def nothing_more_on(sock: socket.socket) -> bool:
    sock.settimeout(0.2)
    try:
        sock.recv(70000)
    except TimeoutError:
        return True
    return False


async def test_an_empty_datagram_is_too_short_however_it_is_received():
    """A zero-byte datagram is ``too_short``, as the per-packet decision says, whether it is a wake-up's
    first receive or one the batch loop reads after it (it used to be counted there as ``oversize``)."""
    r = Rig()
    to_us = r.udp.getsockname()
    for _ in range(3):
        r.peer.sendto(b"", to_us)
    r.dp.attach()
    try:
        await until(lambda: r.dp.counters.udp_packets == 3)
        drops = r.dp.counters.udp_drops
        assert (drops[Verdict.TOO_SHORT], drops[Verdict.OVERSIZE]) == (3, 0)
        assert r.dp.counters.udp_recvs >= 3 and nothing_more_on(r.tun_app)
    finally:
        r.close()


# -- many flows, many peers (issue 18) ------------------------------------------------------------------


async def test_super_packets_of_four_flows_to_one_peer_share_sends():
    """4 flows' TSO packets of 11 full segments each, read in one wake-up: their datagrams are all
    1472 bytes, so they chain into one UDP_SEGMENT batch of 44 (as many as 64 KB holds): 1 send."""
    r = Rig()
    flows = [tcp_flow(11 * 1420, src=f"10.5.1.{2 + i}", flags=0x10) for i in range(4)]
    for packet in flows:
        r.tun_app.send(tso_hdr() + packet)
    r.dp.attach()
    try:
        await until(lambda: r.dp.counters.sent_packets == 44)
        assert r.recv_datagrams(44) == [after_one_hop(s) for packet in flows for s in slow_split(packet, 1420)]
        c = r.dp.counters
        assert (c.udp_sends, c.udp_gso_sends, c.udp_gso_datagrams) == (1, 1, 44)
        assert c.batches()["udp_send"] == 44.0
    finally:
        r.close()


async def test_super_packets_interleaved_to_three_peers_take_one_send_per_peer():
    """Two rounds of super-packets to 3 peers, interleaved (1, 2, 3, 1, 2, 3): each peer's batch
    gathers its datagrams across the others' (one destination per sendmsg): 3 sends, each peer's
    datagrams in the order read."""
    r = Rig()
    peers = [r.peer] + [socket.socket(socket.AF_INET, socket.SOCK_DGRAM) for _ in range(2)]
    try:
        for i, peer in enumerate(peers[1:], start=3):
            peer.bind(("127.0.0.1", 0))
            peer.settimeout(2)
            peer.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 21)
            follow(r.dp.routes, PeerAdded(IPv4Network(f"10.5.{i}.0/24"), IPv4Address("127.0.0.1")),
                   peer.getsockname()[1])
        sent = {i: [] for i in range(3)}
        for round_ in range(2):
            for i in range(3):
                packet = tcp_flow(10 * 1420, dst=f"10.5.{2 + i}.2", flags=0x10, seq=1000 + round_ * 10 * 1420)
                r.tun_app.send(tso_hdr() + packet)
                sent[i] += slow_split(packet, 1420)
        r.dp.attach()
        await until(lambda: r.dp.counters.sent_packets == 60)
        for i, peer in enumerate(peers):
            assert [peer.recv(70000) for _ in range(20)] == [after_one_hop(s) for s in sent[i]]
        assert (r.dp.counters.udp_sends, r.dp.counters.udp_gso_datagrams) == (3, 60)
    finally:
        for peer in peers[1:]:
            peer.close()
        r.close()


async def test_interleaved_flows_in_one_gro_batch_are_one_tun_write_each(rig: Rig):
    """The peer sends 4 flows' segments interleaved (a1 b1 c1 d1 a2 ...) in one UDP_SEGMENT send; the
    engine receives them as one GRO batch and writes each flow as one GSO_TCPV4 super-packet."""
    flows = [slow_split(tcp_flow(10 * 1420, src="10.5.2.2", dst=f"10.5.1.{2 + i}", flags=0x10), 1420)
             for i in range(4)]
    rig.peer.sendmsg([b"".join(f[k] for k in range(10) for f in flows)], gso_cmsg(1472), 0, rig.udp.getsockname())
    await until(lambda: rig.dp.counters.delivered_packets == 40)
    writes = [rig.tun_app.recv(70000) for _ in range(4)]
    got = {}
    for data in writes:
        hdr = vnet.parse(data)
        assert hdr.gso_type == vnet.GSO_TCPV4
        segments = split(data[10:], hdr)
        got[segments[0][16:20]] = segments
    assert got == {f[0][16:20]: [after_one_hop(s) for s in f] for f in flows}
    c = rig.dp.counters
    assert (c.udp_gro_recvs, c.tun_writes, c.tun_gso_writes, c.tun_gso_segments) == (1, 4, 4, 40)
    assert (c.gro_flows, c.gro_breaks, c.gro_refused) == (4, 0, 0)
    assert c.batches()["tun_write"] == 10.0
