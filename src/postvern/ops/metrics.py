"""Prometheus metrics (``prometheus-client``): every listener, the queue, bans, logins,
deliveries, the edge's scan detection and the watchdog, served on ``/metrics`` to loopback.

Most values are read from the running server when a scrape comes (a custom collector, so
nothing is counted twice and nothing drifts); the few events nobody else counts — deliveries
by outcome, scan offences, watchdog alerts — are counters kept here. The registry is the
server's own, not the library's global one, so several servers in one process (tests)
never mix. With several worker processes each serves its own figures; Prometheus sums them
by the ``instance`` it scrapes.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

from prometheus_client import CollectorRegistry, Counter, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"


@dataclass
class Snapshot:
    """What the server knows now; filled by the server's ``snapshot`` callable."""

    sessions: dict[str, float] = field(default_factory=dict)  # listener → open sessions
    connections: dict[str, float] = field(default_factory=dict)  # listener → accepted, total
    kdf_runs: int = 0
    warm_logins: int = 0
    mailboxes_unlocked: int = 0
    bans_active: int = 0
    outbound_in_flight: int = 0
    queue_entries: int = 0
    queue_oldest_seconds: float = 0.0
    certificate_expiry_timestamp: float = 0.0
    filter_scans: int = 0
    extra: dict[str, float] = field(default_factory=dict)  # further gauges, by full name


class _ServerCollector(Collector):
    def __init__(self, snapshot: Callable[[], Snapshot]) -> None:
        self._snapshot = snapshot

    def collect(self) -> Iterator[Metric]:
        s = self._snapshot()
        sessions = GaugeMetricFamily(
            "postvern_sessions_open", "Sessions open now, per listener", labels=["listener"]
        )
        for name, value in sorted(s.sessions.items()):
            sessions.add_metric([name], value)
        yield sessions
        accepted = CounterMetricFamily(
            "postvern_connections", "Connections accepted, per listener", labels=["listener"]
        )
        for name, value in sorted(s.connections.items()):
            accepted.add_metric([name], value)
        yield accepted
        yield CounterMetricFamily("postvern_kdf_runs", "Argon2id runs (cold logins)", s.kdf_runs)
        yield CounterMetricFamily(
            "postvern_warm_logins", "Logins answered from the warm cache", s.warm_logins
        )
        yield GaugeMetricFamily(
            "postvern_mailboxes_unlocked", "Mailboxes open now", s.mailboxes_unlocked
        )
        yield GaugeMetricFamily("postvern_bans_active", "Client networks banned now", s.bans_active)
        yield GaugeMetricFamily(
            "postvern_outbound_in_flight", "Outbound deliveries under way", s.outbound_in_flight
        )
        yield GaugeMetricFamily("postvern_queue_entries", "Messages in the queue", s.queue_entries)
        yield GaugeMetricFamily(
            "postvern_queue_oldest_seconds",
            "Age of the oldest queued message",
            s.queue_oldest_seconds,
        )
        yield GaugeMetricFamily(
            "postvern_certificate_expiry_timestamp_seconds",
            "When the TLS certificate expires (Unix time)",
            s.certificate_expiry_timestamp,
        )
        for name, value in sorted(s.extra.items()):
            yield GaugeMetricFamily(name, name.replace("_", " "), value)


class Metrics:
    """The server's registry: its collector and the counters of events."""

    def __init__(self, snapshot: Callable[[], Snapshot]) -> None:
        self.registry = CollectorRegistry(auto_describe=False)
        self.registry.register(_ServerCollector(snapshot))
        self.deliveries = Counter(
            "postvern_deliveries",
            "Outbound recipients by the outcome of an attempt",
            ["outcome"],
            registry=self.registry,
        )
        self.scan_offences = Counter(
            "postvern_scan_offences",
            "Connections seen as scanning or garbage at the edge, by kind",
            ["kind"],
            registry=self.registry,
        )
        self.alerts = Counter(
            "postvern_watchdog_alerts",
            "Alerts the watchdog raised, by kind",
            ["kind"],
            registry=self.registry,
        )
        self.started = time.time()

    def render(self) -> bytes:
        return generate_latest(self.registry)

    def value(self, name: str, **labels: str) -> float:
        """One sample's value (0 when absent): what the watchdog and tests read back."""
        found = self.registry.get_sample_value(name, labels or None)
        return 0.0 if found is None else found
