"""tun.gso_c (the C extension tun/_gso_c.c): the compiled cut and GRO checks give exactly what
tun.gso_numpy's reference gives, and no arguments make them touch memory outside their buffers.
(Every test in test_gso.py also runs with both; these compare them directly, on inputs built to reach
the numpy code's separate cases: several packets per cut, odd offsets, damaged GRO tables, row orders.)

The direct tests call tun.gso_c whatever ``UDPFLANNEL_JIT`` says (it only picks the daemon's kernels);
``./dev sanitize`` runs this file against an AddressSanitizer/UBSan build of the extension.
"""

from __future__ import annotations

import os
import struct

import numpy as np
import pytest
from hypothesis import HealthCheck, assume, event, given, settings
from hypothesis import strategies as st

from tests.conftest import IN_CI, require, require_compiled_kernels
from tests.gso_helpers import by_flow, split
from tests.strategies import super_packets
from tests.test_coalesce_flows import flows, interleave, receive
from tests.test_gso import _with_ihl5, gso_hdr
from tun import gso, gso_numpy, kernels
from tun.coalesce import merge_rule
from tun.layout import PROTO_TCP, PROTO_UDP
from tun.segment import Refused, parse
from tun.superpacket import Packet

try:
    from tun import gso_c
except ImportError as exc:  # not built here: every test below skips (fails in CI)
    gso_c, NOT_BUILT = None, str(exc)

SLOW = settings(suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


@pytest.fixture(autouse=True, scope="module")
def built() -> None:
    require(gso_c is not None, f"the C extension is built (./dev setup: a C compiler and python3-dev): {gso_c or NOT_BUILT}")


def test_the_compiled_kernels_are_loaded_unless_turned_off() -> None:
    """In CI the fast path must run the C kernels: a build that silently fell back to numpy fails
    here. With UDPFLANNEL_JIT=0 (the suite's numpy run) the numpy kernels must run instead."""
    chosen = kernels.choose()
    if os.environ.get(kernels.ENV) == "0":
        assert not chosen.compiled and f"{kernels.ENV}=0" in chosen.description
    elif IN_CI or gso_c is not None:
        assert chosen.compiled and chosen.description == "compiled (C)", chosen.description


# -- the cut ----------------------------------------------------------------------------------------


def _laid_out(packets: list[tuple[bytes, int]]) -> tuple[bytearray, list[tuple[int, int, int, int]]]:
    """Super-packets in one input buffer as the fast path reads them, each with room for one more
    segment after it (a cut may pad there); 8-byte aligned, but for an odd count the first starts at
    offset 3: the compiled loops must not depend on alignment."""
    buf = bytearray(sum(len(p) + mss + 16 for p, mss in packets) + gso.BUFFER_SIZE)
    items, at = [], 3 * (len(packets) % 2)
    for packet, mss in packets:
        buf[at:at + len(packet)] = packet
        items.append((at, len(packet), gso_hdr(packet, mss).gso_type, mss))
        at = at + len(packet) + mss + 7 & ~7
    return buf, items


def _segmenter_cuts(buf: bytearray, items, capacity: int, jits=(True, False)) -> dict[bool, list]:
    """Each backend's Segmenter's results and datagrams for the same input."""
    got = {}
    for jit in jits:
        segmenter = gso.Segmenter(capacity, jit=jit)
        results = segmenter.cut(bytearray(buf), items)
        got[jit] = [r if isinstance(r, Refused) else (r, [bytes(segmenter.out[r.start + j * r.size:r.start + j * r.size
                    + (r.size if j < r.count - 1 else r.last)]) for j in range(r.count)]) for r in results]
    return got


@given(st.lists(super_packets(protocol=6, max_segments=6) | super_packets(protocol=17, max_segments=6),
                min_size=1, max_size=5), st.booleans())
@SLOW
def test_compiled_cut_is_the_numpy_cut(cases, one_flow) -> None:
    """Several super-packets in one cut (alike ones are cut together, in the numpy code by templates
    and ramps or per packet): the compiled loop writes the same datagrams, byte for byte."""
    require_compiled_kernels()
    if one_flow:  # consecutive bursts of one flow, the common case (IDs and sequence numbers count on)
        cases = [cases[0]] * len(cases)
    buf, items = _laid_out(cases)
    got = _segmenter_cuts(buf, items, len(buf) * 2)
    assert got[True] == got[False]


@given(st.lists(super_packets(protocol=6, max_segments=6), min_size=1, max_size=4), st.integers(68, 1500))
@SLOW
def test_compiled_cut_for_a_narrower_path_is_the_numpy_cut(cases, largest) -> None:
    """Super-packets cut at the smaller size a narrow path asks for (``fit_segment_size``): the two
    backends still write the same datagrams, byte for byte."""
    require_compiled_kernels()
    buf, items = _laid_out(cases)
    items = [(at, n, gso_type, gso.fit_segment_size(buf, at, n, gso_type, mss, largest))
             for at, n, gso_type, mss in items]
    got = _segmenter_cuts(buf, items, len(buf) * 4)
    assert got[True] == got[False]


@given(st.lists(super_packets(protocol=6, max_segments=6) | super_packets(protocol=17, max_segments=6),
                min_size=1, max_size=6), st.data())
@SLOW
def test_compiled_whole_cut_of_damaged_packets_is_the_python_segmenters(cases, data) -> None:
    """The compiled Segmenter parses and groups in C (``cut_many``): with header bytes damaged, GSO
    types and segment sizes any a virtio_net_hdr can hold, and an output buffer too small at first,
    it refuses the same packets for the same reasons and writes the same datagrams as the Python
    parse around the numpy cut. (Where the Python parse fails on a segment size no IPv4 total length
    can hold, the C one refuses the packet as a bad header.)"""
    require_compiled_kernels()  # (the Segmenter and Coalescer pick their kernels as the daemon does)
    sizes = [data.draw(st.sampled_from([mss] * 4 + [-1, 0, 1, 2, 8, 0xFFFF - 40, 0xFFFF])) for _, mss in cases]
    # (laid out with room for the numpy cut's padding of a last segment at the size it is cut at)
    buf, items = _laid_out([(packet, max(mss, size)) for (packet, mss), size in zip(cases, sizes, strict=True)])
    for i, ((at, n, gso_type, _), size) in enumerate(zip(items, sizes, strict=True)):
        what = data.draw(st.sampled_from(["as read", "as read", "byte", "type"]))
        if what == "byte":  # a header byte changed: version, IHL, lengths, fragment, protocol, data offset
            k = data.draw(st.sampled_from([0, 2, 3, 6, 7, 9, 32, 33]))
            buf[at + k] = data.draw(st.integers(0, 255))
        elif what == "type":
            gso_type = data.draw(st.sampled_from([0, 1, 3, 4, 5, 0x81, 0x85, 0x84, 0xFF]))
        items[i] = (at, n, gso_type, size)
    capacity = data.draw(st.integers(1, 4 * len(buf)))
    try:
        want = _segmenter_cuts(buf, items, capacity, jits=(False,))[False]
    except struct.error:  # the Python parse packs a total length over 0xFFFF
        assert any(mss > 0xFFFF - 60 for *_, mss in items)
        got = _segmenter_cuts(buf, items, capacity, jits=(True,))[True]
        assert any(r is Refused.BAD_HEADER for r in got)
        return
    assert _segmenter_cuts(buf, items, capacity, jits=(True,))[True] == want


def test_compiled_whole_cut_refuses_items_outside_its_buffer() -> None:
    """An item's offset and length must lie inside the input: ValueError, never a read past it."""
    require_compiled_kernels()  # (the Segmenter and Coalescer pick their kernels as the daemon does)
    segmenter, buf = gso.Segmenter(4096, jit=True), bytearray(100)
    for item in [(-1, 20, 1, 8), (0, 101, 1, 8), (90, 11, 1, 8), (2**63, 1, 1, 8), (0, -1, 1, 8)]:
        with pytest.raises(ValueError):
            segmenter.cut(buf, [item])
    for items in ([(0, 20, 1)], [None], [(0, 20, 1, "8")]):
        with pytest.raises(TypeError):
            segmenter.cut(buf, items)


def _numpy_cut(src: bytearray, out: bytearray, at: int, group: list[Packet]) -> bytearray:
    """The reference cut into a copy of ``out``. The numpy cut pads each packet's last segment in
    ``src`` (the C cut reads only the payloads), so each packet is copied apart, with that room."""
    hl, mss = group[0].hl, group[0].mss
    spaced, moved = bytearray(), []
    for p in group:
        n = hl + (p.count - 1) * mss + p.last
        moved.append(p._replace(at=len(spaced)))
        spaced += src[p.at:p.at + n] + bytes(mss + 8)
    src, group, out = spaced, moved, bytearray(out)
    gso_numpy.Cutter()(src, np.frombuffer(src, np.uint8), np.frombuffer(src, np.uint32, len(src) >> 2), out,
                       np.frombuffer(out, np.uint8), at, group)
    return out


def _cut_fits(src_len: int, out_len: int, at: int, group: list[Packet]) -> bool:
    """What the C cut accepts (a slow restatement): one shape of packet a parse can give, every
    payload inside ``src``, every row inside ``out``."""
    first = group[0]
    proto, ihl, hl, mss = first[1:5]
    if proto not in (PROTO_TCP, PROTO_UDP) or not (20 <= ihl <= 60 and ihl % 4 == 0):
        return False
    if (proto == PROTO_TCP and not (20 <= hl - ihl <= 60 and (hl - ihl) % 4 == 0)
            or proto == PROTO_UDP and hl != ihl + 8 or mss < 1 or hl + mss > 0xFFFF):
        return False
    for p in group:
        if p[1:5] != first[1:5] or len(p.template) != hl or not 0 <= p.flags <= 0xFF:
            return False
        if p.at < 0 or p.count < 1 or not 0 <= p.last <= mss or p.at + hl + (p.count - 1) * mss + p.last > src_len:
            return False
    return at >= 0 and at + sum(p.count for p in group) * (hl + mss) <= out_len


def _lengths_agree(p: Packet, size: int) -> bool:
    """The template's total length (and UDP length) are a full segment's, as a parse makes them."""
    t = p.template
    return (int.from_bytes(t[2:4], "big") == size
            and (p.proto != PROTO_UDP or int.from_bytes(t[p.ihl + 4:p.ihl + 6], "big") == size - p.ihl))


# Hostile values for the integer fields of a Packet: small, around the edges, huge, negative
_hostile_int = st.one_of(st.integers(-3, 3), st.integers(-70000, 70000), st.integers(-2**70, 2**70),
                         st.sampled_from([2**31 - 1, 2**31, 2**32, 2**63 - 1, -2**63, 0xFFFF, 0x10000]))
_FIELDS = ("at", "proto", "ihl", "hl", "mss", "count", "last", "template", "ident", "seq", "flags")


@given(st.lists(super_packets(protocol=6, max_segments=4) | super_packets(protocol=17, max_segments=4),
                min_size=1, max_size=3), st.data())
@settings(SLOW, max_examples=300)
def test_compiled_cut_of_hostile_packets_is_the_numpy_cut_or_a_valueerror(cases, data) -> None:
    """Packets with any offsets, counts, lengths and header sizes, cut at any ``at`` into buffers of
    any size: either every payload and row fits and the cut is the numpy cut, byte for byte, or
    ValueError and neither buffer changed. (``./dev sanitize`` runs this under ASan: no access outside
    the buffers either way.)"""
    if data.draw(st.booleans()):  # packets of one shape (else most groups are refused for their mix)
        cases = [cases[0]] * len(cases)
    src = bytearray(b"".join(p for p, _ in cases))
    group, off = [], 0
    for packet, mss in cases:
        kind = gso_hdr(packet, mss).gso_type
        parsed = parse(src, off, len(packet), kind, mss)
        assume(not isinstance(parsed, Refused))
        group.append(parsed)
        off += len(packet)
    group = [group[0]._replace(**{k: v for k, v in p._asdict().items() if k in ("at", "template", "ident", "seq",
                                                                               "flags", "count", "last")})
             for p in group]  # one shape: the first's
    for _ in range(data.draw(st.sampled_from([0, 0, 0, 1, 1, 2, 3]))):  # fields made hostile
        i = data.draw(st.integers(0, len(group) - 1))
        field = data.draw(st.sampled_from(_FIELDS))
        if field == "template":
            value = data.draw(st.binary(max_size=130))
        else:
            value = data.draw(_hostile_int)
            if field in ("proto", "ihl", "hl", "mss"):  # the whole group: else only "differ in shape"
                group = [p._replace(**{field: value}) for p in group]
                continue
        group[i] = group[i]._replace(**{field: value})
    if data.draw(st.booleans()):  # a source buffer cut short, or longer
        src = src[:data.draw(st.integers(0, len(src) + 8))] + bytes(data.draw(st.integers(0, 8)))
    rows = sum(p.count for p in group)
    need = min(max(rows * (group[0].hl + group[0].mss), 0), 1 << 22)  # what a valid cut takes, capped
    at = data.draw(st.one_of(st.integers(0, 64), st.integers(0, 64), _hostile_int))
    # mostly rows that end where the buffer does (a sanitizer build sees one byte past it)
    fit = at + need if 0 <= at <= 64 else need
    out = bytearray(data.draw(st.one_of(st.just(fit), st.just(fit), st.integers(0, need + 64))))
    src_before, out_before = bytes(src), bytes(out)
    fits = _cut_fits(len(src), len(out), at, group)
    event("fits" if fits else "refused")
    if fits:
        want = _numpy_cut(src, out, at, group)
        gso_c.cut(src, None, None, out, None, at, group)
        size = group[0].hl + group[0].mss
        for p, start in zip(group, np.cumsum([0] + [p.count for p in group]), strict=False):
            if not _lengths_agree(p, size):
                continue  # the numpy cut keeps a template's lengths, the C cut writes the right ones
            for r in range(p.count):  # the numpy cut pads the last row; the C cut leaves it as it was
                end = at + (start + r) * size + (size if r < p.count - 1 else group[0].hl + p.last)
                assert out[at + (start + r) * size:end] == want[at + (start + r) * size:end]
        assert out[:at] == out_before[:at] and out[at + rows * size:] == out_before[at + rows * size:]
    else:
        with pytest.raises(ValueError):
            gso_c.cut(src, None, None, out, None, at, group)
        assert out == out_before
    assert src == src_before


# -- the GRO checks ---------------------------------------------------------------------------------


def _c_check(buf, base, rows, seg, hl, proto, short, order=None) -> tuple:
    mask, step = merge_rule(hl, seg, proto)
    differ, bad, psh = gso_c.check(buf, None, None, base, rows, seg, hl, proto, short, mask, step, order)
    return differ[:, 0].tolist(), bad[:, 0].tolist(), None if psh is None else psh.tolist()


def _numpy_check(buf, base, rows, seg, hl, proto, short, order=None) -> tuple:
    """The reference checks; with ``order``, on a copy of the table laid out in that order (logical
    row i = physical row order[i]), which is what the order means. On copies: the numpy checks pad
    short rows in place."""
    if order is not None:
        table = bytearray(rows * seg)
        for i, p in enumerate(order):
            table[i * seg:(i + 1) * seg] = buf[base + p * seg:base + (p + 1) * seg]
        short = {i: short[p] for i, p in enumerate(order) if p in short}
        buf, base = table, 0
    buf = bytearray(buf)
    mask, step = merge_rule(hl, seg, proto)
    differ, bad, psh = gso_numpy.Checker()(buf, np.frombuffer(buf, np.uint8), None, base, rows, seg, hl, proto, short,
                                           mask, step)
    return differ.any(axis=1).tolist(), (bad != 0).any(axis=1).tolist(), None if psh is None else (psh != 0).tolist()


def _damaged_table(case, data) -> tuple[list[bytes], int, int]:
    """A flow's segments (IHL 5, an even row size), some damaged: a flipped byte, a missing row, a
    swap, a row cut short. Returns the rows and the flow's (hl, proto), read before any damage, so a
    damaged byte never gives the reference a protocol or header length it cannot check."""
    packet, mss = case
    packet = _with_ihl5(packet)
    segments = split(packet, gso_hdr(packet, mss))
    assume(len(segments) > 2 and len(segments[0]) % 2 == 0)
    proto = packet[9]
    hl = 20 + ((packet[32] >> 4) * 4 if proto == PROTO_TCP else 8)
    for _ in range(data.draw(st.integers(0, 4))):
        i = data.draw(st.integers(0, len(segments) - 1))
        damaged = bytearray(segments[i])
        action = data.draw(st.sampled_from(["flip", "drop", "swap", "shorten"]))
        if action == "flip" and damaged:
            damaged[data.draw(st.integers(0, len(damaged) - 1))] ^= data.draw(st.integers(1, 255))
            segments[i] = bytes(damaged)
        elif action == "drop" and i < len(segments) - 1:
            del segments[i]
        elif action == "shorten" and damaged:
            segments[i] = bytes(damaged[:data.draw(st.integers(0, len(damaged) - 1))])
        elif i > 0 and len(segments[i]) == len(segments[i - 1]):
            segments[i - 1], segments[i] = segments[i], segments[i - 1]
    return segments, hl, proto


@given(super_packets(protocol=6, max_segments=40) | super_packets(protocol=17, max_segments=40), st.data())
@SLOW
def test_compiled_checks_are_the_numpy_checks(case, data) -> None:
    """A GRO table with some rows damaged, some cut short, at any 2-byte offset: the compiled checks
    flag exactly the pairs, rows and PSHs the numpy ones flag."""
    segments, hl, proto = _damaged_table(case, data)
    seg = max(len(s) for s in segments)
    assume(seg % 2 == 0 and seg >= hl)
    base = 2 * data.draw(st.integers(0, 40))
    buf = bytearray(base + len(segments) * seg + data.draw(st.integers(0, 9)))
    short = {}
    for i, s in enumerate(segments):
        buf[base + i * seg:base + i * seg + len(s)] = s
        if len(s) < seg:
            short[i] = len(s)
    args = (base, len(segments), seg, hl, proto, short)
    assert _c_check(buf, *args) == _numpy_check(buf, *args)


@given(super_packets(protocol=6, max_segments=30) | super_packets(protocol=17, max_segments=30), st.data())
@SLOW
def test_compiled_checks_in_an_order_are_the_numpy_checks_of_the_rows_laid_out_in_that_order(case, data) -> None:
    """``order`` (logical row i is physical row order[i], short rows keyed physically): the same
    flags as the numpy checks of a copy of the table with the rows moved into that order."""
    segments, hl, proto = _damaged_table(case, data)
    seg = max(len(s) for s in segments)
    assume(seg % 2 == 0 and seg >= hl)
    strangers = data.draw(st.integers(0, 3))  # rows of other flows between them, never named
    physical = len(segments) + strangers
    slots = data.draw(st.permutations(range(physical)))
    base = 2 * data.draw(st.integers(0, 20))
    buf = bytearray(base + physical * seg)
    short = {}
    for s, slot in zip(segments, slots, strict=False):
        buf[base + slot * seg:base + slot * seg + len(s)] = s
        if len(s) < seg:
            short[slot] = len(s)
    for slot in slots[len(segments):]:
        buf[base + slot * seg:base + (slot + 1) * seg] = data.draw(st.binary(min_size=seg, max_size=seg))
        if data.draw(st.booleans()):
            short[slot] = data.draw(st.integers(0, seg - 1))
    order = list(slots[:len(segments)])
    if data.draw(st.booleans()):  # a row named twice, or the order changed: still the copy's flags
        order = data.draw(st.lists(st.sampled_from(order), min_size=1, max_size=len(order) + 2))
    args = (base, len(order), seg, hl, proto, short)
    assert _c_check(buf, *args, np.array(order, np.intp)) == _numpy_check(buf, *args, order)


def _check_fits(buf_len, base, rows, seg, hl, proto, short, words, order) -> bool:
    """What the C checks accept (a slow restatement): a table of whole even rows inside the buffer
    (or an order naming rows inside it), headers a GRO table can have, short rows shorter than a row."""
    if proto not in (PROTO_TCP, PROTO_UDP) or hl % 4 or not (40 if proto == PROTO_TCP else 28) <= hl <= 120:
        return False
    if not hl <= seg <= 0xFFFF or seg % 2 or rows < 1 or base < 0 or words != hl // 4:
        return False
    in_buf = (buf_len - base) // seg if base <= buf_len else 0
    if order is None:
        return rows <= in_buf and all(0 <= r < rows and 0 <= n < seg for r, n in short.items())
    return (len(order) == rows and all(0 <= p < in_buf for p in order)
            and all(0 <= r < in_buf and 0 <= n < seg for r, n in short.items()))


@given(st.data())
@settings(max_examples=300)
def test_compiled_checks_of_any_table_are_the_numpy_checks_or_a_valueerror(data) -> None:
    """Any base, row count, row size, header length, protocol, short rows and order over a buffer of
    random bytes: either the table lies inside the buffer and the flags are the numpy checks', or
    ValueError. (``./dev sanitize`` runs this under ASan: no access outside the buffer either way.)"""
    buf = bytearray(data.draw(st.binary(min_size=200, max_size=3000)))
    # a table that fits, mostly: a protocol and header length a GRO table has, even rows inside buf
    proto = data.draw(st.sampled_from([PROTO_TCP, PROTO_UDP]))
    hl = data.draw(st.sampled_from([40, 44, 60, 120] if proto == PROTO_TCP else [28]))
    seg = 2 * data.draw(st.integers(hl // 2, 100))
    base = data.draw(st.integers(0, 40))
    in_buf = max((len(buf) - base) // seg, 0)
    assume(in_buf >= 1)
    rows = data.draw(st.integers(1, in_buf))
    order = data.draw(st.none() | st.lists(st.integers(0, in_buf - 1), min_size=rows, max_size=rows))
    short = data.draw(st.dictionaries(st.integers(0, (rows if order is None else in_buf) - 1),
                                      st.integers(0, seg - 1), max_size=4))
    if data.draw(st.booleans()):  # the table ends where the buffer does (a sanitizer sees one byte past it)
        end = base + (rows if order is None else max(order, default=0) + 1) * seg
        del buf[end:]
    for _ in range(data.draw(st.sampled_from([0, 0, 1, 1, 2]))):  # then some of it hostile
        which = data.draw(st.sampled_from(["proto", "hl", "seg", "base", "rows", "short", "order", "buf"]))
        if which == "proto":
            proto = data.draw(st.sampled_from([0, 1, 255, PROTO_UDP if proto == PROTO_TCP else PROTO_TCP]))
        elif which == "short":
            short[data.draw(_hostile_int)] = data.draw(st.one_of(st.integers(0, 400), _hostile_int))
        elif which == "order":
            order = data.draw(st.lists(st.one_of(st.integers(0, in_buf), _hostile_int), max_size=rows + 2))
        elif which == "buf":
            del buf[data.draw(st.integers(0, len(buf))):]
        else:
            value = data.draw(st.one_of(st.integers(-4, 300), _hostile_int))
            hl, seg, base, rows = (value if which == name else old for name, old in
                                   (("hl", hl), ("seg", seg), ("base", base), ("rows", rows)))
    words = data.draw(st.sampled_from([hl // 4 if isinstance(hl, int) and 0 < hl < 10**4 else 7, 0, 1, 7, 10]))
    mask = np.full(words, 0xFFFFFFFF, np.uint32)
    step = np.zeros(words, np.uint32)
    if order is not None and any(not -2**63 <= p < 2**63 for p in order):
        order = [p % 1000 for p in order]  # an intp array holds it
    order_array = None if order is None else np.array(order, np.int64)
    before = bytes(buf)
    fits = _check_fits(len(buf), base, rows, seg, hl, proto, short, words, order)
    event(f"fits, {'ordered' if order is not None else 'in place'}" if fits else "refused")
    if fits:
        mask, step = merge_rule(hl, seg, proto)  # (the real rule, so the two agree on what differs)
        assert _c_check(buf, base, rows, seg, hl, proto, short, order_array) == _numpy_check(
            buf, base, rows, seg, hl, proto, short, order)
    else:
        with pytest.raises(ValueError):
            gso_c.check(buf, None, None, base, rows, seg, hl, proto, short, mask, step, order_array)
    assert buf == before


def test_compiled_checks_refuse_rule_arrays_of_the_wrong_kind() -> None:
    """mask and step are a uint32 per header word: other widths or shapes are a ValueError, not a
    read past their end."""
    buf = bytearray(4 * 60)
    mask, step = merge_rule(40, 60, PROTO_TCP)
    for wrong in (mask[:5], mask.astype(np.uint64), mask.astype(np.uint16), mask.reshape(2, 5), b"\0" * 10):
        with pytest.raises(ValueError):
            gso_c.check(buf, None, None, 0, 4, 60, 40, PROTO_TCP, {}, wrong, step)
        with pytest.raises(ValueError):
            gso_c.check(buf, None, None, 0, 4, 60, 40, PROTO_TCP, {}, mask, wrong)
    for wrong in (np.zeros(4, np.float64), np.zeros(3, np.intp), np.zeros((2, 2), np.intp)):
        with pytest.raises(ValueError):
            gso_c.check(buf, None, None, 0, 4, 60, 40, PROTO_TCP, {}, mask, step, wrong)


class Meddler:
    """An integer (by ``__index__``) that changes the other arguments while the kernel converts it."""

    def __init__(self, value: int, act) -> None:
        self.value, self.act = value, act

    def __index__(self) -> int:
        self.act()
        return self.value


def test_compiled_kernels_hold_their_arguments_while_python_code_runs_inside_them() -> None:
    """Converting an argument may run Python code that empties the group, the short rows or moves the
    order out of the buffer: the kernels keep what they read (the cut is still right) or raise
    ValueError, and never use what was freed or not checked."""
    packet = bytes.fromhex("4500003c0001400040060000") + bytes(8) + bytes(12) + b"\x50\x10" + bytes(6) + bytes(range(20))
    src = bytearray(packet) + bytes(64)
    first = parse(src, 0, len(packet), 1, 10)
    assert not isinstance(first, Refused)
    group = [first]
    group[0] = first._replace(ident=Meddler(first.ident, group.clear))  # frees the packet, but for the kernel's hold
    out, want = bytearray(256), _numpy_cut(src, bytearray(256), 0, [first])
    gso_c.cut(src, None, None, out, None, 0, group)
    assert group == [] and out[:2 * 50] == want[:2 * 50]

    buf = bytearray(4 * 60)
    order = np.arange(4, dtype=np.intp)
    mask, step = merge_rule(40, 60, PROTO_TCP)
    short = {3: Meddler(30, lambda: order.__setitem__(1, 10**6))}
    with pytest.raises(ValueError):
        gso_c.check(buf, None, None, 0, 4, 60, 40, PROTO_TCP, short, mask, step, order)
    short = {}
    short[Meddler(3, short.clear)] = Meddler(30, short.clear)
    gso_c.check(buf, None, None, 0, 4, 60, 40, PROTO_TCP, short, mask, step)


# -- the plan and the merge in one call each (tun.coalesce with a planner and a merger) -------------------


def _units(coalescer: gso.Coalescer, seg: int, sizes: list[int], base: int, senders) -> tuple[list[bytes], gso.Plan]:
    plan = coalescer.plan(seg, sizes, base=base, senders=senders)
    return [b"".join(bytes(p) for p in plan.merge(a, b)) if b - a > 1 else bytes(plan.row(a))
            for a, b in plan.runs], plan


@given(flows(), st.data())
@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
def test_compiled_plan_and_merge_write_what_the_numpy_coalescer_writes(case, data) -> None:
    """Interleaved flows from two senders, hurt (lost, reordered, duplicated, damaged rows), laid out at
    any even offset: the compiled plan and merge give the very writes the Python plan (around the numpy
    checks) and merge give, each flow's in the same order, with the same counts of breaks and refused
    rows. Only the order across flows may differ (the C plan keeps the flows' order of arrival; the
    Python one groups them by hash), and the C plan counts every flow where the Python one, finding no
    break, leaves a table ungrouped as one."""
    require_compiled_kernels()  # (the Segmenter and Coalescer pick their kernels as the daemon does)
    seg_, flows_ = case
    for seg, senders, batches in receive(interleave(data, flows_)):
        sizes = [sum(map(len, batch)) for batch in batches]
        rows = [row for batch in batches for row in batch]
        # on a row boundary of the buffer (the C merge: cached payload views), or not (the Python merge)
        base = data.draw(st.sampled_from([0, seg, 2 * seg]) | st.integers(1, seg).map(lambda k: 2 * k))
        buf = bytearray(base + len(rows) * seg + gso.BUFFER_SIZE)
        for i, row in enumerate(rows):
            buf[base + i * seg:base + i * seg + len(row)] = row
        ours = gso.Coalescer(bytearray(buf), udp=True, jit=True)
        reference = gso.Coalescer(bytearray(buf), udp=True, jit=False)
        assert ours._planner is gso_c.plan and reference._planner is None
        got, plan = _units(ours, seg, sizes, base, senders)
        want, ref = _units(reference, seg, sizes, base, senders)
        assert by_flow(got) == by_flow(want) and sorted(got) == sorted(want)
        assert (plan.breaks, plan.refused) == (ref.breaks, ref.refused)
        assert plan.flows == ref.flows if ref.order is not None else plan.flows >= ref.flows
        assert sorted(plan.order or range(len(rows))) == list(range(len(rows)))


@given(st.data())
@settings(max_examples=300)
def test_compiled_plan_of_any_table_is_a_plan_of_its_rows_or_a_valueerror(data) -> None:
    """Any base, row size, header length, protocol, batch counts, senders and short rows over random
    bytes: either ValueError, or a plan whose runs cover every logical row once, in order, no longer
    than ``most``, over an order that is a permutation of the rows. The buffer is left as it was
    (``./dev sanitize`` runs this under ASan: no access outside it)."""
    buf = bytearray(data.draw(st.binary(min_size=200, max_size=3000)))
    proto = data.draw(st.sampled_from([PROTO_TCP, PROTO_UDP]))
    hl = data.draw(st.sampled_from([40, 44, 60, 120] if proto == PROTO_TCP else [28]))
    seg = 2 * data.draw(st.integers(hl // 2 + 1, 100))
    base = data.draw(st.integers(0, 40))
    in_buf = max((len(buf) - base) // seg, 0)
    assume(in_buf >= 1)
    counts = data.draw(st.lists(st.integers(1, 4), min_size=1, max_size=6))
    counts[-1] = max(1, min(counts[-1], in_buf - sum(counts[:-1])))
    senders = data.draw(st.none() | st.lists(st.integers(0, 2), min_size=len(counts), max_size=len(counts)))
    rows = sum(counts)
    short = data.draw(st.dictionaries(st.integers(0, max(rows - 1, 0)), st.integers(0, seg - 1), max_size=3))
    most = data.draw(st.integers(1, 50))
    for _ in range(data.draw(st.sampled_from([0, 0, 1, 2]))):  # then some of it hostile
        which = data.draw(st.sampled_from(["proto", "hl", "seg", "base", "counts", "senders", "short", "most"]))
        value = data.draw(st.one_of(st.integers(-4, 300), _hostile_int))
        if which == "counts":
            counts[data.draw(st.integers(0, len(counts) - 1))] = value
        elif which == "senders":
            senders = [value] * data.draw(st.integers(0, len(counts) + 1))
        elif which == "short":
            short[data.draw(_hostile_int)] = value
        else:
            proto, hl, seg, base, most = (value if which == name else old for name, old in
                                          (("proto", proto), ("hl", hl), ("seg", seg), ("base", base), ("most", most)))
    words = hl // 4 if isinstance(hl, int) and 0 < hl <= 120 else 7
    mask, step = np.full(words, 0xFFFFFFFF, np.uint32), np.zeros(words, np.uint32)
    before = bytes(buf)
    try:
        runs, order, flows_, breaks, refused = gso_c.plan(buf, base, seg, hl, proto, short, counts, senders, mask,
                                                          step, most)
    except ValueError:
        event("refused")
    else:
        event("planned")
        rows = sum(counts)
        assert 0 <= base and base + rows * seg <= len(buf)  # the table lies inside the buffer
        assert [i for a, b in runs for i in range(a, b)] == list(range(rows))
        assert all(1 <= b - a <= most for a, b in runs)
        assert sorted(order or range(rows)) == list(range(rows))
        assert 1 <= flows_ <= rows and 0 <= breaks < rows and 0 <= refused <= rows
    assert buf == before


def test_compiled_merge_refuses_runs_outside_its_buffer_or_views() -> None:
    """A run's rows are checked against the views and the buffer, its shape against IPv4's limits:
    ValueError or TypeError, never a read past them."""
    seg, hl = 100, 40
    buf = bytearray(10 * seg)
    views = [memoryview(buf)[o + hl:o + seg] for o in range(0, len(buf), seg)]
    ok = (buf, views, 0, None, 0, 3, seg, hl, PROTO_TCP, seg)
    assert len(gso_c.merge(*ok)) == 4
    for i, wrong in [(2, 8), (2, -1), (4, 2), (4, -1), (5, 1), (5, 11), (3, [0, 1, 99]), (3, [0, -1, 2]), (3, (0, 1, 2)),
                     (9, 40), (9, 101), (6, 0), (6, 40), (7, 100), (7, 8), (8, 4), (1, (views[0],)),
                     (2, 2**70)]:
        args = list(ok)
        args[i] = wrong
        with pytest.raises((ValueError, TypeError)):
            gso_c.merge(*args)
    with pytest.raises(ValueError):  # views past the buffer's end (a buffer shrunk since)
        gso_c.merge(bytearray(2 * seg), views, 0, None, 1, 3, seg, hl, PROTO_TCP, seg)
    with pytest.raises(ValueError):  # the first row (its headers are copied) past the end, the last inside
        gso_c.merge(bytearray(2 * seg), views, 0, [5, 0], 0, 2, seg, hl, PROTO_TCP, seg)
