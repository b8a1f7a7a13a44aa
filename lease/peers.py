"""The peer table: lease records seen in etcd in, route events for the dataplane out (§5.2, fixed).

Sans-IO. The watch loop feeds it a snapshot (:meth:`PeerTable.reset`) and then single PUT/DELETE
records; each call returns the events to deliver. Differences from flanneld's LeaseWatcher:

- a malformed key or value is logged and ignored: it never removes any route (flanneld drops all, §5.3);
  a malformed PUT on a known key keeps that key's last good value;
- a resync (:meth:`reset`) yields a :class:`Snapshot` the dataplane replaces its table with, so changed
  PublicIPs and vanished peers are both picked up (flanneld misses the former, §5.2);
- a PUT that changes nothing (a Go node's renewal) yields no event; DELETE of an unknown key neither;
- the own subnet is excluded by subnet equality at all times, including after it changes, and a record
  with host bits set in its key, or with no PublicIP, is not routed;
- a record naming this node's own PublicIP (a stale lease of ours, under another subnet) is not routed:
  flanneld routes it to itself (§5.5), so its traffic loops until the TTL runs out; here it has no
  route, and a sender gets ICMP net-unreachable.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from ipaddress import IPv4Address, IPv4Network

from lease.events import PeerAdded, PeerRemoved, Snapshot
from lease.records import LeaseAttrs, Malformed, decode_lease_value, parse_subnet_key

log = logging.getLogger(__name__)

PeerEvent = PeerAdded | PeerRemoved


class PeerTable:
    def __init__(self, prefix: str, own: IPv4Network | None = None, own_ip: IPv4Address | None = None) -> None:
        self._prefix = prefix
        self._own = own
        self._own_ip = own_ip
        self._records: dict[str, tuple[IPv4Network, IPv4Address]] = {}
        self._by_subnet: dict[IPv4Network, dict[str, IPv4Address]] = {}
        self.ignored = 0  # malformed records seen (for metrics and tests)

    @property
    def own(self) -> IPv4Network | None:
        return self._own

    @property
    def peers(self) -> dict[IPv4Network, IPv4Address]:
        """What the dataplane should route now: subnet -> PublicIP."""
        return {s: ip for s in self._by_subnet if (ip := self._view(s)) is not None}

    def snapshot(self) -> Snapshot:
        return Snapshot(tuple(PeerAdded(s, ip) for s, ip in sorted(self.peers.items())))

    # -- inputs ---------------------------------------------------------------------------------------

    def reset(self, records: Iterable[tuple[bytes | str, bytes | str]]) -> Snapshot:
        """Replace everything with a full listing of ``(key, value)`` pairs."""
        fresh: dict[str, tuple[IPv4Network, IPv4Address]] = {}
        for key, value in records:
            name = _text(key)
            parsed = self._parse(name, value)
            if parsed is not None:
                fresh[name] = parsed
            elif name in self._records:
                fresh[name] = self._records[name]  # a bad value does not remove a known route
        self._records = {}
        self._by_subnet = {}
        for name, (subnet, ip) in fresh.items():
            self._store(name, subnet, ip)
        return self.snapshot()

    def put(self, key: bytes | str, value: bytes | str) -> list[PeerEvent]:
        name = _text(key)
        parsed = self._parse(name, value)
        if parsed is None:
            return []
        subnet, ip = parsed
        before = self._view(subnet)
        self._drop(name)
        self._store(name, subnet, ip)
        return self._diff(subnet, before)

    def delete(self, key: bytes | str) -> list[PeerEvent]:
        name = _text(key)
        if name not in self._records:
            if self._subnet(name) is None:
                self.ignored += 1
            return []
        subnet = self._records[name][0]
        before = self._view(subnet)
        self._drop(name)
        return self._diff(subnet, before)

    def set_own(self, subnet: IPv4Network | None) -> list[PeerEvent]:
        """Our lease changed: the old own subnet may become a peer, the new one stops being one."""
        old = self._own
        affected = [s for s in (old, subnet) if s is not None]
        before = {s: self._view(s) for s in affected}
        self._own = subnet
        events: list[PeerEvent] = []
        for s in dict.fromkeys(affected):
            events += self._diff(s, before[s])
        return events

    # -- internals ------------------------------------------------------------------------------------

    def _subnet(self, name: str) -> IPv4Network | None:
        parsed = parse_subnet_key(self._prefix, name)
        if isinstance(parsed, Malformed):
            log.warning("ignoring lease record: %s", parsed.reason)
            return None
        if parsed.host_bits:
            log.warning("ignoring lease record %r: host bits set in the subnet", name)
            return None
        return parsed.subnet

    def _parse(self, name: str, value: bytes | str) -> tuple[IPv4Network, IPv4Address] | None:
        subnet = self._subnet(name)
        attrs = decode_lease_value(value) if subnet is not None else None
        if isinstance(attrs, Malformed):
            log.warning("ignoring lease record %r: %s", name, attrs.reason)
            attrs = None
        elif isinstance(attrs, LeaseAttrs) and attrs.public_ip.is_unspecified:
            log.warning("ignoring lease record %r: no PublicIP", name)
            attrs = None
        if subnet is None or attrs is None:
            self.ignored += 1
            return None
        return subnet, attrs.public_ip

    def _view(self, subnet: IPv4Network) -> IPv4Address | None:
        """Where ``subnet`` is routed: its first holder (in key order) that is not this node."""
        if subnet == self._own:
            return None
        holders = self._by_subnet.get(subnet, {})
        return next((holders[name] for name in sorted(holders) if holders[name] != self._own_ip), None)

    def _store(self, name: str, subnet: IPv4Network, ip: IPv4Address) -> None:
        self._records[name] = (subnet, ip)
        self._by_subnet.setdefault(subnet, {})[name] = ip

    def _drop(self, name: str) -> None:
        old = self._records.pop(name, None)
        if old is not None:
            holders = self._by_subnet[old[0]]
            del holders[name]
            if not holders:
                del self._by_subnet[old[0]]

    def _diff(self, subnet: IPv4Network, before: IPv4Address | None) -> list[PeerEvent]:
        after = self._view(subnet)
        if after is None:
            return [PeerRemoved(subnet)] if before is not None else []
        return [PeerAdded(subnet, after)] if after != before else []


def _text(key: bytes | str) -> str:
    return key.decode(errors="replace") if isinstance(key, bytes) else key
