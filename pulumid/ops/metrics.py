"""Prometheus metrics, named by its conventions (`_total`, `_seconds`, `_bytes`).

One registry per daemon (not the library's global one), so several daemons in one test
process do not collide. Values that already live elsewhere (thread pool queues, updates in
flight) are read when scraped, through callbacks, instead of being mirrored.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Histogram, disable_created_metrics
from prometheus_client.core import GaugeMetricFamily, InfoMetricFamily
from prometheus_client.registry import Collector

from pulumid import __version__

# The `_created` series double every counter for little use.
disable_created_metrics()

LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30)


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.requests = Counter(
            "pulumid_http_requests",
            "HTTP requests answered, by route template and status",
            ["method", "route", "status"],
            registry=r,
        )
        self.latency = Histogram(
            "pulumid_http_request_duration_seconds",
            "Time from the request's headers to its answer",
            ["method", "route"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.body_bytes = Counter(
            "pulumid_update_body_bytes",
            "Bytes received on the update path: checkpoints, journal entries, events",
            ["kind"],
            registry=r,
        )
        self.update_requests = Counter(
            "pulumid_update_writes",
            "Checkpoints, journal batches and event batches stored",
            ["kind"],
            registry=r,
        )
        self.db_seconds = Histogram(
            "pulumid_db_transaction_duration_seconds",
            "Time a database call took on its thread, queueing excluded",
            ["operation"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self._gauges = _Gauges()
        r.register(self._gauges)

    def gauge(
        self,
        name: str,
        documentation: str,
        read: Callable[[], dict[str, float]],
        label: str | None = None,
    ) -> None:
        """A gauge read at scrape time: READ returns {LABEL's value: number}, or {"": number}
        when the gauge has no label."""
        self._gauges.add(name, documentation, read, label)


class _Gauges(Collector):
    def __init__(self) -> None:
        self._gauges: list[tuple[str, str, Callable[[], dict[str, float]], str | None]] = []

    def add(
        self, name: str, documentation: str, read: Callable[[], dict[str, float]], label: str | None
    ) -> None:
        self._gauges.append((name, documentation, read, label))

    def collect(self) -> Iterator[Any]:
        info = InfoMetricFamily("pulumid_build", "pulumid's version")
        info.add_metric([], {"version": __version__})
        yield info
        for name, documentation, read, label in self._gauges:
            family = GaugeMetricFamily(name, documentation, labels=[label] if label else None)
            for key, value in sorted(read().items()):
                family.add_metric([key] if label else [], value)
            yield family
