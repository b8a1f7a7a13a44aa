"""tun.gso_jit: the compiled cut and GRO checks give exactly what tun.gso_numpy's reference gives.
(Every test in test_gso.py also runs with both; these compare them directly, on inputs built to reach
the numpy code's separate cases: several packets per cut, odd offsets, damaged GRO tables.)"""

from __future__ import annotations

import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from tests.conftest import require
from tests.gso_helpers import split
from tests.strategies import super_packets
from tests.test_gso import _with_ihl5, gso_hdr
from tun import gso, kernels
from tun.layout import MAX_IP_PACKET
from tun.segment import Refused


@pytest.fixture(autouse=True, scope="module")
def compiled() -> None:
    require(kernels.load(), f"the compiled GSO loops need numba (CI must have it): {kernels.why_not}")


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


@given(st.lists(super_packets(protocol=6, max_segments=6) | super_packets(protocol=17, max_segments=6),
                min_size=1, max_size=5), st.booleans())
@settings(suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
def test_compiled_cut_is_the_numpy_cut(cases, one_flow) -> None:
    """Several super-packets in one cut (alike ones are cut together, in the numpy code by templates
    and ramps or per packet): the compiled loop writes the same datagrams, byte for byte."""
    if one_flow:  # consecutive bursts of one flow, the common case (IDs and sequence numbers count on)
        cases = [cases[0]] * len(cases)
    buf, items = _laid_out(cases)
    got = {}
    for jit in (True, False):
        segmenter = gso.Segmenter(len(buf) * 2, jit=jit)
        results = segmenter.cut(bytearray(buf), items)
        got[jit] = [r if isinstance(r, Refused) else (r, [bytes(segmenter.out[r.start + j * r.size:r.start + j * r.size
                    + (r.size if j < r.count - 1 else r.last)]) for j in range(r.count)]) for r in results]
    assert got[True] == got[False]


@given(super_packets(protocol=6, max_segments=40) | super_packets(protocol=17, max_segments=40), st.data())
@settings(suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
def test_compiled_checks_are_the_numpy_checks(case, data) -> None:
    """A GRO table with some rows damaged (a flipped byte, a missing row, a stranger's row): the
    compiled checks make the same plan as the numpy ones, run for run."""
    packet, mss = case
    segments = split(_with_ihl5(packet), gso_hdr(_with_ihl5(packet), mss))
    assume(len(segments) > 2)
    for _ in range(data.draw(st.integers(0, 3))):
        i = data.draw(st.integers(0, len(segments) - 1))
        damaged = bytearray(segments[i])
        action = data.draw(st.sampled_from(["flip", "drop", "swap"]))
        if action == "flip":
            damaged[data.draw(st.integers(0, len(damaged) - 1))] ^= data.draw(st.integers(1, 255))
            segments[i] = bytes(damaged)
        elif action == "drop" and i < len(segments) - 1:
            del segments[i]
        elif i > 0 and len(segments[i]) == len(segments[i - 1]):
            segments[i - 1], segments[i] = segments[i], segments[i - 1]
    seg = len(segments[0])
    assume(all(len(s) == seg for s in segments[:-1]) and len(segments[-1]) <= seg)
    table = bytearray(gso.BUFFER_SIZE)
    total = sum(len(s) for s in segments)
    assume(total <= MAX_IP_PACKET)
    for i, s in enumerate(segments):
        table[i * seg:i * seg + len(s)] = s
    plans = {}
    for jit in (True, False):
        coalescer = gso.Coalescer(bytearray(table), udp=True, jit=jit)
        plan = coalescer.plan(seg, [total])
        plans[jit] = plan.runs
        plans[jit, "merged"] = [b"".join(bytes(x) for x in plan.merge(a, b)) for a, b in plan.runs if b - a > 1]
    assert plans[True] == plans[False] and plans[True, "merged"] == plans[False, "merged"]


@given(st.lists(super_packets(protocol=6, max_segments=6), min_size=1, max_size=4), st.integers(68, 1500))
@settings(suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
def test_compiled_cut_for_a_narrower_path_is_the_numpy_cut(cases, largest) -> None:
    """Super-packets cut at the smaller size a narrow path asks for (``fit_segment_size``): the two
    backends still write the same datagrams, byte for byte."""
    buf, items = _laid_out(cases)
    items = [(at, n, gso_type, gso.fit_segment_size(buf, at, n, gso_type, mss, largest))
             for at, n, gso_type, mss in items]
    got = {}
    for jit in (True, False):
        segmenter = gso.Segmenter(len(buf) * 4, jit=jit)
        results = segmenter.cut(bytearray(buf), items)
        got[jit] = [r if isinstance(r, Refused) else (r, bytes(segmenter.out[r.start:r.start + (r.count - 1) * r.size + r.last]))
                    for r in results]
    assert got[True] == got[False]
