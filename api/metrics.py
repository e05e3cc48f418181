"""Prometheus metrics for ``GET /metrics``, read from the job rows at scrape time.

Cancels happen in worker processes, so in-process counters in the API would miss them; the rows
are the one place every process writes. Each scrape runs two small queries (the latency histograms
look at the most recent ``SAMPLE`` cancelled jobs).
"""

from __future__ import annotations

import logging
from collections.abc import Iterator

from prometheus_client.core import GaugeMetricFamily, HistogramMetricFamily
from prometheus_client.registry import REGISTRY, Collector
from sqlalchemy import func, select
from sqlalchemy.exc import SQLAlchemyError

from db.models import Job
from db.session import session_scope
from db.vocabulary import JobStatus

log = logging.getLogger(__name__)
BUCKETS_S = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
SAMPLE = 10_000


def _histogram(name: str, doc: str, values: list[float]) -> HistogramMetricFamily:
    buckets = [(str(le), sum(v <= le for v in values)) for le in BUCKETS_S] + [("+Inf", len(values))]
    return HistogramMetricFamily(name, doc, buckets=buckets, sum_value=sum(values))


class JobMetrics(Collector):
    def describe(self) -> Iterator:
        """Names without data, so registering doesn't query a database that may not exist yet."""
        yield GaugeMetricFamily("andon_jobs", "Jobs by status and cancellation reason", labels=["status", "reason"])
        yield HistogramMetricFamily("andon_cancel_request_to_observe_seconds", "")
        yield HistogramMetricFamily("andon_cancel_observe_to_terminal_seconds", "")

    def collect(self) -> Iterator:
        try:
            counts, moments = self._read()
        except SQLAlchemyError:
            log.exception("metrics: cannot read the job rows")
            return
        jobs = GaugeMetricFamily("andon_jobs", "Jobs by status and cancellation reason", labels=["status", "reason"])
        for status, reason, count in counts:
            jobs.add_metric([status, reason or ""], count)
        yield jobs
        to_observe = [(o - r).total_seconds() for r, o, _ in moments if r and o and o >= r]
        to_stop = [(f - o).total_seconds() for _, o, f in moments if o and f and f >= o]
        yield _histogram("andon_cancel_request_to_observe_seconds",
                         "From a cancel request to the checkpoint that observed it", to_observe)
        yield _histogram("andon_cancel_observe_to_terminal_seconds",
                         "From the observing checkpoint to the committed terminal row", to_stop)

    @staticmethod
    def _read() -> tuple[list, list]:
        with session_scope() as session:
            counts = session.execute(
                select(Job.status, Job.cancellation_reason, func.count()).group_by(Job.status, Job.cancellation_reason)
            ).all()
            moments = session.execute(
                select(Job.cancel_requested_at, Job.cancel_observed_at, Job.finished_at)
                .where(Job.status == JobStatus.CANCELLED.value, Job.cancel_observed_at.is_not(None))
                .order_by(Job.finished_at.desc()).limit(SAMPLE)
            ).all()
        return counts, moments


def register() -> None:
    if not any(isinstance(c, JobMetrics) for c in list(REGISTRY._collector_to_names)):
        REGISTRY.register(JobMetrics())
