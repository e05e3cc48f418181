"""3. Throughput: the same pipeline as andon jobs and as bare Celery tasks, on the same worker."""

from __future__ import annotations

import time

from bench.report import Report, Row, say
from bench.sizes import CONCURRENCY, GOAL_NOOP_RATIO, GOAL_SLOW_RATIO, ITEM_S, Sizes, documents


def cpu_of_children() -> float:
    """CPU seconds (user + system) used so far by this process's children and theirs: the workers,
    their pool processes and the Redis server — what a batch costs the machine, whatever else runs."""
    import psutil

    total = 0.0
    for child in psutil.Process().children(recursive=True):
        try:
            times = child.cpu_times()
        except psutil.Error:
            continue
        total += times.user + times.system
    return total


def run_batch(kind: str, jobs: int, docs: list[str], stage_delay_s: float, cpu: list[float] | None = None) -> float:
    """Submit ``jobs`` jobs of ``docs``; seconds from the first submit to the last result (and, into
    ``cpu``, the CPU seconds the worker, its pool and Redis spent meanwhile)."""
    from celery.result import AsyncResult

    from api import service
    from db.models import Job
    from db.session import session_scope
    from tasks.app import app

    cpu_before = cpu_of_children()
    start = time.perf_counter()
    if kind == "andon":
        ids = [service.submit_job(docs, {"stage_delay_s": stage_delay_s}, actor="bench").job_id
               for _ in range(jobs)]
    else:
        ids = [app.send_task("bench.bare_pipeline", args=[docs, stage_delay_s]).id for _ in range(jobs)]
    values = [AsyncResult(i, app=app).get(timeout=300) for i in ids]
    elapsed = time.perf_counter() - start
    if cpu is not None:
        cpu.append(cpu_of_children() - cpu_before)
    if kind == "andon":
        with session_scope() as session:
            for job_id in ids:
                job = session.get(Job, job_id)
                if job.status != "completed" or job.completed_items != len(docs):
                    raise RuntimeError(f"andon job {job_id} ended {job.status} with {job.completed_items} items")
    elif any(len(v) != len(docs) or any("error" in item for item in v) for v in values):
        raise RuntimeError("a bare pipeline returned errors")
    return elapsed


def bench_throughput(sizes: Sizes, report: Report) -> None:
    run_batch("bare", CONCURRENCY, documents(3), 0.0)  # warm both pool processes for both task kinds
    run_batch("andon", CONCURRENCY, documents(3), 0.0)
    cases = [
        ("100 ms items", sizes.slow_jobs, sizes.slow_items, ITEM_S / 3, GOAL_SLOW_RATIO, sizes.rounds),
        ("no-op items", sizes.noop_jobs, sizes.noop_items, 0.0, GOAL_NOOP_RATIO, sizes.noop_rounds),
    ]
    report.extra["throughput"] = {}
    for label, jobs, items, delay, goal, rounds in cases:
        docs = documents(items)
        times: dict[str, list[float]] = {"bare": [], "andon": []}
        cpu: dict[str, list[float]] = {"bare": [], "andon": []}
        order = []
        for r in range(rounds):  # bare, andon, andon, bare, ...: neither side always goes first
            order += ["bare", "andon"] if r % 2 == 0 else ["andon", "bare"]
        say(f"throughput, {label}: {jobs} jobs × {items} items, {' → '.join(order)}")
        for kind in order:
            times[kind].append(run_batch(kind, jobs, docs, delay, cpu[kind]))
        bare, andon = min(times["bare"]), min(times["andon"])
        total = jobs * items
        ratio = bare / andon  # = (items/s andon) ÷ (items/s bare)
        best = f", best of {rounds}" if rounds > 1 else ""
        report.rows.append(Row(
            f"throughput, {label} ({jobs} jobs × {items} items, -c {CONCURRENCY}{best})",
            f"{total / andon:,.1f} items/s ({andon:.2f} s)", f"bare Celery: {total / bare:,.1f} items/s ({bare:.2f} s)",
            f"{ratio:.3f}×", f"≥ {goal}×", ratio >= goal, value=round(ratio, 3), unit="× bare Celery", n=total))
        # andon's extra time per item, per pool process
        per_item_ms = (andon - bare) * CONCURRENCY / total * 1e3
        cpu_ms = {kind: min(spent) / total * 1e3 for kind, spent in cpu.items()}
        report.extra["throughput"][label] = {"andon_s": times["andon"], "bare_s": times["bare"], "items": total,
                                             "extra_ms_per_item": per_item_ms, "cpu_ms_per_item": cpu_ms}
        report.notes.append(
            f"throughput, {label}: CPU per item in the worker, its pool and Redis (whatever the load): andon "
            f"{cpu_ms['andon']:.2f} ms, bare Celery {cpu_ms['bare']:.2f} ms (least of {rounds} runs each)")
