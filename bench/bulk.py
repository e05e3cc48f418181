"""4. Bulk cancel: thousands of queued jobs cancelled at once, then drained by workers that must skip them."""

from __future__ import annotations

import time
import uuid
from pathlib import Path
from typing import Any

from bench.procs import Worker, start_all, stop_all
from bench.report import Report, Row, say
from bench.sizes import GOAL_BULK_LARGE_S, GOAL_BULK_S, GOAL_SKIP_MS, Sizes, documents


def bench_bulk_cancel(sizes: Sizes, logs: Path, report: Report) -> None:
    from sqlalchemy import func, select

    from api import service
    from db.models import Job, JobEvent
    from db.session import session_scope
    from db.vocabulary import JobStatus
    from tasks.app import app
    from tasks.process import get_redis

    queue = "bench-bulk"
    redis = get_redis()
    # No worker serves the queue until the cancel is done, so nothing here hangs on a job that must
    # stay running (a blocker job whose commit lost SQLite's write lock used to stop the bench), and
    # the workers that join afterwards must skip every one of these messages alike.
    workers: list[Worker] = []
    try:
        n = sizes.bulk_jobs
        # warm: the first bulk cancel in a process compiles its statements (~0.03 s of its CPU)
        warm_tag = f"bench-bulk-warm-{uuid.uuid4().hex[:8]}"
        _queue_jobs(20, queue, warm_tag)
        service.cancel_matching(JobStatus.PENDING, tag=warm_tag, message="bench warm-up", actor="bench")
        redis.delete(queue)
        times: list[float] = []
        all_cancelled = True
        for round_ in range(sizes.bulk_rounds):
            t_start = time.perf_counter()
            tag = f"bench-bulk-{uuid.uuid4().hex[:8]}"  # only these: other phases' rows may be pending too
            ids = _queue_jobs(n, queue, tag)
            t_sent = time.perf_counter()
            queued = redis.llen(queue)
            say(f"bulk cancel: {n:,} jobs queued in {t_sent - t_start:.1f} s (rows and messages, "
                f"as a batch submit makes them); {queued:,} in the queue")
            outcome, round_s, round_redis_s = _timed_cancel(tag)
            say(f"bulk cancel: cancel_matching took {round_s:.3f} s: {outcome}")
            all_cancelled = all_cancelled and outcome.cancelled == n
            if not times or round_s < min(times):
                cancel_s, redis_s = round_s, round_redis_s
            times.append(round_s)
            if round_ < sizes.bulk_rounds - 1:
                redis.delete(queue)  # the workers below skip the last round's messages

        # two -c 1 workers join the queue; each must skip every one of these jobs. The messages wait
        # aside until both are ready and are put back in one RENAME, where the clock starts: the first
        # worker to be ready would otherwise take most of them, unclocked, while the second starts.
        held = f"{queue}-held"
        redis.rename(queue, held)
        workers += [Worker(f"bench-bulk-{i}", logs, concurrency=1, queue=queue) for i in (1, 2)]
        start_all(workers)  # (listed first: the finally stops whichever did start)

        keys = [app.backend.get_key_for_task(job_id) for job_id in ids]
        t0 = time.perf_counter()
        redis.rename(held, queue)
        drained = False
        while time.perf_counter() - t0 < sizes.drain_timeout_s:
            # every message consumed, and every one of them answered (REVOKED) by a worker
            if redis.llen(queue) == 0 and redis.exists(*keys) == n:
                drained = True
                break
            time.sleep(0.02)  # a drain now takes a second or two: 0.25 s steps were a tenth of it
        drain_s = time.perf_counter() - t0
        left = redis.llen(queue)
        say(f"bulk cancel: workers {'drained' if drained else 'did NOT drain'} the queue in {drain_s:.1f} s "
            f"({left:,} messages left)")

        started = 0
        statuses: dict[str, int] = {}
        with session_scope() as session:
            for i in range(0, n, 1000):
                chunk = ids[i:i + 1000]
                started += session.scalar(select(func.count()).select_from(JobEvent).where(
                    JobEvent.job_id.in_(chunk), JobEvent.kind == "started"))
                for status, count in session.execute(select(Job.status, func.count()).where(
                        Job.id.in_(chunk)).group_by(Job.status)):
                    statuses[status] = statuses.get(status, 0) + count
    finally:
        stop_all(workers)

    met = cancel_s <= GOAL_BULK_S and started == 0 and all_cancelled and drained
    drain_note = f"drained in {drain_s:.1f} s" if drained else f"NOT drained in {drain_s:.0f} s ({left:,} left)"
    report.rows.append(Row(
        f"bulk cancel of {n:,} queued jobs (best of {len(times)}: {', '.join(f'{t:.3f}' for t in times)} s)",
        f"{cancel_s:.3f} s; {started} started", f"({outcome.cancelled:,} cancelled at once; workers {drain_note})",
        f"{cancel_s / GOAL_BULK_S:.2f} of goal", f"≤ {GOAL_BULK_S:g} s, 0 started", met,
        value=round(cancel_s, 3), unit="s", n=n))
    # per message per worker; undrained, the rate over the messages the workers did take
    skipped = n - left
    skip_ms = drain_s / skipped * 1e3 * len(workers) if skipped > 0 else drain_s * 1e3 * len(workers)
    report.rows.append(Row(
        f"skipping an already-cancelled queued message, per message per worker ({len(workers)} -c 1 workers)",
        f"{skip_ms:.2f} ms", f"{skipped:,} of {n:,} messages {'drained' if drained else 'taken'} in {drain_s:.1f} s",
        f"{skip_ms / GOAL_SKIP_MS:.2f} of goal", f"≤ {GOAL_SKIP_MS:g} ms", drained and skip_ms <= GOAL_SKIP_MS,
        value=round(skip_ms, 3), unit="ms", n=skipped))
    report.extra["bulk"] = {"cancel_s": cancel_s, "cancel_times_s": times, "redis_s": redis_s, "enqueue_s": t_sent - t_start, "started": started, "statuses": statuses,
                            "drained": drained, "drain_s": drain_s, "matched": outcome.matched,
                            "cancelled": outcome.cancelled, "left": left}
    report.notes.append(
        f"bulk cancel {cancel_s:.2f} s: the select, {-(-n // 1000)} transactions of one `UPDATE … RETURNING` and "
        f"one `INSERT … SELECT` of 2,000 events each (on PostgreSQL both in one statement, two transactions at "
        f"once); the tokens "
        f"(`CancellationStore.cancel_many`: `SET NX` per job, one Lua call per twenty jobs, "
        f"nothing published) took {redis_s:.2f} s in a helper "
        f"thread, overlapped with the SQL.")
    if sizes.bulk_jobs_large:
        _bench_large(sizes.bulk_jobs_large, sizes.bulk_large_rounds, report)
    report.notes.append(
        f"bulk cancel: {outcome.matched:,} matched, {outcome.cancelled:,} cancelled, {started} of them started; "
        f"statuses after the drain {statuses}; two -c 1 workers skipped the {n:,} messages in {drain_s:.1f} s "
        f"({drain_s / n * 1e3 * 2:.2f} ms per message per worker)")


def _timed_cancel(tag: str) -> tuple[Any, float, float]:
    """A bulk cancel of the jobs with ``tag``, timed: its outcome, its seconds, and the seconds its
    tokens took (this process's store only; nothing in andon changes)."""
    from api import service
    from db.vocabulary import JobStatus
    from tasks.process import get_store

    store = get_store()
    redis_s = [0.0]
    cancel_many = store.cancel_many

    def timed_cancel_many(*a, **kw):
        t = time.perf_counter()
        try:
            return cancel_many(*a, **kw)
        finally:
            redis_s[0] += time.perf_counter() - t

    store.cancel_many = timed_cancel_many
    t0 = time.perf_counter()
    try:
        outcome = service.cancel_matching(JobStatus.PENDING, tag=tag, message="bench bulk cancel", actor="bench")
    finally:
        cancel_s = time.perf_counter() - t0
        del store.cancel_many
    return outcome, cancel_s, redis_s[0]


def _queue_jobs(n: int, queue: str, tag: str | None = None) -> list[str]:
    """``n`` queued one-item jobs on ``queue``: rows and messages as a batch submit makes them
    (``db.jobs.create_jobs``, ``tasks.sending.enqueue_many``), ten thousand per transaction."""
    from db import jobs as job_rows
    from db.session import session_scope
    from tasks.sending import enqueue_many

    doc = documents(1)
    ids: list[str] = []
    for start in range(0, n, 10_000):
        jobs = [{"id": str(uuid.uuid4()), "inputs": doc, "options": {}, "pipeline": "documents", "queue": queue,
                 "tags": [tag] if tag else []} for _ in range(min(10_000, n - start))]
        with session_scope() as session:
            job_rows.create_jobs(session, jobs, actor="bench-bulk")
        enqueue_many([(job["id"], {}, queue) for job in jobs], [])
        ids += [job["id"] for job in jobs]
    return ids


def _bench_large(n: int, rounds: int, report: Report) -> None:
    """The same bulk cancel over ``n`` (100,000) queued jobs, best of ``rounds``, each of its own jobs:
    rows, messages, tokens and events at that size. No worker drains them (the 10,000 above show the
    skip); each round's queue is dropped after it."""
    from sqlalchemy import func, select

    from db import jobs as job_rows
    from db.models import Job
    from db.session import session_scope
    from tasks.process import get_redis, get_store

    queue = "bench-bulk-large"
    times: list[float] = []
    met_all = True
    for _ in range(rounds):
        tag = f"bench-bulk-{uuid.uuid4().hex[:8]}"
        t0 = time.perf_counter()
        ids = _queue_jobs(n, queue, tag)
        say(f"bulk cancel: {n:,} jobs queued in {time.perf_counter() - t0:.0f} s; "
            f"{get_redis().llen(queue):,} in the queue")
        try:
            outcome, cancel_s, _ = _timed_cancel(tag)
            say(f"bulk cancel: {n:,} in {cancel_s:.2f} s: {outcome}")
            with session_scope() as session:
                statuses = dict(session.execute(select(Job.status, func.count()).where(
                    job_rows.tagged(tag)).group_by(Job.status)).all())
            sample = ids[:: max(1, n // 1000)]
            tokens = len(get_store().read(sample))
        finally:
            get_redis().delete(queue)
        times.append(cancel_s)
        met_all = met_all and outcome.cancelled == n and statuses == {"cancelled": n} and tokens == len(sample)
    best = min(times)
    report.rows.append(Row(
        f"bulk cancel of {n:,} queued jobs (best of {len(times)}: {', '.join(f'{t:.2f}' for t in times)} s)",
        f"{best:.3f} s; {outcome.cancelled:,} cancelled",
        f"(statuses after the last: {statuses}; tokens set on {tokens} of {len(sample)} sampled)",
        f"{best / GOAL_BULK_LARGE_S:.2f} of goal", f"≤ {GOAL_BULK_LARGE_S:g} s", met_all and best <= GOAL_BULK_LARGE_S,
        value=round(best, 3), unit="s", n=n))
    report.extra["bulk_large"] = {"jobs": n, "cancel_s": best, "cancel_times_s": times, "statuses": statuses,
                                  "tokens_sampled": tokens, "sampled": len(sample)}
