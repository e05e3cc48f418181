"""4. Bulk cancel: thousands of queued jobs cancelled at once, then drained by workers that must skip them."""

from __future__ import annotations

import time
import uuid
from pathlib import Path

from bench.procs import Worker
from bench.report import Report, Row, say
from bench.sizes import GOAL_BULK_S, TERMINAL, Sizes, documents


def bench_bulk_cancel(sizes: Sizes, logs: Path, report: Report) -> None:
    from sqlalchemy import func, select

    from api import service
    from db import jobs as job_rows
    from db.models import Job, JobEvent
    from db.session import session_scope
    from db.vocabulary import JobStatus
    from tasks.app import app
    from tasks.celery_app import RUN_PIPELINE as TASK_NAME
    from tasks.process import get_redis, get_store

    queue = "bench-bulk"
    redis = get_redis()
    workers = [Worker("bench-bulk", logs, concurrency=1, queue=queue).start()]
    try:
        blocker = service.submit_job(documents(2000), {"stage_delay_s": 0.05}, queue=queue, actor="bench").job_id
        _wait(lambda: _status(blocker) == "running", 30, "the blocker job to run")

        n = sizes.bulk_jobs
        ids = [str(uuid.uuid4()) for _ in range(n)]
        doc = documents(1)
        t_start = time.perf_counter()
        with session_scope() as session:
            for job_id in ids:
                job_rows.create_job(session, job_id, doc, {}, actor="bench-bulk")
        t_rows = time.perf_counter()
        t_tokens = time.perf_counter()
        with app.producer_or_acquire() as producer:
            for job_id in ids:
                app.send_task(TASK_NAME, args=[job_id], task_id=job_id, queue=queue, producer=producer)
        t_sent = time.perf_counter()
        queued = redis.llen(queue)
        say(f"bulk cancel: {n:,} jobs queued behind the blocker in {t_sent - t_start:.1f} s (rows {t_rows - t_start:.1f} s, "
            f"tokens {t_tokens - t_rows:.2f} s, messages {t_sent - t_tokens:.1f} s); {queued:,} in the queue")
        if _status(blocker) != "running":
            raise RuntimeError("the blocker job stopped before the bulk cancel")

        # time the Redis half of the bulk cancel (this process's store only; nothing in andon changes)
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
            outcome = service.cancel_matching(JobStatus.PENDING, message="bench bulk cancel", actor="bench")
        finally:
            cancel_s = time.perf_counter() - t0
            del store.cancel_many
        say(f"bulk cancel: cancel_matching took {cancel_s:.3f} s: {outcome}")

        service.cancel_job(blocker, message="bench: release the queue", actor="bench")
        _wait(lambda: _status(blocker) in TERMINAL, 30, "the blocker to stop")
        # a second -c 1 worker on the queue halves the drain; any worker must skip these jobs alike
        workers.append(Worker("bench-bulk-2", logs, concurrency=1, queue=queue).start())

        keys = [app.backend.get_key_for_task(job_id) for job_id in ids]
        t0 = time.perf_counter()
        drained = False
        while time.perf_counter() - t0 < sizes.drain_timeout_s:
            # every message consumed, and every one of them answered (REVOKED) by a worker
            if redis.llen(queue) == 0 and redis.exists(*keys) == n:
                drained = True
                break
            time.sleep(0.25)
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
        for worker in workers:
            worker.stop()

    met = cancel_s <= GOAL_BULK_S and started == 0 and outcome.cancelled == n and drained
    drain_note = f"drained in {drain_s:.0f} s" if drained else f"NOT drained in {drain_s:.0f} s ({left:,} left)"
    report.rows.append(Row(
        f"bulk cancel of {n:,} queued jobs", f"{cancel_s:.3f} s; {started} started",
        f"({outcome.cancelled:,} cancelled at once; workers {drain_note})",
        f"{cancel_s / GOAL_BULK_S:.2f} of goal", f"≤ {GOAL_BULK_S:.0f} s, 0 started", met))
    report.extra["bulk"] = {"cancel_s": cancel_s, "redis_s": redis_s[0], "enqueue_s": t_sent - t_start, "started": started, "statuses": statuses,
                            "drained": drained, "drain_s": drain_s, "matched": outcome.matched,
                            "cancelled": outcome.cancelled, "left": left}
    report.notes.append(
        f"bulk cancel {cancel_s:.2f} s = Redis {redis_s[0]:.2f} s (`CancellationStore.cancel_many`: `SET NX` and "
        f"the request log per job, pipelined, nothing published) + {cancel_s - redis_s[0]:.2f} s of SQL and Python (the "
        f"select, {-(-n // 1000)} `UPDATE … RETURNING` batches, {2 * n:,} event rows).")
    report.notes.append(
        f"bulk cancel: {outcome.matched:,} matched, {outcome.cancelled:,} cancelled, {started} of them started; "
        f"statuses after the drain {statuses}; two -c 1 workers skipped the {n:,} messages in {drain_s:.0f} s "
        f"({drain_s / n * 1e3 * 2:.1f} ms per message per worker)")


def _status(job_id: str) -> str | None:
    from db.models import Job
    from db.session import session_scope

    with session_scope() as session:
        job = session.get(Job, job_id)
        return job.status if job else None


def _wait(predicate, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise RuntimeError(f"timed out after {timeout:.0f}s waiting for {what}")
        time.sleep(0.02)
