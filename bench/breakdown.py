"""5. Where an andon item's time goes, in this process (no worker): the per-item steps of run_job, and
(``--profile``) a cProfile of one no-op job."""

from __future__ import annotations

import time
import uuid
from datetime import UTC, datetime

from bench.report import Report, pct
from bench.sizes import ITEM_S, Sizes, documents


def bench_breakdown(sizes: Sizes, report: Report) -> None:
    from db import jobs as job_rows
    from db.session import session_scope, transaction
    from db.vocabulary import ItemStatus
    from tasks import stages

    job_id = str(uuid.uuid4())
    with session_scope() as session:  # a row only: no message, no token (run after the bulk phase)
        job_rows.create_job(session, job_id, documents(1), {}, actor="bench-breakdown")
    docs = documents(sizes.breakdown_items)

    def one(index: int, document: str) -> tuple[float, float]:
        t0 = time.perf_counter()
        value = stages.analyze_local(stages.embed(stages.parse(document)))
        t1 = time.perf_counter()
        with transaction() as conn:
            job_rows.record_item(conn, job_id, index, "analyze", ItemStatus.DONE, result=value,
                                 started_at=datetime.now(UTC))
        t2 = time.perf_counter()
        return t1 - t0, t2 - t1

    hot = [one(i, d) for i, d in enumerate(docs)]
    idle = []
    for i, d in enumerate(docs[:30]):
        time.sleep(ITEM_S)  # as between the items of the 100 ms case
        idle.append(one(len(docs) + i, d))

    def med(samples, k):
        return pct([s[k] for s in samples], 50) * 1e3

    out = {"stages_ms": med(hot, 0), "commit_ms": med(hot, 1),
           "stages_idle_ms": med(idle, 0), "commit_idle_ms": med(idle, 1)}
    report.extra["breakdown"] = out


def profile_noop_job(items: int = 200) -> None:
    import cProfile
    import pstats

    from db import jobs as job_rows
    from db.session import session_scope
    from tasks.process import get_watcher
    from tasks.runner import run_job

    job_id = str(uuid.uuid4())
    with session_scope() as session:
        job_rows.create_job(session, job_id, documents(items), {"stage_delay_s": 0}, actor="bench-profile")
    profiler = cProfile.Profile()
    t0 = time.perf_counter()
    profiler.enable()
    run_job(job_id)
    profiler.disable()
    elapsed = time.perf_counter() - t0
    print(f"\nprofile of one no-op andon job run in this process: {items} items in {elapsed:.3f} s "
          f"({elapsed / items * 1e3:.2f} ms/item under the profiler)")
    pstats.Stats(profiler).sort_stats("tottime").print_stats(15)
    watcher = get_watcher()
    watcher.stop()
    if watcher._thread is not None:
        watcher._thread.join(timeout=3)
