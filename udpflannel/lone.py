"""A lone packet's pass in C: both movers' reader callbacks, where the extension was built.

A sparse packet (a ping, a request) wakes a sleeping daemon, and after a sleep the interpreter's code
and data are cold: a Python pass over one packet cost ~50 µs of CPU where it costs ~5 hot, and
four passes sat in every round trip (docs/latency.md). So the extension ``udpflannel._lone``
(``udpflannel/_lone.c``) registers with the event loop *as* the callback: a wake-up that reads an
ordinary packet decides and sends it without running any Python.

It takes only the common case, and hands everything else to the mover's Python with the rest of the
wake-up, before it has touched or counted the packet: drops (so ICMP, counters by verdict), the
packet trace, the fast path's super-packets and GRO batches and its reading on while batches move,
a full socket or TUN, errors. The mover's ``lone_*`` methods take those hand-overs
(``udpflannel/perpacket.py``, ``udpflannel/fastpath_out.py``, ``udpflannel/fastpath_in.py``).

The decisions are ``udpflannel.forward``'s, exactly (tests/test_lone.py compares the two under
hypothesis); the counters are the engine's own, added to in C. Without a compiler at install, or
with ``UDPFLANNEL_JIT=0`` (the switch that also picks the numpy kernels, ``tun.kernels``), the Python
callbacks run, and the start-up log says which.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import TYPE_CHECKING

from udpflannel.routes import RouteTable

if TYPE_CHECKING:
    from udpflannel.engine import Engine

ENV = "UDPFLANNEL_JIT"  # as tun.kernels.ENV (not imported: that would import numpy in a per-packet daemon)


def _load():
    if os.environ.get(ENV, "1") == "0":
        return None, f"turned off by {ENV}=0"
    try:
        from udpflannel import _lone
    except ImportError as exc:
        return None, (f"the C extension udpflannel._lone is not built ({exc}): install a C compiler and "
                      "python3-dev, then reinstall udpflannel")
    return _lone, ""


_lone, why_not = _load()


def compile_routes(table: RouteTable):
    """The table as the C pass searches it (``_lone.Routes``): called again whenever ``table.version`` moves."""
    return _lone.Routes([(int(net.network_address), net.prefixlen, hop) for net, hop in table.entries()])


def attach(engine: Engine, *, tun_side: object, udp_side: object, python_tun: Callable[[], None],
           python_udp: Callable[[], None], tun_buf, udp_buf, tun_hdr=None, pace=None, quiet_ns: int = 0,
           control_room: int = 0):
    """The C pass's two callbacks ``(tun_readable, udp_readable)`` for ``engine``, or None where the
    extension does not load (then the Python ones stay).

    ``tun_side`` and ``udp_side`` take the hand-overs (``lone_packet``, ``lone_datagram``, ...);
    ``python_tun``/``python_udp`` are the Python callbacks, which take whole wake-ups while the
    packet trace is on. The pass reads into ``tun_buf`` and ``udp_buf`` (the movers' own, so a
    hand-over finds the packet where the Python code would have read it). With a ``pace``
    (``udpflannel.pace.Pace``, and its ``quiet_ns``) a quiet fd's wake-up ends after its first packet.
    The fast path's pass (``tun_hdr``: the TUN's virtio_net_hdr goes there; ``control_room``: the
    UDP_GRO control data's) reads only a wake-up's first packet itself, and hands a busy fd over.
    """
    if _lone is None:
        return None
    c_pass = _lone.Pass(engine, engine.routes, compile_routes, tun_side, udp_side, python_tun, python_udp,
                        tun_buf, udp_buf, tun_hdr=tun_hdr, pace=pace, quiet_ns=quiet_ns, control_room=control_room)
    return c_pass.tun_readable, c_pass.udp_readable


def describe(attached: bool) -> str:
    """For the start-up log: who takes a lone packet (``attached``: what :func:`attach` returned)."""
    if attached:
        return "compiled (C)"
    return f"Python ({why_not or 'the mover was built without the C pass'})"
