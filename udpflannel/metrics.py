"""Prometheus exposition of the dataplane counters (prometheus-client, text format).

The hot path only bumps plain integers (``udpflannel.counters``); this collector turns them into
metric families when scraped, so scraping costs nothing per packet.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric

from udpflannel.counters import Counters
from udpflannel.packet import Verdict

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"


class DataplaneCollector:
    """Reads ``Counters`` (and a few gauges supplied by the daemon) at scrape time."""

    def __init__(self, counters: Callable[[], Counters], gauges: Callable[[], dict[str, float]]) -> None:
        self._counters = counters
        self._gauges = gauges

    def collect(self) -> Iterator[Metric]:
        c = self._counters()
        yield _labelled("udpflannel_packets", "Packets read, by direction", "direction",
                        {"tun_to_udp": c.tun_packets, "udp_to_tun": c.udp_packets})
        yield _labelled("udpflannel_forwarded_packets", "Packets forwarded, by direction", "direction",
                        {"tun_to_udp": c.sent_packets, "udp_to_tun": c.delivered_packets})
        yield _labelled("udpflannel_bytes", "Bytes read, by direction", "direction",
                        {"tun_to_udp": c.tun_bytes, "udp_to_tun": c.udp_bytes})
        drops = CounterMetricFamily("udpflannel_drops", "Packets dropped, by direction and reason (a Verdict)",
                                    labels=["direction", "reason"])
        for direction, counts in (("tun_to_udp", c.tun_drops), ("udp_to_tun", c.udp_drops)):
            for verdict in Verdict:
                if verdict != Verdict.FORWARD:
                    drops.add_metric([direction, verdict.name.lower()], counts[verdict])
        yield drops
        yield _labelled("udpflannel_wakeups", "Event-loop wake-ups, by file descriptor", "fd",
                        {"tun": c.tun_wakeups, "udp": c.udp_wakeups})
        yield _labelled("udpflannel_syscalls", "Data-path system calls (EAGAIN included)", "call",
                        {"tun_read": c.tun_reads, "tun_write": c.tun_writes, "udp_recv": c.udp_recvs, "udp_send": c.udp_sends})
        yield CounterMetricFamily("udpflannel_icmp_sent", "ICMP errors originated", value=c.icmp_sent)
        yield CounterMetricFamily("udpflannel_icmp_rate_limited", "ICMP errors suppressed by the rate limit", value=c.icmp_rate_limited)
        yield CounterMetricFamily("udpflannel_send_errors", "UDP sends that failed", value=c.send_errors)
        yield CounterMetricFamily("udpflannel_backpressure_pauses", "Times a full queue paused reading", value=c.backpressure_pauses)
        per_wakeup = GaugeMetricFamily("udpflannel_packets_per_wakeup", "Mean packets handled per wake-up", labels=["fd"])
        per_wakeup.add_metric(["tun"], c.tun_packets / c.tun_wakeups if c.tun_wakeups else 0.0)
        per_wakeup.add_metric(["udp"], c.udp_packets / c.udp_wakeups if c.udp_wakeups else 0.0)
        yield per_wakeup
        yield GaugeMetricFamily("udpflannel_syscalls_per_packet", "Data-path system calls per packet read",
                                value=c.syscalls / c.packets if c.packets else 0.0)
        batches = GaugeMetricFamily("udpflannel_packets_per_syscall",
                                    "Mean wire packets moved per data-path system call (1 on the per-packet path)",
                                    labels=["call"])
        for call, value in c.batches().items():
            batches.add_metric([call], value)
        yield batches
        yield CounterMetricFamily("udpflannel_udp_gso_fallbacks", "GSO sends refused with EIO (GSO then off)",
                                  value=c.udp_gso_fallbacks)
        yield CounterMetricFamily("udpflannel_pmtu_cuts", "TCP packets cut smaller to fit a narrower path to their peer",
                                  value=c.pmtu_cuts)
        yield CounterMetricFamily("udpflannel_pmtu_refits",
                                  "Sends refused with EMSGSIZE (a narrower path learnt) and redone to fit it",
                                  value=c.pmtu_refits)
        yield CounterMetricFamily("udpflannel_fragmented_packets",
                                  "Inner packets without DF fragmented to fit a narrower path", value=c.fragmented_packets)
        for name, value in self._gauges().items():
            yield GaugeMetricFamily(f"udpflannel_{name}", name.replace("_", " "), value=value)


def _labelled(name: str, documentation: str, label: str, values: dict[str, float]) -> CounterMetricFamily:
    family = CounterMetricFamily(name, documentation, labels=[label])
    for value_label, value in values.items():
        family.add_metric([value_label], value)
    return family


def make_registry(counters: Callable[[], Counters], gauges: Callable[[], dict[str, float]]) -> CollectorRegistry:
    registry = CollectorRegistry(auto_describe=False)
    registry.register(DataplaneCollector(counters, gauges))  # type: ignore[arg-type]
    return registry


def render(registry: CollectorRegistry) -> bytes:
    return generate_latest(registry)
