"""When the fast path drains an fd and when it goes back to sleep: batching must not cost a lone
packet anything, and a bulk flow's ACKs must not wait.

A wake-up on a quiet fd (none for ``QUIET_NS``, and no batch moved for ``BULK_NS``) whose first read
is one ordinary packet forwards it and ends there, without reading on to EAGAIN — the
level-triggered event loop calls again if more came. That trailing read is what a request/response
exchange would otherwise wait for: on two vCPUs the next hop's process often needs the CPU this one
is still busy on. While batches move, the lone packets are ACKs, and draining them all at once is
what keeps the bulk flows fast. Both directions of the batch mover share one :class:`Pace`.
"""

from __future__ import annotations

import time

# A wake-up that comes this long after the previous one finds a quiet fd: if its first read is a lone
# packet, that packet is forwarded and the callback returns without reading on to EAGAIN. Under load
# wake-ups follow each other closely and every one drains the fd as before.
QUIET_NS = 100_000
# ...and not while batches are moving (a super-packet cut or a GRO batch checked in the last BULK_NS):
# then the lone packets are the bulk flows' ACKs, and one left behind waits for a whole batch's
# processing before the loop comes back to its fd — TCP throughput fell ~10 % that way.
BULK_NS = 10_000_000


class Pace:
    """Whether batches moved recently (:attr:`bulk_until`, on :attr:`clock`, in ns)."""

    clock = staticmethod(time.monotonic_ns)  # the tests replace it to make every fd busy, or quiet

    def __init__(self) -> None:
        self.bulk_until = 0  # batches moved recently: no fd counts as quiet before then

    def woke(self, last: int) -> tuple[bool, int]:
        """A wake-up after one at ``last``: (is the fd quiet, now)."""
        now = self.clock()
        return now - last > QUIET_NS and now > self.bulk_until, now

    def batch_moved(self) -> None:
        self.bulk_until = self.clock() + BULK_NS
