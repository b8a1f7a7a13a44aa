"""The dataplane's copy of each peer's path MTU — sans-IO.

The kernel learns path MTUs (RFC 1191): a router that cannot forward a DF datagram drops it and
answers with ICMP frag-needed, and the kernel keeps the next hop's MTU for that destination in its
route exception cache for ``net.ipv4.route.mtu_expires`` seconds (``ip route get`` shows
``cache expires Ns mtu N``). The kernel stays the truth; the engines (``udpflannel/engine.py``,
``udpflannel/fastpath.py``) read it when it matters and keep a copy here, for the peers whose path
is narrower than the interface: the fast path compares each super-packet for such a peer with it
once, and cuts its segments to fit before they reach the kernel.

How the path MTU is learnt — chosen by experiment (Linux 6.18, node → router → 1400-byte link →
node, as in ``tests/test_pmtu.py``):

- ``IP_PMTUDISC_DO`` on the shared UDP socket (``udpflannel.sockets.open_udp_socket``): DF on every
  datagram, and once the kernel knows a smaller path MTU, any send above it fails with EMSGSIZE,
  UDP_SEGMENT sends included (a segment size above it; older kernels' ``udp_send_skb`` said EINVAL).
  Linux's default, ``IP_PMTUDISC_WANT`` (flanneld's), gives the same EMSGSIZE for a GSO send but
  fragments a plain one locally: the first black-holed the fast path, the second fragmented every
  datagram of the per-packet path. ``IP_PMTUDISC_PROBE`` ignores the learnt value: every datagram
  above it is lost at the router.
- EMSGSIZE is the trigger, and ``getsockopt(IP_MTU)`` on a fresh *connected* socket the reading
  (``udpflannel.sockets.path_mtu``); the shared socket is unconnected and has no per-peer value. A
  socket kept connected is no good: it reports the route it cached at connect time.
- ``IP_RECVERR`` + ``MSG_ERRQUEUE`` would hand over each frag-needed (``ee_info`` = MTU) one send
  earlier, but those datagrams are lost at the router anyway, and on an unconnected socket every
  ICMP error (a port unreachable from a restarting peer, say) would then also fail the next receive
  once: not worth it. A netlink ``route get`` gives the same value as ``IP_MTU``, with more code.

Nothing pins a path low forever: the kernel forgets a learnt MTU after ``mtu_expires``, so the engines
re-read a narrowed peer's value every :func:`recheck_interval` and widen the copy when the kernel's
went up (if the path is still narrow, the next full-size datagrams teach the kernel again, as RFC
1191 §6.3 intends).
"""

from __future__ import annotations

from tun.layout import ENCAP_OVERHEAD  # path MTU − 28 is the largest inner packet
from udpflannel.routes import NextHop

SMALLEST_INNER = 68  # RFC 791: every IPv4 module takes 68 bytes; no path is believed narrower
RECHECK_MIN = 1.0  # seconds between two readings of one peer's path MTU, at least...
RECHECK_MAX = 60.0  # ...and at most: a flushed route cache (``ip route flush cache``) shows within a minute


def recheck_interval(mtu_expires: float) -> float:
    """How often to re-read a narrowed peer's path MTU: half the kernel's ``mtu_expires`` (so a
    widened path shows at most half an expiry late), within [RECHECK_MIN, RECHECK_MAX]."""
    return min(RECHECK_MAX, max(RECHECK_MIN, mtu_expires / 2))


def inner_limit(path_mtu: int, tun_mtu: int) -> int | None:
    """The largest inner packet that fits a path of ``path_mtu`` bytes, or None when the TUN's own
    MTU already fits (the common case: nothing to cut)."""
    limit = max(SMALLEST_INNER, path_mtu - ENCAP_OVERHEAD)
    return None if limit >= tun_mtu else limit


class PathMtus:
    """Per peer (``NextHop``) whose path is narrower than the interface: the largest inner packet
    that fits it (:attr:`limits`, which the fast path reads directly: an empty dict costs nothing)."""

    def __init__(self, *, tun_mtu: int) -> None:
        self.tun_mtu = tun_mtu
        self.limits: dict[NextHop, int] = {}

    def learn(self, hop: NextHop, path_mtu: int) -> int | None:
        """Take the kernel's path MTU to ``hop`` as read now; return the new limit (None: full size)."""
        limit = inner_limit(path_mtu, self.tun_mtu)
        if limit is None:
            self.limits.pop(hop, None)
        else:
            self.limits[hop] = limit
        return limit

    def forget(self, hop: NextHop) -> None:
        self.limits.pop(hop, None)
