"""Memory: andon's own per running job and per in-flight async item (tracemalloc, in this process),
and a worker's RSS across thousands of no-op jobs (a real prefork worker).

* **per running job** — N jobs of the ``bench-hold`` pipeline run at once here, each in a thread of
  its own calling :func:`tasks.runner.run_job` (as a pool process's main thread does), each parked in
  a ``ctx.wait`` of its only item. A tracemalloc snapshot with all N in flight, minus one taken just
  before (after one warm-up job, so imports, engines and the watcher are not counted), divided by N.
  "andon's own": the allocations with an andon frame (``tasks/``, ``db/``, ``api/``) in their
  traceback, what the libraries allocate for andon included; beside it, everything this process
  allocated meanwhile.
* **per in-flight async item** — the same with a few ``bench-inflight`` jobs of 250 async items each,
  all awaiting ``ctx.sleep`` at once on the process's event loop; divided by the items in flight.
* **worker RSS** — ``bench-noop`` jobs of one item through a ``-c 2`` worker, submitted in batches of
  up to 10,000 (``api.service.submit_batch``); the RSS of the worker's pool processes (and its main
  process) when it is ready, after a warm-up of 10 % of the jobs, and at the end.

The database is the process's own (``ANDON_DATABASE_URL``): run under a PostgreSQL URL, the same
functions give the Postgres column.
"""

from __future__ import annotations

import threading
import time
import tracemalloc
import uuid
from pathlib import Path

from bench.report import Report, Row, say
from bench.sizes import Sizes

ROOT = Path(__file__).resolve().parent.parent
GOAL_KIB = 64.0
_ANDON = [str(ROOT / package / "*") for package in ("tasks", "db", "api")]


def bench_memory(sizes: Sizes, report: Report) -> None:
    """The two tracemalloc figures (see the module's docstring)."""
    import bench.pipelines  # noqa: F401  (registers bench-hold and bench-inflight here)
    from tasks.process import get_watcher

    try:
        _run_held(["x"], "bench-hold", 1, settle=lambda: None)  # warm-up: imports, engines, the watcher
        jobs = sizes.memory_jobs
        per_job = _measure(jobs, lambda: _run_held(["x"], "bench-hold", jobs, settle=_snapshot_later))
        _row(report, f"andon memory per running job ({jobs} jobs in flight, tracemalloc)", per_job, jobs)
        batches, per = sizes.memory_async_jobs, 250
        items = batches * per
        per_item = _measure(items, lambda: _run_held(list(range(per)), "bench-inflight", batches,
                                                     settle=_snapshot_later))
        _row(report, f"andon memory per in-flight async item ({items} awaiting, {batches} jobs × {per})",
             per_item, items)
        report.extra["memory"] = {"per_job": per_job, "per_async_item": per_item}
    finally:
        if tracemalloc.is_tracing():
            tracemalloc.stop()
        watcher = get_watcher()
        watcher.stop()


def bench_worker_rss(sizes: Sizes, logs: Path, report: Report) -> None:
    """RSS of a ``-c 2`` worker across ``sizes.rss_jobs`` no-op jobs (see the module's docstring)."""
    import psutil

    from bench.procs import Worker
    from bench.sizes import CONCURRENCY

    total = sizes.rss_jobs
    worker = Worker("bench-rss", logs, concurrency=CONCURRENCY).start()
    try:
        main = psutil.Process(worker.service.proc.pid)

        def rss() -> tuple[float, list[float]]:
            children = sorted(main.children(), key=lambda p: p.pid)
            return main.memory_info().rss / 2**20, [c.memory_info().rss / 2**20 for c in children]

        at_start = rss()
        warm_up = max(1, total // 10)
        t0 = time.perf_counter()
        _run_noop_jobs(warm_up)
        after_warm_up = rss()
        _run_noop_jobs(total - warm_up)
        elapsed = time.perf_counter() - t0
        at_end = rss()
    finally:
        worker.stop()

    def text(sample: tuple[float, list[float]]) -> str:
        return " + ".join(f"{mb:.1f}" for mb in sample[1]) + f" MB (main {sample[0]:.1f})"

    growth_kib = (sum(at_end[1]) - sum(after_warm_up[1])) * 1024 / max(1, total - warm_up)
    say(f"worker RSS: start {text(at_start)}, after {warm_up:,} jobs {text(after_warm_up)}, after {total:,} "
        f"{text(at_end)}; {total / elapsed:,.0f} jobs/s")
    report.rows.append(Row(
        f"worker RSS across {total:,} no-op jobs (pool processes, -c {CONCURRENCY})",
        f"start {text(at_start)} → after {warm_up:,} {text(after_warm_up)} → end {text(at_end)}",
        "—", f"{growth_kib:+.2f} KiB per job after warm-up", "—", None,
        value=round(sum(at_end[1]), 1), unit="MB", n=total))
    report.extra["worker_rss_mb"] = {"start": at_start, "after_warm_up": after_warm_up, "end": at_end,
                                     "jobs": total, "growth_kib_per_job": growth_kib}


# --- helpers --------------------------------------------------------------------------------------

_snapshots: dict[str, tracemalloc.Snapshot] = {}


def _snapshot_later() -> None:
    _snapshots["held"] = tracemalloc.take_snapshot()


def _measure(count: int, run) -> dict[str, float]:
    """Run ``run`` (which takes the "held" snapshot at its peak) with tracemalloc on; KiB per ``count``."""
    tracemalloc.start(25)
    try:
        before = tracemalloc.take_snapshot()
        run()
        held = _snapshots.pop("held")
    finally:
        tracemalloc.stop()

    def diff(snapshot_filter) -> float:
        a = before.filter_traces(snapshot_filter) if snapshot_filter else before
        b = held.filter_traces(snapshot_filter) if snapshot_filter else held
        return sum(stat.size_diff for stat in b.compare_to(a, "filename")) / 1024 / count

    own = diff([tracemalloc.Filter(True, pattern, all_frames=True) for pattern in _ANDON])
    return {"andon_kib": own, "total_kib": diff(None)}


def _row(report: Report, figure: str, kib: dict[str, float], n: int) -> None:
    say(f"{figure}: andon's own {kib['andon_kib']:.1f} KiB, everything {kib['total_kib']:.1f} KiB")
    report.rows.append(Row(figure, f"{kib['andon_kib']:.1f} KiB", f"everything allocated: {kib['total_kib']:.1f} KiB",
                           "—", f"≤ {GOAL_KIB:g} KiB", kib["andon_kib"] <= GOAL_KIB,
                           value=round(kib["andon_kib"], 2), unit="KiB", n=n))


def _run_held(items: list, pipeline: str, jobs: int, settle) -> None:
    """``jobs`` jobs of ``pipeline`` over ``items`` running at once in this process, each in its own
    thread; once every item is held in its wait, ``settle()``; then all are cancelled and joined."""
    from sqlalchemy import func, select

    from db import jobs as job_rows
    from db.models import Job
    from db.session import session_scope
    from tasks.cancellation.keys import heartbeat_key
    from tasks.control import request_cancel
    from tasks.process import get_redis
    from tasks.runner import run_job

    ids = [str(uuid.uuid4()) for _ in range(jobs)]
    with session_scope() as session:
        for job_id in ids:
            job_rows.create_job(session, job_id, items, {}, pipeline=pipeline, actor="bench-memory")
    threads = [threading.Thread(target=run_job, args=(job_id,), name=f"bench-memory-{i}", daemon=True)
               for i, job_id in enumerate(ids)]
    for thread in threads:
        thread.start()
    deadline = time.monotonic() + 120
    redis = get_redis()
    while True:  # every job running, and the last one's items in their wait (its heartbeat says where)
        with session_scope() as session:
            running = session.scalar(select(func.count()).select_from(Job)
                                     .where(Job.id.in_(ids), Job.status == "running"))
        if running == jobs and all(redis.exists(heartbeat_key(job_id)) for job_id in ids):
            break
        if time.monotonic() > deadline:
            raise RuntimeError(f"only {running} of {jobs} memory-bench jobs got running")
        time.sleep(0.05)
    time.sleep(0.2)  # the last items reach their wait
    settle()
    for job_id in ids:
        request_cancel(job_id, message="bench over", actor="bench-memory")
    for thread in threads:
        thread.join(timeout=60)


def _run_noop_jobs(count: int) -> None:
    """Submit ``count`` one-item no-op jobs (tagged) and wait until every one has ended."""
    from sqlalchemy import func, select

    from api import service
    from api.schemas import SubmitRequest
    from db.jobs import tagged
    from db.models import Job
    from db.session import session_scope

    tag = f"bench-rss-{uuid.uuid4().hex[:8]}"
    for start in range(0, count, service.MAX_BATCH):
        bodies = [SubmitRequest(pipeline="bench-noop", items=["x"], tags=[tag])
                  for _ in range(min(service.MAX_BATCH, count - start))]
        service.submit_batch(bodies, actor="bench-rss")
    deadline = time.monotonic() + 1800
    while True:
        with session_scope() as session:
            ended = session.scalar(select(func.count()).select_from(Job).where(
                tagged(tag), Job.status.in_(["completed", "failed", "cancelled"])))
        if ended >= count:
            return
        if time.monotonic() > deadline:
            raise RuntimeError(f"{count - ended} of {count} no-op jobs did not end")
        time.sleep(0.2)
