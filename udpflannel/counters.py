"""Plain-integer counters the hot path bumps; everything else (Prometheus, ``status``) reads them.

Attribute increments on a slotted object are the cheapest bookkeeping Python has (~20 ns), so the
per-packet cost of honest accounting stays small. ``tun_drops`` (packets read from the TUN) and
``udp_drops`` (datagrams from the socket) are lists indexed by ``Verdict``.
"""

from __future__ import annotations

from udpflannel.packet import Verdict


class Counters:
    __slots__ = (
        "tun_wakeups", "tun_reads", "tun_packets", "tun_bytes", "tun_writes",
        "udp_wakeups", "udp_recvs", "udp_packets", "udp_bytes", "udp_sends",
        "sent_packets", "sent_bytes", "delivered_packets", "delivered_bytes",
        "send_errors", "tun_write_errors", "backpressure_pauses",
        "icmp_sent", "icmp_rate_limited", "tun_drops", "udp_drops",
        # the fast path's batches (udpflannel/fastpath.py): how many wire packets each syscall moved.
        # There, tun_packets counts the segments a super-packet was cut into (wire packets), and
        # tun_superpackets the TSO/USO reads they came from.
        "tun_superpackets", "udp_gso_sends", "udp_gso_datagrams", "udp_gro_recvs", "udp_gro_datagrams",
        "tun_gso_writes", "tun_gso_segments", "udp_gso_fallbacks",
        # the receive side's per-flow coalescing (tun/coalesce.py): tables checked, flows found in them
        # (a table that needed no grouping — one flow, or flows one after another — counts 1),
        # neighbours within a flow that were not merged because the merge rule broke (a gap, a
        # reordering, a duplicate, a changed header), rows that failed the table's checks (damaged,
        # or of another kind than its first row: never merged)
        "gro_tables", "gro_flows", "gro_breaks", "gro_refused",
        # a peer behind a narrower path (udpflannel/pmtu.py): TCP packets and super-packets cut smaller
        # to fit it, sends the kernel refused (EMSGSIZE) and that were redone at its path MTU, and
        # inner packets without DF fragmented to fit (those with DF: tun_drops[TOO_BIG])
        "pmtu_cuts", "pmtu_refits", "fragmented_packets",
    )

    def __init__(self) -> None:
        for name in self.__slots__:
            setattr(self, name, 0)
        self.tun_drops: list[int] = [0] * (max(Verdict) + 1)
        self.udp_drops: list[int] = [0] * (max(Verdict) + 1)

    # -- derived figures: what the brief calls "overhead per packet as a number" -------------------
    @property
    def syscalls(self) -> int:
        return self.tun_reads + self.tun_writes + self.udp_recvs + self.udp_sends

    @property
    def packets(self) -> int:
        return self.tun_packets + self.udp_packets

    def as_dict(self) -> dict[str, object]:
        out: dict[str, object] = {n: getattr(self, n) for n in self.__slots__ if not n.endswith("_drops")}
        out["drops"] = {
            direction: {Verdict(i).name.lower(): c for i, c in enumerate(drops) if i != Verdict.FORWARD}
            for direction, drops in (("tun_to_udp", self.tun_drops), ("udp_to_tun", self.udp_drops))
        }
        packets = self.packets
        out["syscalls_per_packet"] = round(self.syscalls / packets, 3) if packets else 0.0
        out["packets_per_tun_wakeup"] = round(self.tun_packets / self.tun_wakeups, 2) if self.tun_wakeups else 0.0
        out["packets_per_udp_wakeup"] = round(self.udp_packets / self.udp_wakeups, 2) if self.udp_wakeups else 0.0
        out["batches"] = self.batches()
        return out

    def batches(self) -> dict[str, float]:
        """Mean wire packets per syscall, per call (EAGAIN calls included): 1.0 on the per-packet path."""
        def ratio(a: int, b: int) -> float:
            return round(a / b, 2) if b else 0.0

        return {
            "tun_read": ratio(self.tun_packets, self.tun_reads),
            "udp_send": ratio(self.sent_packets, self.udp_sends),
            "udp_recv": ratio(self.udp_packets, self.udp_recvs),
            "tun_write": ratio(self.delivered_packets, self.tun_writes),
        }
