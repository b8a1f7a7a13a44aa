"""udpflannel.batch under hostile input: mutated GRO batches through ``inbound_batches`` (issue 15, item 3).

A GRO table is what the fast path's receive loop lays out: consecutive batches of one row size from
one or more senders, each a flow's datagrams (TCP segments or UDP datagrams, the last maybe short) —
then damaged as a forger would: flipped bytes, truncated rows and wrong lengths, bad header and L4
checksums, TTL 0 and 1, fragments, sources outside the sender's subnet, strangers, random rows,
duplicated and swapped rows, breaks in IDs and sequence numbers. Whatever comes in:

- nothing raises, and every row gets exactly one verdict, in its flow's order (rows are grouped by
  flow: the order across flows may change), from the peer that sent it;
- a refused row gets the verdict ``forward.inbound`` gives it alone, and is left as it came;
- a forwarded unit, cut again as the kernel would (``hostile.resegment``), is exactly the rows it
  carries one hop older, each of which ``forward.inbound`` forwards alone, is well-formed by the slow
  reference (``hostile.problem``), and comes from the sending peer's subnet.

Runs for both GRO-check backends (compiled C and numpy: the fixture from test_gso).
"""

from __future__ import annotations

from ipaddress import IPv4Address, IPv4Network

from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from tests.test_gso import backend  # noqa: F401  (autouse, module-scoped: every test here runs per backend)
from tests.tools import hostile
from tun import gso, vnet
from udpflannel.batch import inbound_batches
from udpflannel.forward import inbound
from udpflannel.packet import Verdict
from udpflannel.routes import RouteTable

TUN_MTU = 1472
SUBNETS = {("198.18.0.2", 8285): IPv4Network("10.5.2.0/24"), ("198.18.0.3", 8285): IPv4Network("10.5.3.0/24")}
STRANGERS = [("198.18.0.9", 8285), ("198.18.0.2", 40000)]  # no lease; a peer's address from another port
ROUTES = RouteTable(list((subnet, hop) for hop, subnet in SUBNETS.items()))
POD = IPv4Address("10.5.1.2").packed
MUTATIONS = ["flip", "truncate", "total_length", "udp_length", "ip_checksum", "l4_checksum", "ttl", "fragment",
             "outside", "random", "duplicate", "swap", "ident", "seq", "psh", "flags"]


def flow(data: st.DataObject, seg: int, rows: int, subnet: IPv4Network) -> list[bytearray]:
    """``rows`` consecutive datagrams of one flow from ``subnet`` to the pod, every one ``seg`` bytes
    but maybe a shorter last, as a peer's GSO send makes them; random bytes if no header fits."""
    draw = data.draw
    proto = draw(st.sampled_from([hostile.TCP, hostile.UDP]))
    timestamps = draw(st.booleans())
    overhead = 20 + (32 if timestamps else 20) if proto == hostile.TCP else 28
    if seg < overhead:
        return [bytearray(draw(st.binary(min_size=seg, max_size=seg))) for _ in range(rows)]
    src = (subnet.network_address + draw(st.integers(1, 254))).packed
    ident, port = draw(st.integers(0, 0xFFFF)), draw(st.integers(1024, 65535))
    seq, ack = draw(st.integers(0, 2**32 - 1)), draw(st.integers(0, 2**32 - 1))
    ttl, df = draw(st.sampled_from([2, 3, 64, 255])), draw(st.sampled_from([0, 0x4000]))
    sizes = [seg] * rows
    if draw(st.booleans()):
        sizes[-1] = draw(st.integers(overhead, seg))
    out = []
    for i, size in enumerate(sizes):
        payload = bytes([i]) * (size - overhead)
        if proto == hostile.TCP:
            flags = hostile.ACK | (hostile.PSH if i == rows - 1 and draw(st.booleans()) else 0)
            body = hostile.tcp(port, 5201, seq + i * (seg - overhead), flags, payload, ack=ack, timestamps=timestamps)
        else:
            body = hostile.udp(port, 5201, payload)
        out.append(hostile.ipv4(proto, body, src, POD, ttl=ttl, ident=ident + i, frag=df))
    return out


def mutate(data: st.DataObject, rows: list[bytearray], i: int) -> None:
    """Damage row ``i`` in place (its length stays: a GRO batch's rows are its size)."""
    draw = data.draw
    row = rows[i]
    n = len(row)
    kind = draw(st.sampled_from(MUTATIONS))
    if kind == "flip":
        row[draw(st.integers(0, n - 1))] ^= draw(st.integers(1, 255))
    elif kind == "truncate" and n > 20:  # the header says longer than the row: a packet cut short
        row[2:4] = (n + draw(st.integers(1, 100))).to_bytes(2, "big")
        hostile.fix_ip(row)
    elif kind == "total_length":
        row[2:4] = draw(st.integers(0, 0xFFFF)).to_bytes(2, "big")
        if draw(st.booleans()):
            hostile.fix_ip(row)
    elif kind == "udp_length" and n >= 28 and row[9] == hostile.UDP:
        row[24:26] = draw(st.integers(0, 0xFFFF)).to_bytes(2, "big")
        hostile.fix_l4(row)
    elif kind == "ip_checksum":
        row[draw(st.sampled_from([10, 11]))] ^= draw(st.integers(1, 255))
    elif kind == "l4_checksum" and n > 28:
        row[draw(st.integers(28, n - 1))] ^= draw(st.integers(1, 255))
    elif kind == "ttl" and n >= 20:
        row[8] = draw(st.sampled_from([0, 1]))
        hostile.fix_ip(row)
    elif kind == "fragment" and n >= 20:
        row[6:8] = (draw(st.sampled_from([0x2000, 0x0001, 0x1FFF, 0x3FFF])) | draw(st.sampled_from([0, 0x4000]))).to_bytes(2, "big")
        hostile.fix_ip(row)
    elif kind == "outside" and n >= 20:  # checksums made right again: only the source is wrong
        row[12:16] = IPv4Address(draw(st.sampled_from(["10.5.1.7", "10.5.3.9", "10.5.200.1", "127.0.0.1"]))).packed
        hostile.fix_ip(hostile.fix_l4(row))
    elif kind == "random":
        row[:] = draw(st.binary(min_size=n, max_size=n))
    elif kind == "duplicate":
        same = [j for j, other in enumerate(rows) if j != i and len(other) == n]
        if same:
            row[:] = rows[draw(st.sampled_from(same))]
    elif kind == "swap":
        same = [j for j, other in enumerate(rows) if j != i and len(other) == n]
        if same:
            j = draw(st.sampled_from(same))
            rows[i], rows[j] = rows[j], rows[i]
    elif kind == "ident" and n >= 20:
        row[4:6] = draw(st.integers(0, 0xFFFF)).to_bytes(2, "big")
        hostile.fix_ip(row)
    elif kind in ("seq", "psh", "flags") and n >= 40 and row[9] == hostile.TCP and row[0] == 0x45:
        if kind == "seq":
            row[24:28] = draw(st.integers(0, 2**32 - 1)).to_bytes(4, "big")
        else:
            row[33] = row[33] | hostile.PSH if kind == "psh" else draw(st.integers(0, 255))
        hostile.fix_l4(row)


@st.composite
def gro_tables(draw):
    """(seg, [(sender, rows)], udp, check_source, base): consecutive batches of ``seg``-byte rows."""
    data = draw(st.data())
    seg = draw(st.one_of(st.integers(20, 200), st.sampled_from([1400, 1420, 1448, 1472, 1473, 1500]),
                         st.integers(20, 1500)))
    if draw(st.integers(0, 3)):  # mostly even: the coalescer merges nothing of an odd row size
        seg &= ~1
    senders = list(SUBNETS) * 3 + STRANGERS
    batches = []
    for _ in range(draw(st.integers(1, 4))):
        sender = draw(st.sampled_from(senders))
        subnet = SUBNETS.get(sender) or SUBNETS[("198.18.0.2", 8285)]
        rows = flow(data, seg, draw(st.integers(1, min(12, 0xFFFF // seg)) | st.just(min(8, 0xFFFF // seg))), subnet)
        for _ in range(draw(st.integers(0, 3))):
            mutate(data, rows, draw(st.integers(0, len(rows) - 1)))
        batches.append((sender, rows))
    base = draw(st.sampled_from([0, 8, 4096]))
    return seg, batches, draw(st.booleans()), draw(st.booleans()), base


@settings(max_examples=500, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(gro_tables())
def test_mutated_gro_batches_get_per_packet_verdicts_and_forward_only_well_formed_packets(table) -> None:
    seg, batches, udp, check_source, base = table
    rows = [bytes(row) for _, batch in batches for row in batch]
    senders = [sender for sender, batch in batches for _ in batch]
    alone = [inbound(bytearray(row) + bytearray(64), len(row), sender, ROUTES, tun_mtu=TUN_MTU,  # each on its own
                     check_source=check_source) for row, sender in zip(rows, senders, strict=True)]

    buf = bytearray(base + len(rows) * seg + gso.BUFFER_SIZE)
    at = base
    for row in rows:
        buf[at:at + len(row)] = row
        at += seg
    coalescer = gso.Coalescer(buf, udp=udp)
    sizes = [sum(map(len, batch)) for _, batch in batches]
    waiting = flows(rows, senders)  # each flow's rows (indices) in arrival order: units must take them so
    done = 0
    for verdict, sender, n, unit in inbound_batches(coalescer, base, seg, sizes, [s for s, _ in batches], ROUTES,
                                                    tun_mtu=TUN_MTU, check_source=check_source):
        written = bytes(unit) if verdict != Verdict.FORWARD else b"".join(bytes(part) for part in unit)[vnet.VNET_HDR_LEN:]
        queue = waiting[flow_key(sender, written)]  # a unit names the sender of its rows, or this fails
        assert n >= 1 and n <= len(queue), "a unit carries rows its flow does not have (next)"
        taken, waiting[flow_key(sender, written)] = queue[:n], queue[n:]
        event(f"{verdict.name.lower()}, {'merged' if n > 1 else 'alone'}")
        if verdict != Verdict.FORWARD:
            assert n == 1 and (verdict, bytes(unit)) == (alone[taken[0]], rows[taken[0]]), (verdict, alone[taken[0]])
        else:
            written = b"".join(bytes(part) for part in unit)
            flags, gso_type, _, gso_size, _, _ = vnet.unpack_from(written)
            packets = hostile.resegment(flags, gso_type, gso_size, written[vnet.VNET_HDR_LEN:])
            assert [alone[i] for i in taken] == [Verdict.FORWARD] * n, "forwarded what inbound refuses alone"
            assert packets == [hostile.after_hops(rows[i], 1) for i in taken]
            event(f"gso type {gso_type}")
            assert n == 1 or (gso_type == (hostile.GSO_UDP_L4 if udp and rows[taken[0]][9] == hostile.UDP
                                           else hostile.GSO_TCPV4) and flags == vnet.NEEDS_CSUM)
            for packet in packets:
                assert not hostile.problem(packet), hostile.problem(packet)
                assert not check_source or IPv4Address(packet[12:16]) in SUBNETS[sender]
        done += n
    assert done == len(rows) and not any(waiting.values()), "a row got no verdict"


def flow_key(sender, row: bytes) -> tuple:
    """A row's flow as the coalescer groups rows (sender; protocol, addresses, ports at IHL 5 offsets,
    a short row's missing bytes zero, as the coalescer pads it): rows of one key keep their order."""
    row = row[:24].ljust(24, b"\0")
    return sender, row[9], row[12:24]


def flows(rows: list[bytes], senders: list) -> dict[tuple, list[int]]:
    out: dict[tuple, list[int]] = {}
    for i, (row, sender) in enumerate(zip(rows, senders, strict=True)):
        out.setdefault(flow_key(sender, row), []).append(i)
    return out
