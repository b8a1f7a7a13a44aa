"""flanneld's resync loop, for everything the daemon keeps in place behind the operator's back.

Every ``--iptables-resync`` seconds, each kept thing (the iptables chains, the nftables table, the
blackhole route) is checked; one that was changed or deleted is put back. What is kept is asked for
anew each period, so a lease change (new pod subnet) is followed without restarting the loop, and the
daemon holds ``lock`` while it replaces the set, so a resync never restores the old subnet's rules.
"""

from __future__ import annotations

import asyncio
import logging
import subprocess
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from udpflannel.errors import SetupError

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Kept:
    """One thing the resync keeps: its name for the log, a check, and how to put it back.

    ``intact`` and ``restore`` block (they run iptables, libnftables or netlink): they are called in a
    worker thread.
    """

    what: str
    intact: Callable[[], bool]
    restore: Callable[[], object]


async def keep(current: Callable[[], Sequence[Kept]], *, period: float, lock: asyncio.Lock) -> None:
    """Forever: sleep ``period`` s, then check every kept thing and restore the ones that changed."""
    while True:
        await asyncio.sleep(period)
        async with lock:
            for item in current():
                try:
                    if not await asyncio.to_thread(item.intact):
                        log.warning("%s was changed; restoring it", item.what)
                        await asyncio.to_thread(item.restore)
                except (SetupError, OSError, subprocess.SubprocessError) as exc:
                    log.warning("resync of %s failed: %s", item.what, exc)
