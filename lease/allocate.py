"""Choosing the subnet to lease (§4.1): reuse by PublicIP, else the previous subnet, else a random free one.

Pure: the records found in etcd, the config and an ``rng`` go in; a :class:`Reuse` or :class:`Create`
plan comes out, or :class:`~lease.errors.OutOfSubnets`. Unlike flanneld (which draws from the first
100 free subnets above SubnetMin) the draw is uniform over **all** free subnets, computed from the merged
occupied ranges so that a /8 split into /30s costs no more than a /16 split into /24s.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from ipaddress import IPv4Address, IPv4Network
from typing import Protocol

from lease.config import NetworkConfig
from lease.errors import OutOfSubnets


class Rng(Protocol):
    def randrange(self, stop: int, /) -> int: ...


@dataclass(frozen=True, slots=True)
class Existing:
    """A lease record found under ``<prefix>/subnets/``, as allocation sees it."""

    key: str
    subnet: IPv4Network
    canonical: bool = True
    public_ip: IPv4Address | None = None  # None: the value was malformed


@dataclass(frozen=True, slots=True)
class Reuse:
    """Keep ``existing`` (it holds our PublicIP and fits the config)."""

    existing: Existing
    stale: tuple[Existing, ...] = ()


@dataclass(frozen=True, slots=True)
class Create:
    """Create a new record for ``subnet``; ``why`` is "previous" (from subnet.env) or "random"."""

    subnet: IPv4Network
    why: str
    stale: tuple[Existing, ...] = ()


def fits(config: NetworkConfig, record: Existing) -> bool:
    return record.canonical and config.is_compatible(record.subnet)


def candidate_count(config: NetworkConfig) -> int:
    lo, hi = int(config.subnet_min), int(config.subnet_max)
    return 0 if hi < lo else (hi - lo) // config.subnet_size + 1


def candidate(config: NetworkConfig, index: int) -> IPv4Network:
    return IPv4Network((int(config.subnet_min) + index * config.subnet_size, config.subnet_len))


def blocked_ranges(config: NetworkConfig, taken: Iterable[IPv4Network]) -> list[tuple[int, int]]:
    """Sorted, merged, inclusive ranges of candidate indexes that overlap a taken subnet."""
    size, base, count = config.subnet_size, int(config.subnet_min), candidate_count(config)
    ranges = []
    for net in taken:
        start, end = int(net.network_address), int(net.broadcast_address) + 1
        lo = max((start - base) // size, 0)
        hi = min((end - base + size - 1) // size - 1, count - 1)
        if lo <= hi:
            ranges.append((lo, hi))
    ranges.sort()
    merged: list[tuple[int, int]] = []
    for lo, hi in ranges:
        if merged and lo <= merged[-1][1] + 1:
            merged[-1] = (merged[-1][0], max(merged[-1][1], hi))
        else:
            merged.append((lo, hi))
    return merged


def free_count(config: NetworkConfig, taken: Iterable[IPv4Network]) -> int:
    return candidate_count(config) - sum(hi - lo + 1 for lo, hi in blocked_ranges(config, taken))


def nth_free(config: NetworkConfig, taken: Iterable[IPv4Network], n: int) -> IPv4Network:
    """The ``n``-th (0-based, ascending) free candidate; ``n`` must be below :func:`free_count`."""
    index = n
    for lo, hi in blocked_ranges(config, taken):
        if index < lo:
            break
        index += hi - lo + 1
    if index >= candidate_count(config):
        raise IndexError(f"only {free_count(config, taken)} free subnets, asked for #{n}")
    return candidate(config, index)


def pick_free(config: NetworkConfig, taken: Sequence[IPv4Network], rng: Rng) -> IPv4Network:
    free = free_count(config, taken)
    if free == 0:
        raise OutOfSubnets(
            f"all {candidate_count(config)} /{config.subnet_len} subnets from {config.subnet_min} "
            f"to {config.subnet_max} are leased"
        )
    return nth_free(config, taken, rng.randrange(free))


def plan_acquire(
    config: NetworkConfig,
    existing: Sequence[Existing],
    *,
    public_ip: IPv4Address,
    previous: IPv4Network | None,
    rng: Rng,
) -> Reuse | Create:
    """Decide what to lease. ``existing`` must be in etcd key order (byte-lexicographic), as listed."""
    mine = [r for r in existing if r.public_ip == public_ip]
    stale = tuple(r for r in mine if not fits(config, r))
    for record in mine:
        if fits(config, record):
            return Reuse(record, stale)
    taken = [r.subnet for r in existing]
    if (
        previous is not None
        and config.is_compatible(previous)
        and not any(previous.overlaps(net) for net in taken)
    ):
        return Create(previous, "previous", stale)
    return Create(pick_free(config, taken, rng), "random", stale)
