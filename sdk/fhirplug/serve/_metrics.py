"""Prometheus metrics of one app (its own registry: two apps in one process do not mix counts).

Under ``fhirplug serve --workers N`` the supervisor gives every worker one ``PROMETHEUS_MULTIPROC_DIR`` (before
they start: prometheus_client reads it on import), so each worker's values live in memory-mapped files there and
``GET /metrics``, whichever worker answers it, reports the sum over all of them (prometheus_client's multiprocess
mode: counters and histograms summed, counts of a dead worker kept; the queue-depth gauge summed over live ones).
"""

from __future__ import annotations

import os

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

__all__ = ["MULTIPROCESS_ENV", "Metrics", "mark_process_dead"]

#: Where prometheus_client keeps the values of every process of one server (its multiprocess mode).
MULTIPROCESS_ENV = "PROMETHEUS_MULTIPROC_DIR"

_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
_BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)


class Metrics:
    """The counters, gauges and histograms ``GET /metrics`` exposes."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter(
            "fhirplug_requests", "HTTP requests by route and status.", ["route", "status"], registry=r
        )
        self.latency = Histogram(
            "fhirplug_request_seconds", "Request latency by route.", ["route"], buckets=_LATENCY_BUCKETS, registry=r
        )
        self.batch_texts = Histogram(
            "fhirplug_batch_texts", "Texts per model run.", ["plugin"], buckets=_BATCH_BUCKETS, registry=r
        )
        self.batch_requests = Histogram(
            "fhirplug_batch_requests", "Requests per model run.", ["plugin"], buckets=_BATCH_BUCKETS, registry=r
        )
        self.queue_depth = Gauge(
            "fhirplug_queue_depth",
            "Requests waiting for the model.",
            ["plugin"],
            registry=r,
            multiprocess_mode="livesum",
        )
        self.shed = Counter("fhirplug_shed", "Requests refused with 503 (model queue full).", ["plugin"], registry=r)
        self.predictions = Counter("fhirplug_predictions", "Coded predictions returned.", ["plugin"], registry=r)
        self.issues = Counter(
            "fhirplug_issues", "OperationOutcome issues by severity and code.", ["severity", "code"], registry=r
        )
        self.feedback = Counter(
            "fhirplug_feedback", "CDS Hooks card feedback by outcome.", ["service", "outcome"], registry=r
        )

    def exposition(self) -> bytes:
        folder = os.environ.get(MULTIPROCESS_ENV)
        if not folder:
            return generate_latest(self.registry)
        from prometheus_client import multiprocess

        every_worker = CollectorRegistry()
        multiprocess.MultiProcessCollector(every_worker, path=folder)  # type: ignore[no-untyped-call]
        return generate_latest(every_worker)


def mark_process_dead(pid: int, folder: str) -> None:
    """Drop a dead worker's live gauges (its counters stay in the sums, as Prometheus counters must)."""
    from prometheus_client import multiprocess

    multiprocess.mark_process_dead(pid, folder)  # type: ignore[no-untyped-call]
