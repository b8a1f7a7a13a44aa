"""The packet trace's sans-IO parts: the event builder (``udpflannel.tracing``), its filters, the hub's
bounded queues (``udpflannel.tracehub``, no I/O needed: an engine stand-in with a real socket) and the
pcapng writer (``udpflannel.pcapng``), read back by tcpdump, a real reader."""

from __future__ import annotations

import asyncio
import json
import shutil
import socket
import struct
import subprocess
from ipaddress import IPv4Address, IPv4Network
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from tests.conftest import require
from tests.strategies import ipv4_packets, slow_checksum, slow_header_checksum
from udpflannel.counters import Counters
from udpflannel.forward import inbound, outbound
from udpflannel.packet import (
    FORWARD,
    NO_ROUTE,
    SPOOFED_SOURCE,
    TTL_EXPIRED,
    internet_checksum,
    ipv4_header_checksum,
)
from udpflannel.pcapng import (
    BYTE_ORDER_MAGIC,
    EPB_TYPE,
    IDB_TYPE,
    LINKTYPE_IPV4,
    SHB_TYPE,
    PcapngWriter,
    packet_block,
)
from udpflannel.routes import RouteTable
from udpflannel.tracehub import TraceClient, TraceHub
from udpflannel.tracing import (
    TraceFilter,
    inbound_event,
    outbound_event,
    outer_datagram,
    with_ttl_restored,
)

LOCAL = ("198.18.0.1", 8285)
PEER = ("198.18.0.2", 8285)


def routes() -> RouteTable:
    return RouteTable([(IPv4Network("10.5.2.0/24"), PEER)])


def echo(src: str = "10.5.1.2", dst: str = "10.5.2.2", *, ttl: int = 63, seq: int = 1, kind: int = 8) -> bytearray:
    """An ICMP echo request (or reply) of 84 bytes with valid checksums, as ping sends it."""
    body = struct.pack("!BBHHH", kind, 0, 0, 7, seq) + bytes(range(56))
    body = body[:2] + internet_checksum(body).to_bytes(2, "big") + body[4:]
    header = bytearray(struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + len(body), 1, 0x4000, ttl, 1, 0,
                                   IPv4Address(src).packed, IPv4Address(dst).packed))
    header[10:12] = ipv4_header_checksum(header).to_bytes(2, "big")
    return header + body


def tcp(src: str, dst: str, sport: int, dport: int) -> bytearray:
    header = bytearray(struct.pack("!BBHHHBBH4s4s", 0x45, 0, 40, 1, 0, 64, 6, 0, IPv4Address(src).packed,
                                   IPv4Address(dst).packed))
    return header + struct.pack("!HHIIBBHHH", sport, dport, 0, 0, 0x50, 0x10, 1000, 0, 0)


# -- the event builder -----------------------------------------------------------------------------------
def test_outbound_event_names_each_step_of_a_forwarded_ping():
    pkt = echo()
    verdict, hop = outbound(pkt, len(pkt), routes())
    event = outbound_event(pkt, len(pkt), verdict, hop, routes=routes(), local=LOCAL)
    steps = dict(event.steps)
    assert [name for name, _ in event.steps] == ["tun read", "route", "ttl", "encap", "verdict"]
    assert steps["tun read"] == "flannel0 → daemon: 10.5.1.2 > 10.5.2.2 icmp echo request id 7 seq 1, 84 bytes"
    assert steps["route"] == "10.5.2.2 in 10.5.2.0/24 → node 198.18.0.2:8285"
    assert steps["ttl"].startswith("63 → 62")
    assert steps["encap"] == "UDP 198.18.0.1:8285 → 198.18.0.2:8285, datagram 112 bytes (IPv4 20 + UDP 8 + 84)"
    assert steps["verdict"] == "FORWARD: sent to 198.18.0.2:8285"
    assert event.inner == bytes(echo())  # as on flannel0: before the TTL step
    assert event.payloads == (bytes(pkt),)  # as sent: after it


def test_outbound_event_of_an_unleased_destination_says_no_route_and_the_icmp_answer():
    pkt = echo(dst="10.5.0.77")
    verdict, hop = outbound(pkt, len(pkt), routes())
    event = outbound_event(pkt, len(pkt), verdict, hop, routes=routes(), local=LOCAL)
    assert verdict == NO_ROUTE and event.verdict == "NO_ROUTE" and event.payloads == ()
    steps = dict(event.steps)
    assert steps["route"] == "10.5.0.77 is in no leased subnet"
    assert "ICMP net-unreachable sent to 10.5.1.2" in steps["verdict"] and 'reason="no_route"' in steps["verdict"]


def test_outbound_event_of_a_ttl_running_out_stops_at_the_ttl_step():
    pkt = echo(ttl=1)
    verdict, hop = outbound(pkt, len(pkt), routes())
    event = outbound_event(pkt, len(pkt), verdict, hop, routes=routes(), local=LOCAL)
    assert verdict == TTL_EXPIRED
    assert [name for name, _ in event.steps] == ["tun read", "route", "ttl", "verdict"]
    assert "ICMP time-exceeded" in dict(event.steps)["verdict"]


def test_outbound_event_of_a_super_packet_counts_its_segments_and_datagrams():
    pkt = echo()
    verdict, hop = outbound(pkt, len(pkt), routes())
    segments = (b"a" * 1472, b"b" * 1472, b"c" * 500)
    event = outbound_event(pkt, len(pkt), verdict, hop, routes=routes(), local=LOCAL, gso=(1, 1432), segments=segments)
    steps = dict(event.steps)
    assert "super-packet" in steps["tun read"] and "GSO_TCPV4 gso_size 1432, cut into 3 segments" in steps["tun read"]
    assert "3 datagrams of 1500 bytes (last 528), sent in UDP_SEGMENT batches" in steps["encap"]
    assert event.payloads == segments and len(event.outer()) == 3


def test_inbound_event_names_each_receive_step_of_a_forwarded_reply():
    pkt = echo(src="10.5.2.2", dst="10.5.1.2", kind=0)
    verdict = inbound(pkt, len(pkt), PEER, routes(), tun_mtu=1472, check_source=True)
    event = inbound_event(pkt, len(pkt), verdict, PEER, routes=routes(), local=LOCAL, tun_mtu=1472)
    assert verdict == FORWARD
    assert [name for name, _ in event.steps] == ["udp recv", "decap", "peer", "checks", "ttl", "tun write", "verdict"]
    steps = dict(event.steps)
    assert steps["udp recv"].startswith("198.18.0.2:8285 → 198.18.0.1:8285, datagram 112 bytes")
    assert steps["peer"] == "198.18.0.2:8285 holds 10.5.2.0/24; inner source 10.5.2.2 inside it"
    assert steps["ttl"].startswith("63 → 62")
    assert steps["verdict"] == "FORWARD: written to flannel0"
    assert event.payloads == (bytes(echo(src="10.5.2.2", dst="10.5.1.2", kind=0)),)  # as received
    assert event.inner == bytes(pkt)  # as written to flannel0


def test_inbound_event_of_a_spoofed_source_stops_at_the_peer_step_with_its_verdict():
    pkt = echo(src="10.5.9.9", dst="10.5.1.2", kind=0)
    verdict = inbound(pkt, len(pkt), PEER, routes(), tun_mtu=1472, check_source=True)
    event = inbound_event(pkt, len(pkt), verdict, PEER, routes=routes(), local=LOCAL, tun_mtu=1472)
    assert verdict == SPOOFED_SOURCE and event.inner == b""
    assert [name for name, _ in event.steps] == ["udp recv", "decap", "peer", "verdict"]
    assert dict(event.steps)["peer"].endswith("inner source 10.5.9.9: SPOOFED_SOURCE")


def test_inbound_event_of_a_bad_transport_checksum_stops_at_the_checks_step():
    pkt = echo(src="10.5.2.2", dst="10.5.1.2", kind=0)
    pkt[-1] ^= 0xFF
    verdict = inbound(pkt, len(pkt), PEER, routes(), tun_mtu=1472, check_source=True)
    event = inbound_event(pkt, len(pkt), verdict, PEER, routes=routes(), local=LOCAL, tun_mtu=1472)
    assert event.verdict == "BAD_L4_CHECKSUM"
    assert [name for name, _ in event.steps][-2:] == ["checks", "verdict"]


@given(ipv4_packets(), st.booleans())
def test_events_are_built_for_any_packet_without_raising(pkt, out):
    n = len(pkt)
    if out:
        verdict, hop = outbound(pkt, n, routes())
        event = outbound_event(pkt, n, verdict, hop, routes=routes(), local=LOCAL)
    else:
        verdict = inbound(pkt, n, PEER, routes(), tun_mtu=1472, check_source=False)
        event = inbound_event(pkt, n, verdict, PEER, routes=routes(), local=LOCAL, tun_mtu=1472)
    assert event.verdict == verdict.name and event.steps[-1][0] == "verdict"


@given(ipv4_packets(), st.integers(2, 255))
def test_ttl_restored_is_the_packet_before_the_decrement(pkt, ttl):
    pkt[8] = ttl
    pkt[10:12] = ipv4_header_checksum(pkt).to_bytes(2, "big")
    before = bytes(pkt)
    pkt[8] -= 1
    pkt[10:12] = ipv4_header_checksum(pkt).to_bytes(2, "big")
    assert with_ttl_restored(pkt, len(pkt)) == before


@given(st.binary(max_size=1500), st.integers(1, 0xFFFF), st.integers(1, 0xFFFF))
def test_outer_datagram_has_valid_ip_and_udp_checksums_and_carries_the_payload(payload, sport, dport):
    d = outer_datagram(("198.18.0.1", sport), ("198.18.0.2", dport), payload)
    assert slow_header_checksum(d[:20]) == int.from_bytes(d[10:12], "big")
    assert d[6] & 0x40 and d[9] == 17 and int.from_bytes(d[2:4], "big") == len(d) == 28 + len(payload)
    pseudo = d[12:20] + struct.pack("!BBH", 0, 17, 8 + len(payload))
    assert slow_checksum(pseudo + d[20:]) in (0, 0xFFFF) and d[28:] == payload
    assert struct.unpack("!HH", d[20:24]) == (sport, dport)


# -- filters -------------------------------------------------------------------------------------------
@pytest.mark.parametrize(("query", "packet", "peer", "verdict", "wanted"), [
    ({}, echo(), "198.18.0.2", 0, True),
    ({"host": "10.5.2.2"}, echo(), None, 0, True),
    ({"host": "10.5.1.0/24"}, echo(), None, 0, True),
    ({"host": "192.0.2.1"}, echo(), None, 0, False),
    ({"proto": "icmp"}, echo(), None, 0, True),
    ({"proto": "tcp"}, echo(), None, 0, False),
    ({"port": "5201"}, tcp("10.5.1.2", "10.5.2.2", 40000, 5201), None, 0, True),
    ({"port": "5201"}, tcp("10.5.1.2", "10.5.2.2", 40000, 80), None, 0, False),
    ({"port": "5201"}, echo(), None, 0, False),
    ({"peer": "198.18.0.2"}, echo(), "198.18.0.2", 0, True),
    ({"peer": "198.18.0.3"}, echo(), "198.18.0.2", 0, False),
    ({"drops": "1"}, echo(), None, 0, False),
    ({"drops": "1"}, echo(), None, int(NO_ROUTE), True),
    ({"proto": "6", "host": "10.5.2.2"}, tcp("10.5.1.2", "10.5.2.2", 1, 2), None, 0, True),
])
def test_filter_keeps_exactly_the_packets_asked_for(query, packet, peer, verdict, wanted):
    assert TraceFilter.from_query(query).matches(packet, len(packet), peer, verdict) is wanted


@pytest.mark.parametrize(("query", "field"), [
    ({"host": "10.5.300.1"}, "host"), ({"proto": "sctpx"}, "proto"), ({"port": "70000"}, "port"),
    ({"peer": "node-2"}, "peer"), ({"colour": "red"}, "colour"),
])
def test_filter_refuses_a_bad_parameter_naming_it(query, field):
    with pytest.raises(ValueError, match=field):
        TraceFilter.from_query(query)


@given(st.binary(max_size=64), st.sampled_from([{"host": "10.0.0.0/8"}, {"port": "80"}, {"proto": "udp"}]))
def test_filter_never_raises_on_garbage(data, query):
    TraceFilter.from_query(query).matches(data, len(data), None, 0)


@given(st.sampled_from([{"host": "10.5.2.2"}, {"proto": "17", "port": "53"}, {"peer": "198.18.0.9", "drops": "1"}]))
def test_filter_survives_its_round_trip_through_the_query(query):
    flt = TraceFilter.from_query(query)
    assert TraceFilter.from_query(flt.as_query()) == flt


# -- the hub: off when nobody listens, bounded queues --------------------------------------------------------
class EngineStandIn:
    """What the hub reads of an engine: its UDP socket's address, routes, TUN MTU and ``tracer``."""

    def __init__(self, udp: socket.socket) -> None:
        self.udp, self.routes, self.tun_mtu, self.counters, self.tracer = udp, routes(), 1472, Counters(), None


@pytest.fixture
def engine():
    udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    udp.bind(("127.0.0.1", 0))
    try:
        yield EngineStandIn(udp)
    finally:
        udp.close()


def test_tracer_is_set_only_while_a_client_listens(engine):
    hub = TraceHub(engine)
    assert engine.tracer is None
    a, b = hub.attach(TraceClient(TraceFilter())), hub.attach(TraceClient(TraceFilter()))
    assert engine.tracer is hub
    hub.detach(a)
    assert engine.tracer is hub
    hub.detach(b)
    assert engine.tracer is None


def test_each_client_gets_only_its_filters_packets(engine):
    hub = TraceHub(engine)
    icmp_client = hub.attach(TraceClient(TraceFilter.from_query({"proto": "icmp"})))
    nothing = hub.attach(TraceClient(TraceFilter.from_query({"host": "192.0.2.1"})))
    pkt = echo()
    verdict, hop = outbound(pkt, len(pkt), routes())
    hub.outbound(pkt, len(pkt), verdict, hop)
    assert len(icmp_client.queue) == 1 and not nothing.queue


def test_a_full_client_queue_drops_and_counts_without_blocking(engine):
    hub = TraceHub(engine)
    slow = hub.attach(TraceClient(TraceFilter(), limit=5))
    for seq in range(12):
        pkt = echo(seq=seq)
        verdict, hop = outbound(pkt, len(pkt), routes())
        hub.outbound(pkt, len(pkt), verdict, hop)
    assert len(slow.queue) == 5 and slow.dropped == 7


def test_client_stream_reports_its_drops_and_ends_after_count(engine):
    hub = TraceHub(engine)
    client = hub.attach(TraceClient(TraceFilter(), limit=2, count=2))
    for seq in range(5):
        pkt = echo(seq=seq)
        verdict, hop = outbound(pkt, len(pkt), routes())
        hub.outbound(pkt, len(pkt), verdict, hop)

    async def read() -> list[bytes]:
        return [line async for line in client.lines()]

    lines = [json.loads(line) for line in asyncio.run(read())]
    assert "hello" in lines[0] and {"dropped": 3} in lines
    assert [item["dir"] for item in lines if "steps" in item] == ["out", "out"]
    assert lines[-1] == {"end": 2, "dropped": 3}


# -- pcapng ------------------------------------------------------------------------------------------------
def blocks(data: bytes) -> list[tuple[int, bytes]]:
    """(type, body) of each block, checking both length fields and the 4-byte alignment on the way."""
    out, at = [], 0
    while at < len(data):
        kind, total = struct.unpack_from("<II", data, at)
        assert total % 4 == 0 and struct.unpack_from("<I", data, at + total - 4)[0] == total
        out.append((kind, data[at + 8:at + total - 4]))
        at += total
    assert at == len(data)
    return out


@given(st.lists(st.binary(max_size=300), max_size=5), st.text(max_size=40))
def test_pcapng_blocks_are_aligned_and_carry_each_packet_whole(packets, comment):
    import io

    f = io.BytesIO()
    w = PcapngWriter(f, application="test", comment=comment)
    inner, outer = w.add_interface("flannel0"), w.add_interface("underlay", "rebuilt")
    for i, p in enumerate(packets):
        w.add_packet(inner if i % 2 else outer, 1_700_000_000_000_000 + i, p, comment=comment)
    found = blocks(f.getvalue())
    assert found[0][0] == SHB_TYPE and struct.unpack_from("<IHH", found[0][1]) == (BYTE_ORDER_MAGIC, 1, 0)
    assert [k for k, _ in found[1:3]] == [IDB_TYPE, IDB_TYPE]
    assert struct.unpack_from("<H", found[1][1])[0] == LINKTYPE_IPV4
    for i, (p, (kind, body)) in enumerate(zip(packets, found[3:], strict=True)):
        iface, high, low, captured, original = struct.unpack_from("<IIIII", body)
        assert kind == EPB_TYPE and iface == (0 if i % 2 else 1) and captured == original == len(p)
        assert (high << 32 | low) == 1_700_000_000_000_000 + i and body[20:20 + len(p)] == p


def test_pcapng_refuses_a_packet_on_an_interface_it_has_not_described():
    import io

    w = PcapngWriter(io.BytesIO())
    with pytest.raises(ValueError, match="no interface 0"):
        w.add_packet(0, 0, b"")


def test_packet_block_timestamp_splits_into_high_and_low_words():
    body = packet_block(0, (5 << 32) + 7, b"")[8:]
    assert struct.unpack_from("<III", body) == (0, 5, 7)


def test_tcpdump_reads_the_pcapng_with_both_interfaces(tmp_path):
    require(shutil.which("tcpdump") is not None, "needs tcpdump (./dev setup installs it)")
    pkt = echo()
    verdict, hop = outbound(pkt, len(pkt), routes())
    event = outbound_event(pkt, len(pkt), verdict, hop, routes=routes(), local=LOCAL)
    path = tmp_path / "trace.pcapng"
    with open(path, "wb") as f:
        w = PcapngWriter(f, application="test")
        inner, outer = w.add_interface("flannel0"), w.add_interface("underlay")
        w.add_packet(inner, 1_700_000_000_000_000, event.inner)
        for d in event.outer():
            w.add_packet(outer, 1_700_000_000_000_001, d)
    out = subprocess.run(["tcpdump", "-n", "-r", str(path)], capture_output=True, text=True, timeout=30)
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    assert len(lines) == 2
    assert "10.5.1.2 > 10.5.2.2: ICMP echo request, id 7, seq 1, length 64" in lines[0]
    assert "198.18.0.1.8285 > 198.18.0.2.8285: UDP, length 84" in lines[1]


# -- the control socket's /trace stream (a real unix socket, no namespace needed) ---------------------------
async def _serve(engine, path: Path):
    from udpflannel.httpapi import HttpApi, Stream

    hub = TraceHub(engine)
    api = HttpApi({"/trace": Stream(hub.stream)}, unix_only=frozenset({"/trace"}))
    await api.serve_unix(str(path))
    return hub, api


async def _request(path: Path, query: str) -> tuple[asyncio.StreamReader, asyncio.StreamWriter, bytes]:
    reader, writer = await asyncio.open_unix_connection(str(path))
    writer.write(f"GET /trace?{query} HTTP/1.1\r\nHost: t\r\n\r\n".encode())
    await writer.drain()
    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
    return reader, writer, head


def test_trace_stream_attaches_while_the_client_is_there_and_detaches_when_it_hangs_up(engine, tmp_path):
    async def scenario() -> None:
        hub, api = await _serve(engine, tmp_path / "ctl.sock")
        try:
            reader, writer, head = await _request(tmp_path / "ctl.sock", "proto=icmp")
            assert head.startswith(b"HTTP/1.1 200") and b"application/x-ndjson" in head
            hello = json.loads(await asyncio.wait_for(reader.readline(), 5))
            assert hello["filter"] == {"proto": "1"} and engine.tracer is hub
            pkt = echo()
            verdict, hop = outbound(pkt, len(pkt), routes())
            hub.outbound(pkt, len(pkt), verdict, hop)
            event = json.loads(await asyncio.wait_for(reader.readline(), 5))
            assert event["dir"] == "out" and event["steps"][0][0] == "tun read"
            writer.close()
            for _ in range(100):  # the daemon notices the hang-up while no event is due
                if engine.tracer is None:
                    break
                await asyncio.sleep(0.02)
            assert engine.tracer is None and not hub.clients
        finally:
            await api.close()

    asyncio.run(scenario())


def test_trace_stream_refuses_a_bad_filter_with_400_naming_the_field(engine, tmp_path):
    async def scenario() -> bytes:
        _, api = await _serve(engine, tmp_path / "ctl.sock")
        try:
            reader, writer, head = await _request(tmp_path / "ctl.sock", "port=99999")
            body = await asyncio.wait_for(reader.read(), 5)
            writer.close()
            return head + body
        finally:
            await api.close()

    answer = asyncio.run(scenario())
    assert answer.startswith(b"HTTP/1.1 400") and b"port" in answer and engine.tracer is None


def test_closing_the_server_ends_open_trace_streams(engine, tmp_path):
    async def scenario() -> None:
        hub, api = await _serve(engine, tmp_path / "ctl.sock")
        reader, writer, _ = await _request(tmp_path / "ctl.sock", "")
        await asyncio.wait_for(reader.readline(), 5)
        assert engine.tracer is hub
        await api.close()
        assert await asyncio.wait_for(reader.read(), 5) == b""  # the stream ended
        writer.close()
        assert engine.tracer is None and not [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]

    asyncio.run(scenario())


def test_trace_flag_logs_every_packets_journey_on_one_line(engine, caplog):
    import logging

    hub = TraceHub(engine, log_every_packet=True)  # --trace
    assert engine.tracer is hub
    pkt = echo()
    verdict, hop = outbound(pkt, len(pkt), routes())
    with caplog.at_level(logging.DEBUG, logger="udpflannel.trace"):
        hub.outbound(pkt, len(pkt), verdict, hop)
    [line] = [r.getMessage() for r in caplog.records if r.name == "udpflannel.trace"]
    assert line.startswith("out tun read: flannel0 → daemon: 10.5.1.2 > 10.5.2.2 icmp echo request")
    assert "; route: 10.5.2.2 in 10.5.2.0/24" in line and line.endswith("verdict: FORWARD: sent to 198.18.0.2:8285")
