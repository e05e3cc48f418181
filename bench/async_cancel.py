"""Cancel with async items in flight: how long from the cancel request to every in-flight ``await``
interrupted, read from the job rows' own timestamps (requested → observed)."""

from __future__ import annotations

import time

from bench.report import Report, Row, p50_p99_ms, say
from bench.sizes import Sizes

GOAL_ASYNC_OBSERVE_P99_MS = 100.0


def bench_async_cancel(sizes: Sizes, report: Report) -> None:
    from sqlalchemy import select

    from api import service
    from db.models import Job, JobItem
    from db.session import session_scope

    observed, interrupted = [], []
    for _ in range(sizes.async_cancels):
        job_id = service.submit_job(list(range(8)), pipeline="bench-async", actor="bench").job_id
        _wait(lambda: _status(job_id) == "running", 30)
        time.sleep(0.05)  # the four items are in their await
        service.cancel_job(job_id, message="bench", actor="bench")
        _wait(lambda: _status(job_id) in ("cancelled", "completed", "failed"), 30)
        with session_scope() as session:
            job = session.get(Job, job_id)
            cut = session.scalars(select(JobItem).where(JobItem.job_id == job_id,
                                                        JobItem.status == "interrupted")).all()
            if job.status == "cancelled" and job.cancel_observed_at is not None:
                observed.append((job.cancel_observed_at - job.cancel_requested_at).total_seconds())
                interrupted.append(len(cut))
    if not observed:
        raise RuntimeError("no async job was cancelled")
    o50, o99 = p50_p99_ms(observed)
    say(f"async cancel: {len(observed)} jobs, requested → observed p50 {o50:.1f} ms, p99 {o99:.1f} ms, "
        f"{sum(interrupted) / len(interrupted):.1f} items interrupted per job")
    report.rows.append(Row(f"cancel → observed with 4 async items in flight, p99 (n={len(observed)})",
                           f"{o99:.1f} ms (p50 {o50:.1f})", "—", "—", f"≤ {GOAL_ASYNC_OBSERVE_P99_MS:g} ms",
                           o99 <= GOAL_ASYNC_OBSERVE_P99_MS, value=round(o99, 2), unit="ms", n=len(observed)))
    report.extra["async_cancel"] = {"p50_ms": o50, "p99_ms": o99, "n": len(observed),
                                    "interrupted_per_job": sum(interrupted) / len(interrupted)}


def _status(job_id: str) -> str | None:
    from db.models import Job
    from db.session import session_scope

    with session_scope() as session:
        job = session.get(Job, job_id)
        return job.status if job else None


def _wait(predicate, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise RuntimeError("timed out waiting for an async bench job")
        time.sleep(0.005)
