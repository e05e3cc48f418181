"""2. Cancel latency: andon cancels of running jobs, and AbortableTask aborts as the baseline."""

from __future__ import annotations

import queue
import random
import sys
import threading
import time
from datetime import UTC, datetime

from bench.report import Report, Row, p50_p99_ms, say
from bench.sizes import GOAL_OBSERVE_P99_MS, GOAL_TERMINAL_P99_MS, TERMINAL, Sizes, documents


def bench_cancel_latency(sizes: Sizes, report: Report) -> None:
    from sqlalchemy import select

    from api import service
    from db.models import Job
    from db.session import read_only_connection, session_scope
    from tasks.errors import AndonError

    rng = random.Random(1)
    item_s = 3 * sizes.cancel_stage_delay_s
    docs = documents(sizes.cancel_items)
    options = {"stage_delay_s": sizes.cancel_stage_delay_s}
    state: dict[str, dict] = {}
    active: list[str] = []
    finished: list[str] = []
    # the cancels go out from their own thread, as a client's would: the reader below keeps reading
    # every ~1 ms while a cancel call is in flight (its row write may land after the job's own end)
    to_cancel: queue.SimpleQueue[str | None] = queue.SimpleQueue()

    def canceller() -> None:
        while (job_id := to_cancel.get()) is not None:
            try:
                service.cancel_job(job_id, message="bench", actor="bench")
            except AndonError:
                continue
            state[job_id]["returned_at"] = datetime.now(UTC)

    # the next jobs are submitted from their own thread too: a submit is ~5 ms of this process's
    # CPU, and done in the reader's loop it held every read (and so every "seen") back that long
    slots: queue.SimpleQueue[bool] = queue.SimpleQueue()
    submitted_ids: queue.SimpleQueue[str] = queue.SimpleQueue()

    def submitter() -> None:
        for _ in range(sizes.cancels):
            if not slots.get():
                return
            job_id = service.submit_job(docs, options, actor="bench").job_id
            state[job_id] = {}
            submitted_ids.put(job_id)

    for _ in range(sizes.cancel_ahead):
        slots.put(True)
    helpers = [threading.Thread(target=canceller, name="bench-canceller", daemon=True),
               threading.Thread(target=submitter, name="bench-submitter", daemon=True)]
    # this process is the instrument (the cancels' stamps, the reads' "seen"): its threads hand the
    # GIL over at 0.5 ms instead of 5, so a submit's Python work doesn't hold a stamp or a read back
    switch = sys.getswitchinterval()
    sys.setswitchinterval(0.0005)
    for helper in helpers:
        helper.start()
    try:
        deadline = time.monotonic() + max(60.0, sizes.cancels * 0.6)
        while len(finished) < sizes.cancels and time.monotonic() < deadline:
            while not submitted_ids.empty():
                active.append(submitted_ids.get())
            if not active:
                time.sleep(sizes.cancel_poll_s)
                continue
            # a light Core read: this loop shares the 2 cores with the worker; outside a transaction, it is one
            # round trip on PostgreSQL (in one, BEGIN and the pool's ROLLBACK made it three, in the figure)
            with read_only_connection() as conn:
                rows = conn.execute(select(Job.id, Job.status, Job.completed_items).where(Job.id.in_(active))).all()
            seen = datetime.now(UTC)  # each row read here was committed no later than this
            now = time.monotonic()
            for job_id, status, done in rows:
                st = state[job_id]
                if status in TERMINAL:
                    st["visible_at"] = seen
                    active.remove(job_id)
                    finished.append(job_id)
                    slots.put(True)
                elif "asked" not in st and status == "running" and done >= 1:
                    # cancel at a random moment within an item, not just after a commit
                    due = st.setdefault("due", now + rng.uniform(0, item_s))
                    if now >= due:
                        st["asked"] = True
                        to_cancel.put(job_id)
            time.sleep(sizes.cancel_poll_s)
    finally:
        to_cancel.put(None)
        slots.put(False)
        for helper in helpers:
            helper.join(10)
        sys.setswitchinterval(switch)

    with session_scope() as session:
        jobs = {j.id: j for j in session.scalars(select(Job).where(Job.id.in_(finished)))}
    observe, stamped, visible, clients, call = [], [], [], [], []
    not_cancelled = 0
    for job_id in finished:
        job, st = jobs[job_id], state[job_id]
        if job.status != "cancelled" or job.cancel_observed_at is None or "returned_at" not in st:
            not_cancelled += 1
            continue
        observe.append((job.cancel_observed_at - job.cancel_requested_at).total_seconds())
        stamped.append((job.finished_at - job.cancel_observed_at).total_seconds())
        visible.append(max(0.0, (st["visible_at"] - job.cancel_observed_at).total_seconds()))
        clients.append(max(0.0, (st["visible_at"] - st["returned_at"]).total_seconds()))
        call.append((st["returned_at"] - job.cancel_requested_at).total_seconds())
    if not observe:
        raise RuntimeError("no job was cancelled while running")
    say(f"cancel latency: {len(observe)} andon cancels done; now {sizes.abortable_cancels} AbortableTask aborts")
    base = bench_abortable_latency(sizes)

    o50, o99 = p50_p99_ms(observe)
    v50, v99 = p50_p99_ms(visible)
    s50, s99 = p50_p99_ms(stamped)
    c50, c99 = p50_p99_ms(clients)
    k50, k99 = p50_p99_ms(call)
    b50, b99 = p50_p99_ms(base)
    n = len(observe)
    enough = n >= sizes.cancels
    report.rows += [
        Row(f"cancel → observed, p50 / p99 (n={n})", f"{o50:.2f} / {o99:.2f} ms",
            f"AbortableTask abort() → seen: {b50:.1f} / {b99:.1f} ms (n={len(base)})",
            f"p99 {b99 / o99:.1f}× faster; {o99 / GOAL_OBSERVE_P99_MS:.2f} of goal",
            f"p99 ≤ {GOAL_OBSERVE_P99_MS:g} ms", o99 <= GOAL_OBSERVE_P99_MS and enough,
            value=round(o99, 2), unit="ms", n=n),
        Row(f"observed → terminal row committed, p50 / p99 (n={n})", f"{v50:.2f} / {v99:.2f} ms",
            f"(row stamps, pre-commit: {s50:.2f} / {s99:.2f} ms)", f"{v99 / GOAL_TERMINAL_P99_MS:.2f} of goal",
            f"p99 ≤ {GOAL_TERMINAL_P99_MS:g} ms", v99 <= GOAL_TERMINAL_P99_MS and enough,
            value=round(v99, 2), unit="ms", n=n),
        Row("client: cancel_job() call; then call returned → terminal row seen, p50 / p99",
            f"call {k50:.2f} / {k99:.2f} ms; then {c50:.2f} / {c99:.2f} ms", "—", "—", "—", None,
            value=round(k99, 2), unit="ms", n=n),
    ]
    report.extra["latency"] = {
        "cancels": n, "not_cancelled": not_cancelled, "observe_ms": (o50, o99), "visible_ms": (v50, v99),
        "stamped_ms": (s50, s99), "client_ms": (c50, c99), "call_ms": (k50, k99),
        "abortable_ms": (b50, b99), "abortable_n": len(base)}
    if not_cancelled:
        report.notes.append(f"{not_cancelled} latency jobs ended other than cancelled and were left out")


def bench_abortable_latency(sizes: Sizes) -> list[float]:
    """The same jobs as AbortableTasks, aborted at a random moment of an item; the task says when it saw it."""
    from celery.contrib.abortable import AbortableAsyncResult

    from bench.bare import progress_key
    from tasks.app import app
    from tasks.process import get_redis

    rng = random.Random(2)
    item_s = 3 * sizes.cancel_stage_delay_s
    redis = get_redis()
    docs = documents(sizes.cancel_items)
    active: list[AbortableAsyncResult] = []
    due: dict[str, float] = {}
    requested: dict[str, float] = {}
    latencies: list[float] = []
    submitted = 0
    deadline = time.monotonic() + max(30.0, sizes.abortable_cancels * 0.6)
    while (submitted < sizes.abortable_cancels or active) and time.monotonic() < deadline:
        while len(active) < sizes.cancel_ahead and submitted < sizes.abortable_cancels:
            sent = app.send_task("bench.abortable_pipeline", args=[docs, sizes.cancel_stage_delay_s])
            active.append(AbortableAsyncResult(sent.id, app=app))
            submitted += 1
        progress = redis.mget([progress_key(r.id) for r in active])
        now = time.monotonic()
        for result, done in zip(list(active), progress):
            if result.id not in requested:
                if done is not None and int(done) >= 1:
                    if now >= due.setdefault(result.id, now + rng.uniform(0, item_s)):
                        requested[result.id] = time.time()
                        result.abort()
            elif result.ready():
                value = result.get(timeout=5)
                if value.get("aborted"):
                    latencies.append(value["observed_at"] - requested[result.id])
                active.remove(result)
        time.sleep(sizes.cancel_poll_s)
    return latencies
