"""Watching: follow a key or a prefix in etcd forever, from a revision, losing no event.

The generic loop both watches of the subnet manager run (the peers' prefix, and our own key): a broken
stream or request is retried with :class:`~lease.etcd.Backoff` from the last revision seen, so no event
is lost across reconnects; after a compaction the caller's ``resync`` re-reads what it follows.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable

from lease.errors import EtcdUnavailable
from lease.etcd import Backoff, Compacted, EtcdSession

log = logging.getLogger(__name__)


async def follow(
    session: EtcdSession,
    what: str,
    key: bytes,
    range_end: bytes | None,
    rev: int | None,
    resync: Callable[[], Awaitable[int | None]],
    handle: Callable[[object], bool],
) -> None:
    """Watch from ``rev`` forever, calling ``handle`` per event until it returns True.

    ``resync`` runs first when ``rev`` is None and again after a compaction; it returns the revision
    to watch from, or None to stop. A failed stream or request is retried with :class:`Backoff`,
    from the last revision seen, so no event is lost across reconnects.
    """
    backoff = Backoff()
    while True:
        try:
            if rev is None:
                rev = await resync()
                if rev is None:
                    return
                backoff.reset()
            async with contextlib.aclosing(
                session.watch(key, range_end=range_end, start_revision=rev)
            ) as stream:
                async for resp in stream:
                    backoff.reset()
                    for event in resp.events:
                        if handle(event):
                            return
                    rev = _advance(rev, resp)
        except Compacted as e:
            log.warning("%s: %s; resyncing", what, e)
            rev = None
        except EtcdUnavailable as e:
            delay = backoff.next()
            log.warning("%s: %s; reconnecting from rev %s in %.1f s", what, e, rev, delay)
            await asyncio.sleep(delay)
        except Exception:
            log.exception("%s failed; restarting it", what)
            await asyncio.sleep(backoff.next())


class Put:
    """A PUT watch event rebuilt from a read, to judge our key with the same rule."""

    type = 0

    def __init__(self, kv) -> None:
        self.kv = kv


def _advance(rev: int, resp) -> int:
    """The revision to resume from after ``resp``: past its last event, or past a progress notification."""
    if resp.events:
        return max(rev, resp.events[-1].kv.mod_revision + 1)
    if not resp.created and resp.header.revision:
        return max(rev, resp.header.revision + 1)
    return rev
