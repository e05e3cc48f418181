"""Prometheus metrics for ``GET /metrics``, read from the job rows at scrape time.

Cancels happen in worker processes, so in-process counters in the API would miss them; the rows
are the one place every process writes. But counting a million rows per scrape takes most of a
second, so the counts are kept incrementally, and exactly: a terminal job never changes status or
reason again, so jobs that ended before a watermark are counted once and kept as a running total;
each scrape counts only the jobs not yet ended and those that ended after the watermark (each an
index-only scan: ``ix_jobs_status_reason_created_id``, ``ix_jobs_finished_status_reason``), and
moves the watermark on. The watermark trails the clock by ``SETTLE_S``: a terminal row's
``finished_at`` is stamped before its commit, so a row may become visible a little after the moment
it names — a commit later than ``SETTLE_S`` would be missed from the total until the next recount.
A prune deletes terminal rows: it raises a Redis counter (``rows_deleted_key``) and every API
process recounts at its next scrape, as the first one does (every job less the unsettled ones, in one
statement: 0.1–0.6 s at 1,000,000 rows).

The latency histograms look at the most recent ``SAMPLE`` cancelled jobs that settled, plus those
that ended since; their bucket counts are kept the same way (a scrape reads and bins only the jobs
that ended since the last one), so a scrape's Python work doesn't grow with the sample.
"""

from __future__ import annotations

import logging
import threading
import time
from bisect import bisect_left
from collections import Counter, deque
from collections.abc import Iterator
from datetime import datetime, timedelta
from itertools import accumulate

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily
from prometheus_client.registry import REGISTRY, Collector
from redis.exceptions import RedisError
from sqlalchemy import case, func, literal, select, text, union_all
from sqlalchemy.exc import SQLAlchemyError

from db.models import Job, JobItem, utcnow
from db.session import session_scope
from db.vocabulary import TERMINAL_STATUSES, JobStatus
from tasks.cancellation.keys import rows_deleted_key
from tasks.process import get_redis

log = logging.getLogger(__name__)
BUCKETS_S = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
SAMPLE = 10_000
#: How far the watermark trails the clock (see the module docstring).
SETTLE_S = 60.0
#: How often the LLM token totals are summed again (seconds).
TOKENS_EVERY_S = 30.0
_TERMINAL = [s.value for s in TERMINAL_STATUSES]
_UNFINISHED = [s.value for s in JobStatus if s not in TERMINAL_STATUSES]
_MOMENTS = (Job.cancel_requested_at, Job.cancel_observed_at, Job.finished_at)
_CANCELLED = (Job.status == JobStatus.CANCELLED.value, Job.cancel_observed_at.is_not(None))


class _Buckets:
    """A latency histogram's bucket counts, kept as values come and go (no pass over the sample)."""

    def __init__(self) -> None:
        self.counts = [0] * (len(BUCKETS_S) + 1)  # the last one: above every bound (+Inf only)
        self.total = 0.0

    def add(self, value: float | None, sign: int = 1) -> None:
        if value is not None:
            self.counts[bisect_left(BUCKETS_S, value)] += sign
            self.total += sign * value

    def family(self, name: str, doc: str, extra: list[float]) -> HistogramMetricFamily:
        """The histogram of the kept values and ``extra`` (cumulative buckets, as Prometheus wants)."""
        counts, total = list(self.counts), self.total
        for value in extra:
            counts[bisect_left(BUCKETS_S, value)] += 1
            total += value
        buckets = [(str(le), n) for le, n in zip(BUCKETS_S, accumulate(counts))]
        return HistogramMetricFamily(name, doc, buckets=[*buckets, ("+Inf", sum(counts))], sum_value=total)


class _LatencySample:
    """Cancel latencies of the most recent SAMPLE cancelled jobs that ended before the watermark,
    in the order they ended: a scrape adds the few that ended since the last one and drops as many
    of the oldest, so its Python work is proportional to what changed, not to the sample."""

    def __init__(self) -> None:
        self.rows: deque[tuple[float | None, float | None]] = deque()
        self.observe, self.stop = _Buckets(), _Buckets()

    def add(self, moments: list) -> None:
        for row in moments:
            latencies = _latencies(row)
            self.rows.append(latencies)
            self.observe.add(latencies[0])
            self.stop.add(latencies[1])
            if len(self.rows) > SAMPLE:
                observe, stop = self.rows.popleft()
                self.observe.add(observe, -1)
                self.stop.add(stop, -1)


def _latencies(moments) -> tuple[float | None, float | None]:
    """(request → observe, observe → terminal) in seconds, None where a moment is missing or out of order."""
    requested, observed, finished = moments
    to_observe = (observed - requested).total_seconds() if requested and observed and observed >= requested else None
    to_stop = (finished - observed).total_seconds() if observed and finished and finished >= observed else None
    return to_observe, to_stop


class JobMetrics(Collector):
    def __init__(self) -> None:
        self._lock = threading.Lock()
        #: Jobs that ended at or before ``_through``, by (status, reason); None: not counted yet.
        self._settled: Counter[tuple[str, str | None]] = Counter()
        self._through: datetime | None = None
        self._deletions: bytes | None = None
        self._sample = _LatencySample()
        self._token_rows: list | None = None
        self._tokens_at = 0.0

    def describe(self) -> Iterator:
        """Names without data, so registering doesn't query a database that may not exist yet."""
        yield GaugeMetricFamily("andon_jobs", "Jobs by status and cancellation reason", labels=["status", "reason"])
        yield HistogramMetricFamily("andon_cancel_request_to_observe_seconds", "")
        yield HistogramMetricFamily("andon_cancel_observe_to_terminal_seconds", "")
        yield CounterMetricFamily("andon_llm_tokens", "", labels=["pipeline", "kind", "cut_short"])

    def collect(self) -> Iterator:
        try:
            counts, recent = self._read()
        except SQLAlchemyError:
            log.exception("metrics: cannot read the job rows")
            return
        jobs = GaugeMetricFamily("andon_jobs", "Jobs by status and cancellation reason", labels=["status", "reason"])
        for status, reason, count in counts:
            jobs.add_metric([status, reason or ""], count)
        yield jobs
        latencies = [_latencies(row) for row in recent]
        yield self._sample.observe.family("andon_cancel_request_to_observe_seconds",
                                          "From a cancel request to the checkpoint that observed it",
                                          [o for o, _ in latencies if o is not None])
        yield self._sample.stop.family("andon_cancel_observe_to_terminal_seconds",
                                       "From the observing checkpoint to the committed terminal row",
                                       [t for _, t in latencies if t is not None])
        yield self._tokens()

    def _tokens(self) -> CounterMetricFamily:
        """LLM tokens the items reported, by pipeline and by whether the item was cut short; summed
        in SQL at most every TOKENS_EVERY_S (a scrape doesn't walk the items each time)."""
        now = time.monotonic()
        if self._token_rows is None or now - self._tokens_at >= TOKENS_EVERY_S:
            with session_scope() as session:
                _serial(session)
                self._token_rows = session.execute(
                    select(Job.pipeline, JobItem.usage_cut_short, func.sum(JobItem.prompt_tokens),
                           func.sum(JobItem.completion_tokens))
                    .join(Job, Job.id == JobItem.job_id).where(JobItem.prompt_tokens.is_not(None))
                    .group_by(Job.pipeline, JobItem.usage_cut_short)).all()
            self._tokens_at = now
        family = CounterMetricFamily("andon_llm_tokens", "LLM tokens the items reported (estimated where the "
                                     "server sent no usage)", labels=["pipeline", "kind", "cut_short"])
        for pipeline, cut_short, prompt, completion in self._token_rows:
            cut = "true" if cut_short else "false"
            family.add_metric([pipeline, "prompt", cut], prompt or 0)
            family.add_metric([pipeline, "completion", cut], completion or 0)
        return family

    def _read(self) -> tuple[list, list]:
        """The job counts by (status, reason), and the cancelled jobs that ended after the watermark.

        Two statements a scrape, whatever the table's size: the counts of what isn't settled (and of
        what settled since the last scrape), and the cancel moments of the jobs that ended since."""
        deletions = _deletions(self._deletions)
        settle_to = utcnow() - timedelta(seconds=SETTLE_S)
        with self._lock, session_scope() as session:
            _serial(session)
            if self._through is None or deletions != self._deletions:
                self._settled = _count_settled(session, settle_to)
                self._sample = _LatencySample()
                self._sample.add(reversed(session.execute(
                    select(*_MOMENTS).where(*_CANCELLED, Job.finished_at <= settle_to)
                    .order_by(Job.finished_at.desc(), Job.id.desc()).limit(SAMPLE)).all()))
                self._through, self._deletions = settle_to, deletions
            through, settle_to = self._through, max(self._through, settle_to)
            counts, settled = Counter(), Counter()
            for status, reason, n, is_settled in session.execute(_unsettled_counts(through, settle_to)):
                (settled if is_settled else counts)[(status, reason)] += n
            moments = session.execute(select(*_MOMENTS).where(*_CANCELLED, Job.finished_at > through)
                                      .order_by(Job.finished_at, Job.id)).all()
            # both read: the watermark moves on (a failed read leaves it where it was)
            self._settled.update(settled)
            self._sample.add(row for row in moments if row[2] <= settle_to)
            self._through = settle_to
            counts.update(self._settled)
        recent = [row for row in moments if row[2] > settle_to]
        return [(status, reason, n) for (status, reason), n in sorted(counts.items(), key=str) if n > 0], recent


def _serial(session) -> None:
    """No parallel workers for this transaction's reads, on PostgreSQL. A scrape's counts are index
    scans of a few milliseconds, but over some 20,000 unfinished jobs the planner takes a parallel
    plan: two background worker processes started per statement, 4–9 ms before the first row on
    an idle 2-core box (21–24 ms against 15–16 ms serial), and far more when the box is busy, as
    the workers wait for cores (PostgreSQL's /metrics p99 in make bench: 45–50 ms, p50 26)."""
    if session.get_bind().dialect.name == "postgresql":
        session.execute(_NO_PARALLEL_WORKERS)


_NO_PARALLEL_WORKERS = text("SELECT set_config('max_parallel_workers_per_gather', '0', true)")


def _unsettled_counts(through: datetime, settle_to: datetime):
    """One statement: jobs by (status, reason, settled) that ended after ``through`` (settled: by
    ``settle_to``), ended without a ``finished_at``, or haven't ended — each part an index-only scan."""
    ended, by = Job.status.in_(_TERMINAL), (Job.status, Job.cancellation_reason)
    settled = case((Job.finished_at <= settle_to, 1), else_=0)
    return union_all(
        select(*by, func.count(), settled).where(ended, Job.finished_at > through).group_by(*by, settled),
        select(*by, func.count(), literal(0)).where(ended, Job.finished_at.is_(None)).group_by(*by),
        select(*by, func.count(), literal(0)).where(Job.status.in_(_UNFINISHED)).group_by(*by))


def _count_settled(session, settle_to: datetime) -> Counter[tuple[str, str | None]]:
    """Jobs that ended at or before ``settle_to``, by (status, reason): every job less those that
    didn't, in one statement (so one snapshot, while jobs go on ending), each part an index-only scan
    (``ix_jobs_status_reason_created_id``, ``ix_jobs_finished_status_reason``) — a tenth of the time
    of counting the settled ones directly, which SQLite would do row by row."""
    ended = Job.status.in_(_TERMINAL)
    parts = [(1, ()), (-1, (Job.status.in_(_UNFINISHED),)), (-1, (ended, Job.finished_at.is_(None))),
             (-1, (ended, Job.finished_at > settle_to))]
    query = union_all(*(select(Job.status, Job.cancellation_reason, (sign * func.count()).label("n"))
                        .where(*where).group_by(Job.status, Job.cancellation_reason) for sign, where in parts))
    settled: Counter[tuple[str, str | None]] = Counter()
    for status, reason, n in session.execute(query):
        settled[(status, reason)] += n
    return +settled


def _deletions(last: bytes | None) -> bytes | None:
    """The prune counter; the last one seen if Redis doesn't answer (the totals stay as they were)."""
    try:
        return get_redis().get(rows_deleted_key())
    except RedisError:
        return last


def rows_deleted() -> None:
    """Job rows were deleted (a prune): every process's /metrics recounts at its next scrape."""
    try:
        redis = get_redis()
        redis.incr(rows_deleted_key())
        redis.expire(rows_deleted_key(), 30 * 24 * 3600)
    except RedisError as exc:
        log.warning("metrics: could not tell other processes about deleted rows (Redis: %s)", exc)
    for collector in list(REGISTRY._collector_to_names):
        if isinstance(collector, JobMetrics):
            collector._through = None


def register() -> None:
    if not any(isinstance(c, JobMetrics) for c in list(REGISTRY._collector_to_names)):
        REGISTRY.register(JobMetrics())
