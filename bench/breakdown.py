"""5. Where an andon item's time goes, in this process (no worker): the per-item steps of run_job — the
stages, an item's commit on its own (``ANDON_ITEM_COMMIT_WINDOW_MS=0``) and in a group of 16 (what a
5 ms window gathers of no-op items) — and (``--profile``) a cProfile of one no-op job."""

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

    # the same commit on its own and in groups of 16, in CPU time too (wall time moves with the load)
    group, grouped, alone = 16, [], []
    values = [stages.analyze_local(stages.embed(stages.parse(d))) for d in docs[:group]]
    index = len(docs) + 30
    for _ in range(10):
        rows = [job_rows.ItemRow(index + i, "analyze", ItemStatus.DONE, result=v, started_at=datetime.now(UTC))
                for i, v in enumerate(values)]
        index += group
        t0, c0 = time.perf_counter(), time.thread_time()
        with transaction() as conn:
            job_rows.record_items(conn, job_id, rows)
        grouped.append(((time.perf_counter() - t0) / group, (time.thread_time() - c0) / group))
        for row in rows[:4]:
            t0, c0 = time.perf_counter(), time.thread_time()
            with transaction() as conn:
                job_rows.record_items(conn, job_id, [job_rows.ItemRow(index, row.stage, row.status, result=row.result)])
            alone.append((time.perf_counter() - t0, time.thread_time() - c0))
            index += 1

    def med(samples, k):
        return pct([s[k] for s in samples], 50) * 1e3

    out = {"stages_ms": med(hot, 0), "commit_ms": med(hot, 1),
           "stages_idle_ms": med(idle, 0), "commit_idle_ms": med(idle, 1),
           "group": group, "group_commit_ms_per_item": med(grouped, 0), "group_commit_cpu_ms_per_item": med(grouped, 1),
           "alone_commit_ms": med(alone, 0), "alone_commit_cpu_ms": med(alone, 1)}
    report.extra["breakdown"] = out
    report.notes.append(
        f"an item's commit in a group of {group} (one counter UPDATE, one multi-row INSERT, what a 5 ms window "
        f"gathers of no-op items): {out['group_commit_ms_per_item']:.3f} ms per item "
        f"({out['group_commit_cpu_ms_per_item']:.3f} ms CPU), against {out['alone_commit_ms']:.3f} ms "
        f"({out['alone_commit_cpu_ms']:.3f} ms CPU) on its own")


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
