"""Prometheus metrics, with one registry per app so two daemons can share a process (tests).

Counters and histograms are updated where things happen; per-remote gauges (up, last ping
age, round trip, clock skew) are computed at scrape time from the heartbeat's state by a
collector, so a ping costs no metric update per remote. Labels are route names, results and
remote *names*, never ids or paths.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Histogram,
    PlatformCollector,
    ProcessCollector,
    generate_latest,
)
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

PREFIX = "remoteclusterd"
# Per-remote series carry the name (for people) and the id (names need not be unique).
LABELS = ["remote", "remote_id"]


@dataclass(frozen=True, slots=True)
class RemoteGauges:
    """One remote's liveness figures, read at scrape time."""

    name: str
    remote_id: str
    up: bool
    last_ping_age_seconds: float | None
    rtt_seconds: float | None
    clock_skew_seconds: float | None


class _RemoteCollector(Collector):
    def __init__(self, source: Callable[[], Iterable[RemoteGauges]]) -> None:
        self._source = source

    def collect(self) -> Iterator[GaugeMetricFamily]:
        up = GaugeMetricFamily(f"{PREFIX}_remote_up", "1 while the remote is online", labels=LABELS)
        age = GaugeMetricFamily(
            f"{PREFIX}_remote_last_ping_age_seconds",
            "Seconds since the last successful outbound ping",
            labels=LABELS,
        )
        rtt = GaugeMetricFamily(
            f"{PREFIX}_remote_ping_rtt_seconds", "Round trip of the last ping", labels=LABELS
        )
        skew = GaugeMetricFamily(
            f"{PREFIX}_remote_clock_skew_seconds",
            "Estimated clock offset of the remote (positive: its clock is ahead)",
            labels=LABELS,
        )
        for gauges in self._source():
            labels = [gauges.name, gauges.remote_id]
            up.add_metric(labels, 1.0 if gauges.up else 0.0)
            if gauges.last_ping_age_seconds is not None:
                age.add_metric(labels, gauges.last_ping_age_seconds)
            if gauges.rtt_seconds is not None:
                rtt.add_metric(labels, gauges.rtt_seconds)
            if gauges.clock_skew_seconds is not None:
                skew.add_metric(labels, gauges.clock_skew_seconds)
        yield from (up, age, rtt, skew)


class _DepthCollector(Collector):
    def __init__(self, source: Callable[[], dict[tuple[str, str], int]]) -> None:
        self._source = source

    def collect(self) -> Iterator[GaugeMetricFamily]:
        depth = GaugeMetricFamily(
            f"{PREFIX}_outbox_queued", "Messages waiting for delivery", labels=LABELS
        )
        for (name, remote_id), queued in sorted(self._source().items()):
            depth.add_metric([name, remote_id], float(queued))
        yield depth


class Metrics:
    """The daemon's metrics and their registry."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        ProcessCollector(registry=self.registry)
        PlatformCollector(registry=self.registry)
        self.pings = Counter(
            f"{PREFIX}_heartbeat_pings",
            "Outbound pings by result",
            ["result"],
            registry=self.registry,
        )
        self.ping_seconds = Histogram(
            f"{PREFIX}_heartbeat_ping_seconds",
            "Round trip of successful outbound pings",
            buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 15),
            registry=self.registry,
        )
        self.ping_lateness = Histogram(
            f"{PREFIX}_heartbeat_lateness_seconds",
            "How late each ping started against its schedule",
            buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 5),
            registry=self.registry,
        )
        self.liveness_transactions = Counter(
            f"{PREFIX}_heartbeat_liveness_transactions",
            "Disk transactions spent writing last_ping_at (batched)",
            registry=self.registry,
        )
        self.outbox_messages = Counter(
            f"{PREFIX}_outbox_messages",
            "Outbox messages by state reached (queued, delivered, rejected, dead)",
            ["state"],
            registry=self.registry,
        )
        self.outbox_attempts = Counter(
            f"{PREFIX}_outbox_attempts",
            "Delivery attempts by outcome (final or retry)",
            ["result"],
            registry=self.registry,
        )
        self.upload_bytes = Counter(
            f"{PREFIX}_upload_received_bytes",
            "Bytes of files received from peers and committed to disk",
            registry=self.registry,
        )
        self.upload_sessions = Counter(
            f"{PREFIX}_upload_sessions",
            "Upload sessions opened by peers, and completed",
            ["event"],
            registry=self.registry,
        )
        self.files_sent = Counter(
            f"{PREFIX}_files_sent",
            "Files this daemon sent, by final state (completed, rejected, dead)",
            ["state"],
            registry=self.registry,
        )
        self.files_sent_bytes = Counter(
            f"{PREFIX}_files_sent_bytes",
            "Bytes of files sent to peers in requests that completed",
            registry=self.registry,
        )
        self.requests = Counter(
            f"{PREFIX}_http_requests",
            "HTTP requests served, by route name and status",
            ["route", "status"],
            registry=self.registry,
        )
        self.request_seconds = Histogram(
            f"{PREFIX}_http_request_seconds",
            "Time to answer an HTTP request, by route name",
            ["route"],
            buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 10, 60),
            registry=self.registry,
        )
        self.auth_failures = Counter(
            f"{PREFIX}_auth_failures",
            "Refused credentials, by kind (operator, remote, metrics) and reason",
            ["kind", "reason"],
            registry=self.registry,
        )
        self.loop_lag = Histogram(
            f"{PREFIX}_event_loop_lag_seconds",
            "How late a 20 ms timer fires: time the event loop was busy or blocked",
            buckets=(0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.25, 0.5, 1, 5),
            registry=self.registry,
        )
        self.transitions = Counter(
            f"{PREFIX}_remote_transitions",
            "Online/offline transitions announced",
            ["to"],
            registry=self.registry,
        )

    async def watch_loop_lag(self, period: float = 0.02) -> None:
        """Forever: sleep ``period`` and record how late the loop woke (its lag)."""
        loop = asyncio.get_running_loop()
        while True:
            expected = loop.time() + period
            await asyncio.sleep(period)
            self.loop_lag.observe(max(0.0, loop.time() - expected))

    def watch_outbox(self, source: Callable[[], dict[tuple[str, str], int]]) -> None:
        """Report the outbox depth per remote (name, id) from ``source`` at every scrape."""
        self.registry.register(_DepthCollector(source))

    def watch_remotes(self, source: Callable[[], Iterable[RemoteGauges]]) -> None:
        """Report per-remote gauges from ``source`` at every scrape."""
        self.registry.register(_RemoteCollector(source))

    def render(self) -> bytes:
        """The registry in Prometheus' text format."""
        return generate_latest(self.registry)
