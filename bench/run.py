"""andon's benchmark: ``make bench`` (or ``.venv/bin/python bench/run.py``).

Starts its own Redis-compatible server, SQLite database and prefork Celery workers (all on
127.0.0.1, all in a temporary ANDON_HOME, all stopped at the end), measures every figure of the
issue side by side with its baseline in the same run, prints one table and writes it, with the
machine it ran on, to bench/README.md.

    --quick        smaller counts (a smoke run; the README is not written)
    --no-readme    print the table only
    --keep         keep the temporary ANDON_HOME (worker logs, database) for a look afterwards
    --profile      also cProfile one no-op andon job in this process and print the top
    --strict       exit 1 if any goal is not met
"""

from __future__ import annotations

import argparse
import os
import platform
import random
import resource
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import timeit
import uuid
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
BENCH_DIR = ROOT / "bench"
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))  # `python bench/run.py` puts bench/ first on the path, not the repo root


# --------------------------------------------------------------------------------------------------
# Sizes. Every phase is bounded; the whole run takes about four minutes on 2 cores.

@dataclass
class Sizes:
    check_number: int = 1_000_000  # calls per repeat for the in-process check()
    net_number: int = 3_000  # calls per repeat for the two network checks
    repeat: int = 5
    cancels: int = 200  # andon cancels of running jobs
    abortable_cancels: int = 60  # AbortableTask baseline aborts
    cancel_items: int = 30
    cancel_stage_delay_s: float = 0.05
    cancel_ahead: int = 3  # jobs in flight: two running (one per pool process), one queued behind
    cancel_poll_s: float = 0.001  # how often the job rows are read while cancels are in flight
    slow_jobs: int = 8  # 100 ms items
    slow_items: int = 20
    noop_jobs: int = 30  # no-op items
    noop_items: int = 50
    rounds: int = 2  # throughput: bare, andon, andon, bare, ... best of each
    bulk_jobs: int = 10_000
    drain_timeout_s: float = 180.0
    breakdown_items: int = 200

    @classmethod
    def quick(cls) -> Sizes:
        return cls(check_number=200_000, net_number=1_000, repeat=3, cancels=40, abortable_cancels=20,
                   slow_jobs=4, slow_items=10, noop_jobs=10, noop_items=50, rounds=1, bulk_jobs=1_000,
                   drain_timeout_s=60.0, breakdown_items=50)


GOAL_CHECK_RATIO = 100.0
GOAL_CHECK_NS = 1_000.0
GOAL_OBSERVE_P99_MS = 10.0
GOAL_TERMINAL_P99_MS = 50.0
GOAL_SLOW_RATIO = 0.98
GOAL_NOOP_RATIO = 0.5
GOAL_BULK_S = 2.0
ITEM_S = 0.1  # the "100 ms item", spread over the three stages
CONCURRENCY = 2

def documents(count: int) -> list[str]:
    """Deterministic documents of ~35 words (the demo's, without its blank one), the same for andon
    and for the baselines."""
    from api.demo import TOPICS

    return [f"Document {i + 1} about {TOPICS[i % len(TOPICS)][0]}. {TOPICS[i % len(TOPICS)][1]}"
            for i in range(count)]


# --------------------------------------------------------------------------------------------------
# Environment: set before any andon module reads its (cached) settings.

def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def configure_env(home: Path, redis_port: int) -> None:
    from db.settings import embedded_env

    os.environ.update(embedded_env(home, redis_port), ANDON_AUTO_RESUME="0")
    for var in ("ANDON_API_TOKEN", "ANDON_API_URL", "ANDON_JOB_TIME_LIMIT_S", "ANDON_JOB_SOFT_TIME_LIMIT_S",
                "ANDON_MAX_JOB_RSS_MB"):
        os.environ.pop(var, None)
    # the worker subprocesses import bench.bare: the repo root must be importable there too
    os.environ["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH")) if p)


class Worker:
    """``celery -A tasks.app worker -P prefork -E`` as a subprocess in its own session."""

    def __init__(self, name: str, logs: Path, concurrency: int, queue: str | None = None) -> None:
        self.name = name
        self.log = logs / f"worker-{name}.log"
        self.concurrency = concurrency
        self.queue = queue
        self.proc: subprocess.Popen | None = None

    def start(self, timeout: float = 60.0) -> Worker:
        self.log.parent.mkdir(parents=True, exist_ok=True)
        cmd = [sys.executable, "-m", "celery", "-A", "tasks.app", "worker", "-P", "prefork",
               "-c", str(self.concurrency), "-E", "-n", f"{self.name}@%h", "--without-mingle",
               "--without-gossip", "-l", "INFO", "--include", "bench.bare"]
        if self.queue:
            cmd += ["-Q", self.queue]
        self.proc = subprocess.Popen(cmd, stdout=self.log.open("ab"), stderr=subprocess.STDOUT, cwd=str(ROOT),
                                     env={**os.environ, "PYTHONUNBUFFERED": "1"}, start_new_session=True)
        deadline = time.monotonic() + timeout
        while " ready." not in self.log.read_text(errors="replace"):
            if self.proc.poll() is not None:
                raise RuntimeError(f"worker {self.name} exited {self.proc.returncode}:\n"
                                   f"{self.log.read_text(errors='replace')[-3000:]}")
            if time.monotonic() > deadline:
                raise RuntimeError(f"worker {self.name} not ready within {timeout:.0f}s (log {self.log})")
            time.sleep(0.1)
        return self

    def stop(self) -> None:
        """Warm shutdown, then SIGKILL to the whole process group (api.stack.stop_process)."""
        from api.stack import stop_process

        if self.proc is not None:
            stop_process(self.proc, signal.SIGTERM, timeout=30)
            self.proc = None


# --------------------------------------------------------------------------------------------------
# Results

@dataclass
class Row:
    figure: str
    andon: str
    baseline: str
    ratio: str
    goal: str
    met: bool | None  # None: informational, no goal


@dataclass
class Report:
    rows: list[Row] = field(default_factory=list)
    extra: dict = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)


def fmt_s(seconds: float) -> str:
    if seconds < 1e-6:
        return f"{seconds * 1e9:.0f} ns"
    if seconds < 1e-3:
        return f"{seconds * 1e6:.1f} µs"
    if seconds < 1:
        return f"{seconds * 1e3:.1f} ms"
    return f"{seconds:.2f} s"


def pct(values: list[float], p: float) -> float:
    """Nearest-rank percentile."""
    ordered = sorted(values)
    rank = max(1, -(-len(ordered) * p // 100))  # ceil
    return ordered[int(rank) - 1]


def p50_p99_ms(values_s: list[float]) -> tuple[float, float]:
    if not values_s:
        return float("nan"), float("nan")
    return pct(values_s, 50) * 1e3, pct(values_s, 99) * 1e3


def say(msg: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {msg}", flush=True)


# --------------------------------------------------------------------------------------------------
# 1. Checkpoint cost

def bench_checkpoint(sizes: Sizes, report: Report) -> None:
    from celery.contrib.abortable import AbortableAsyncResult

    from tasks.app import app
    from tasks.errors import CancellationError
    from tasks.store import get_redis, get_store, get_watcher

    job_id = str(uuid.uuid4())
    get_store().create(job_id)
    watcher = get_watcher()
    token = watcher.watch(job_id)  # the live token a running job checks, its watcher thread subscribed
    watcher.connected.wait(5)
    app.backend.store_result(job_id, None, "STARTED")  # a running AbortableTask's state
    redis = get_redis()
    key = f"andon:token:{job_id}"

    def abortable() -> bool:  # exactly what AbortableTask.is_aborted() does on every call
        return AbortableAsyncResult(job_id, app=app).is_aborted()

    def exists() -> int:
        return redis.exists(key)

    assert abortable() is False and exists() == 1 and token.check() is None

    def best(fn, number: int) -> float:
        fn()
        return min(timeit.Timer(fn).repeat(repeat=sizes.repeat, number=number)) / number

    andon = best(token.check, sizes.check_number)
    abort = best(abortable, sizes.net_number)
    exist = best(exists, sizes.net_number)

    # the token timed above still works: a cancel is seen by the very next check()
    get_store().cancel(job_id, message="bench")
    deadline = time.monotonic() + 5
    while not token.is_cancelled and time.monotonic() < deadline:
        time.sleep(0.001)
    try:
        token.check()
        raise RuntimeError("check() did not raise on a cancelled token")
    except CancellationError:
        pass
    watcher.unwatch(job_id)
    watcher.stop()  # this process must not spend CPU on the later phases' cancel messages
    if watcher._thread is not None:
        watcher._thread.join(timeout=3)

    ratio_abort, ratio_exists = abort / andon, exist / andon
    report.rows += [
        Row("checkpoint cost, per check", f"check(): {fmt_s(andon)}",
            f"AbortableTask is_aborted(): {fmt_s(abort)}", f"{ratio_abort:,.0f}× faster",
            f"≥ {GOAL_CHECK_RATIO:.0f}× faster and ≤ 1 µs",
            ratio_abort >= GOAL_CHECK_RATIO and andon * 1e9 <= GOAL_CHECK_NS),
        Row("checkpoint cost vs a Redis EXISTS", f"check(): {fmt_s(andon)}", f"EXISTS: {fmt_s(exist)}",
            f"{ratio_exists:,.0f}× faster", "—", None),
    ]
    report.extra["checkpoint"] = {"andon_ns": andon * 1e9, "abortable_ns": abort * 1e9, "exists_ns": exist * 1e9}


# --------------------------------------------------------------------------------------------------
# 2. Cancel latency

TERMINAL = {"cancelled", "completed", "failed"}


def bench_cancel_latency(sizes: Sizes, report: Report) -> None:
    from sqlalchemy import select

    from api import service
    from db.models import Job
    from db.session import get_engine, session_scope
    from tasks.errors import AndonError

    engine = get_engine()
    rng = random.Random(1)
    item_s = 3 * sizes.cancel_stage_delay_s
    docs = documents(sizes.cancel_items)
    options = {"stage_delay_s": sizes.cancel_stage_delay_s}
    state: dict[str, dict] = {}
    active: list[str] = []
    finished: list[str] = []
    submitted = 0
    deadline = time.monotonic() + max(60.0, sizes.cancels * 0.6)
    while len(finished) < sizes.cancels and time.monotonic() < deadline:
        while len(active) < sizes.cancel_ahead and submitted < sizes.cancels:
            job_id = service.submit_job(docs, options, actor="bench").job_id
            active.append(job_id)
            state[job_id] = {}
            submitted += 1
        with engine.connect() as conn:  # a light Core read: this loop shares the 2 cores with the worker
            rows = conn.execute(select(Job.id, Job.status, Job.completed_items).where(Job.id.in_(active))).all()
        seen = datetime.now(UTC)  # each row read here was committed no later than this
        now = time.monotonic()
        for job_id, status, done in rows:
            st = state[job_id]
            if status in TERMINAL:
                st["visible_at"] = seen
                active.remove(job_id)
                finished.append(job_id)
            elif "returned_at" not in st and status == "running" and done >= 1:
                # cancel at a random moment within an item, not just after a commit
                due = st.setdefault("due", now + rng.uniform(0, item_s))
                if now >= due:
                    try:
                        service.cancel_job(job_id, message="bench", actor="bench")
                    except AndonError:
                        continue
                    st["returned_at"] = datetime.now(UTC)
        time.sleep(sizes.cancel_poll_s)

    with session_scope() as session:
        jobs = {j.id: j for j in session.scalars(select(Job).where(Job.id.in_(finished)))}
    observe, stamped, visible, client, call = [], [], [], [], []
    not_cancelled = 0
    for job_id in finished:
        job, st = jobs[job_id], state[job_id]
        if job.status != "cancelled" or job.cancel_observed_at is None or "returned_at" not in st:
            not_cancelled += 1
            continue
        observe.append((job.cancel_observed_at - job.cancel_requested_at).total_seconds())
        stamped.append((job.finished_at - job.cancel_observed_at).total_seconds())
        visible.append(max(0.0, (st["visible_at"] - job.cancel_observed_at).total_seconds()))
        client.append(max(0.0, (st["visible_at"] - st["returned_at"]).total_seconds()))
        call.append((st["returned_at"] - job.cancel_requested_at).total_seconds())
    if not observe:
        raise RuntimeError("no job was cancelled while running")
    say(f"cancel latency: {len(observe)} andon cancels done; now {sizes.abortable_cancels} AbortableTask aborts")
    base = bench_abortable_latency(sizes)

    o50, o99 = p50_p99_ms(observe)
    v50, v99 = p50_p99_ms(visible)
    s50, s99 = p50_p99_ms(stamped)
    c50, c99 = p50_p99_ms(client)
    k50, k99 = p50_p99_ms(call)
    b50, b99 = p50_p99_ms(base)
    n = len(observe)
    enough = n >= sizes.cancels
    report.rows += [
        Row(f"cancel → observed, p50 / p99 (n={n})", f"{o50:.2f} / {o99:.2f} ms",
            f"AbortableTask abort() → seen: {b50:.1f} / {b99:.1f} ms (n={len(base)})",
            f"p99 {b99 / o99:.1f}× faster; {o99 / GOAL_OBSERVE_P99_MS:.2f} of goal",
            f"p99 ≤ {GOAL_OBSERVE_P99_MS:.0f} ms", o99 <= GOAL_OBSERVE_P99_MS and enough),
        Row(f"observed → terminal row committed, p50 / p99 (n={n})", f"{v50:.2f} / {v99:.2f} ms",
            f"(row stamps, pre-commit: {s50:.2f} / {s99:.2f} ms)", f"{v99 / GOAL_TERMINAL_P99_MS:.2f} of goal",
            f"p99 ≤ {GOAL_TERMINAL_P99_MS:.0f} ms", v99 <= GOAL_TERMINAL_P99_MS and enough),
        Row("client: cancel_job() call; then call returned → terminal row seen, p50 / p99",
            f"call {k50:.2f} / {k99:.2f} ms; then {c50:.2f} / {c99:.2f} ms", "—", "—", "—", None),
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
    from tasks.store import get_redis

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


# --------------------------------------------------------------------------------------------------
# 3. Throughput

def run_batch(kind: str, jobs: int, docs: list[str], stage_delay_s: float) -> float:
    """Submit ``jobs`` jobs of ``docs``; seconds from the first submit to the last result."""
    from celery.result import AsyncResult

    from api import service
    from db.models import Job
    from db.session import session_scope
    from tasks.app import app

    start = time.perf_counter()
    if kind == "andon":
        ids = [service.submit_job(docs, {"stage_delay_s": stage_delay_s}, actor="bench").job_id
               for _ in range(jobs)]
    else:
        ids = [app.send_task("bench.bare_pipeline", args=[docs, stage_delay_s]).id for _ in range(jobs)]
    values = [AsyncResult(i, app=app).get(timeout=300) for i in ids]
    elapsed = time.perf_counter() - start
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
        ("100 ms items", sizes.slow_jobs, sizes.slow_items, ITEM_S / 3, GOAL_SLOW_RATIO),
        ("no-op items", sizes.noop_jobs, sizes.noop_items, 0.0, GOAL_NOOP_RATIO),
    ]
    report.extra["throughput"] = {}
    for label, jobs, items, delay, goal in cases:
        docs = documents(items)
        times: dict[str, list[float]] = {"bare": [], "andon": []}
        order = []
        for r in range(sizes.rounds):  # bare, andon, andon, bare, ...: neither side always goes first
            order += ["bare", "andon"] if r % 2 == 0 else ["andon", "bare"]
        say(f"throughput, {label}: {jobs} jobs × {items} items, {' → '.join(order)}")
        for kind in order:
            times[kind].append(run_batch(kind, jobs, docs, delay))
        bare, andon = min(times["bare"]), min(times["andon"])
        total = jobs * items
        ratio = bare / andon  # = (items/s andon) ÷ (items/s bare)
        best = f", best of {sizes.rounds}" if sizes.rounds > 1 else ""
        report.rows.append(Row(
            f"throughput, {label} ({jobs} jobs × {items} items, -c {CONCURRENCY}{best})",
            f"{total / andon:,.1f} items/s ({andon:.2f} s)", f"bare Celery: {total / bare:,.1f} items/s ({bare:.2f} s)",
            f"{ratio:.3f}×", f"≥ {goal}×", ratio >= goal))
        # andon's extra time per item, per pool process
        per_item_ms = (andon - bare) * CONCURRENCY / total * 1e3
        report.extra["throughput"][label] = {"andon_s": times["andon"], "bare_s": times["bare"], "items": total,
                                             "extra_ms_per_item": per_item_ms}


# --------------------------------------------------------------------------------------------------
# 4. Bulk cancel

def bench_bulk_cancel(sizes: Sizes, logs: Path, report: Report) -> None:
    from sqlalchemy import func, select

    from api import service
    from db import jobs as job_rows
    from db.models import Job, JobEvent
    from db.session import session_scope
    from db.vocabulary import JobStatus
    from tasks.app import app
    from tasks.jobs import TASK_NAME
    from tasks.store import get_redis, get_store

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
        get_store().create_many(ids)
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


# --------------------------------------------------------------------------------------------------
# 5. Where an andon item's time goes (in this process, no worker): the per-item steps of run_job

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


# --------------------------------------------------------------------------------------------------
# Profile (optional): where a no-op andon job spends its time, in this process

def profile_noop_job(items: int = 200) -> None:
    import cProfile
    import pstats

    from db import jobs as job_rows
    from db.session import session_scope
    from tasks.pipeline import run_job
    from tasks.store import get_store, get_watcher

    job_id = str(uuid.uuid4())
    with session_scope() as session:
        job_rows.create_job(session, job_id, documents(items), {"stage_delay_s": 0}, actor="bench-profile")
    get_store().create(job_id)
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


# --------------------------------------------------------------------------------------------------
# Machine, load, output

def machine_info() -> dict[str, str]:
    import sqlite3

    import celery
    import kombu
    import redis as redis_py
    import sqlalchemy

    from api.stack import redis_server_binary

    cpu = "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    ram = "unknown"
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal"):
                ram = f"{int(line.split()[1]) / 2**20:.1f} GiB"
    except OSError:
        pass
    try:
        out = subprocess.run([redis_server_binary(), "--version"], capture_output=True, text=True,
                             timeout=10).stdout.split()
        server = " ".join(out[:3])
    except Exception as exc:  # noqa: BLE001
        server = f"unknown ({exc})"
    u = os.uname()
    return {
        "OS": f"{u.sysname} {u.release} {u.machine}",
        "CPU": cpu,
        "nproc": str(len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()),
        "RAM": ram,
        "Python": platform.python_version(),
        "Celery": f"{celery.__version__} (kombu {kombu.__version__})",
        "redis-py": redis_py.__version__,
        "server": server,
        "database": f"SQLite {sqlite3.sqlite_version} (SQLAlchemy {sqlalchemy.__version__}), WAL",
    }


def _cpu_busy_s() -> float | None:
    """Seconds of CPU the whole machine spent busy (all cores), from /proc/stat."""
    try:
        fields = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    except (OSError, ValueError):
        return None
    idle = fields[3] + (fields[4] if len(fields) > 4 else 0)  # idle + iowait
    return (sum(fields[:8]) - idle) / os.sysconf("SC_CLK_TCK")


def _own_cpu_s() -> float:
    """CPU used by this process and every child it has waited for (Redis, the workers and their pools)."""
    usage = [resource.getrusage(who) for who in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN)]
    return sum(u.ru_utime + u.ru_stime for u in usage)


HEADERS = ["figure", "andon", "baseline", "ratio", "goal", "met?"]


def met_text(met: bool | None) -> str:
    return "—" if met is None else ("yes" if met else "NO")


def print_table(rows: list[Row]) -> None:
    try:
        from rich.console import Console
        from rich.table import Table
    except ImportError:
        for row in rows:
            print(" | ".join([row.figure, row.andon, row.baseline, row.ratio, row.goal, met_text(row.met)]))
        return
    table = Table(title="andon benchmark", show_lines=True)
    for header in HEADERS:
        table.add_column(header, overflow="fold")
    for row in rows:
        style = {True: "green", False: "bold red", None: "dim"}[row.met]
        table.add_row(row.figure, row.andon, row.baseline, row.ratio, row.goal,
                      f"[{style}]{met_text(row.met)}[/{style}]")
    Console(width=180).print(table)


def markdown_table(rows: list[Row]) -> str:
    def cell(text: str) -> str:
        return text.replace("|", "\\|")

    lines = ["| " + " | ".join(HEADERS) + " |", "|" + "---|" * len(HEADERS)]
    for row in rows:
        cells = (row.figure, row.andon, row.baseline, row.ratio, row.goal, f"**{met_text(row.met)}**"
                 if row.met is False else met_text(row.met))
        lines.append("| " + " | ".join(cell(c) for c in cells) + " |")
    return "\n".join(lines)


README_HEAD = """\
# andon benchmark

```sh
make bench          # = .venv/bin/python bench/run.py  (after installing .[dev])
```

One command, about three to four minutes on two cores. It starts everything it needs itself, on
127.0.0.1 only, in a temporary `ANDON_HOME`: a Redis-compatible server (`api.stack.start_redis` on a
free port), a SQLite database (migrated with `db.migrate.upgrade`), and real prefork Celery workers
(`celery -A tasks.app worker -P prefork -c 2 -E --include bench.bare`). It measures every figure
side by side with its baseline **in the same run**, prints the table, rewrites this file with it, and
stops every process it started (warm shutdown, then the whole process group). Flags: `--quick` (small
counts for a smoke run; this file is left alone), `--no-readme`, `--keep` (keep the temp home with
the worker logs and the database), `--profile` (also cProfile one no-op andon job in-process),
`--strict` (exit 1 if a goal is missed). On a small shared box the p99s and the bulk-cancel time
move with whatever else runs; the `load` line under the table says how much did.

The baselines are in `bench/bare.py`. They are registered on andon's own app (`tasks.app.app`), so
they run on **the same worker, pool, broker, result backend and Celery settings** as andon's task:
`bench.bare_pipeline` runs the same stages (`tasks.stages`: parse → embed → analyze_local) on the
same documents with no token, no job row and no per-item commit, and returns the results list;
`bench.abortable_pipeline` is the same loop as a `celery.contrib.abortable.AbortableTask` that calls
`self.is_aborted()` before every stage — plain Celery's way to stop a running task.

## What each figure is

* **checkpoint cost** — `timeit`, best of 5 repeats, of (a) `CancellationToken.check()` on the live
  token a running job holds (from `TokenWatcher.watch()`, its watcher thread subscribed), 10⁶ calls
  per repeat; (b) `AbortableAsyncResult(id, app=app).is_aborted()` — exactly what
  `AbortableTask.is_aborted()` does on each call — against the app's Redis result backend, with the
  task's state stored as `STARTED`; (c) a plain `redis.exists(key)` on the same server. (b) and (c)
  run 3,000 calls per repeat. Ratio = baseline ÷ andon. Goal: ≥ 100× faster than AbortableTask and
  ≤ 1 µs. The token is then cancelled through Redis to check it still raises.
* **cancel → observed** — 200 jobs of 30 items, `stage_delay_s=0.05` (an item is 150 ms), on the
  `-c 2` worker, three in flight (two running, one queued). Once a job is `running` with ≥ 1 item
  committed, it is cancelled with `api.service.cancel_job` at a random moment within the next item.
  The figure is `cancel_observed_at − cancel_requested_at` from the job row — both stamped on this
  machine's clock: the request when `request_cancel` begins, the observation when the job's
  checkpoint raised; it includes writing the job row, which `request_cancel` does before it sets
  the token. Goal: p99 ≤ 10 ms. Baseline: 60 of the same jobs as `AbortableTask`s, `abort()`ed at a
  random moment of an item once one is done; latency = `time.time()` when the task saw
  `is_aborted()` − `time.time()` just before `abort()`. It is bounded by the stage sleep it can't
  interrupt.
* **observed → terminal row committed** — from `cancel_observed_at` to the first time a reader (this
  process, reading the rows of the jobs in flight every ~1 ms) sees the row `cancelled`: an upper
  bound on the commit, including the read interval. In brackets, the row's own stamps
  (`finished_at − cancel_observed_at`), taken before the commit. Goal: p99 ≤ 50 ms.
* **client** — informational: how long the `cancel_job()` call takes, and from its return until the
  caller, reading the row, sees the job over.
* **throughput** — the same N-item pipeline as andon jobs (`api.service.submit_job`) and as bare
  Celery tasks, on the same `-c 2` worker with the same documents (~35 words each) and the same
  number of jobs; wall time from the first submit to the last result (`AsyncResult.get`), items/s,
  ratio = andon ÷ bare. Each side runs twice, alternating (bare, andon, andon, bare), best of each.
  100 ms items: 8 jobs × 20 items, the 100 ms spread over the three stages (andon:
  `stage_delay_s=0.0333`, spent in `token.wait()`; bare: `time.sleep`). No-op items: 30 jobs × 50
  items, `stage_delay_s=0`, the stages only. Goals: ≥ 0.98× and ≥ 0.5×.
* **bulk cancel** — a `-c 1` worker on its own queue is kept busy by a long blocker job; 10,000 jobs
  are queued behind it (rows with `db.jobs.create_job` in one session, tokens with
  `CancellationStore.create_many`, messages through one producer). `api.service.cancel_matching(
  JobStatus.PENDING)` is timed. Then the blocker is cancelled, a second `-c 1` worker joins, and the
  workers drain the queue (bounded at 180 s; drained = queue empty and every message answered in the
  result backend); the jobs among the 10,000 with a `started` event are counted. Goal: ≤ 2 s, 0
  started.
* **where the time goes** (below the table) — the per-item steps of `run_job` replayed in the
  benchmark process (no worker): the stages, and the item's commit (`db.jobs.record_item` in its own
  `db.session.transaction`), back to back and after 100 ms idle.

"""


def write_readme(report: Report, machine: dict[str, str], load: str, total_s: float) -> Path:
    lines = [README_HEAD, "## Latest run", "",
             f"{datetime.now(UTC):%Y-%m-%d %H:%M} UTC, whole run {total_s:.0f} s.", "",
             markdown_table(report.rows), "", "Machine:", ""]
    lines += [f"* {key}: {value}" for key, value in machine.items()]
    lines += [f"* load: {load}"]
    analysis = analysis_lines(report)
    if analysis:
        lines += ["", "## Where the time goes (this run)", ""] + [f"* {line}" for line in analysis]
    path = BENCH_DIR / "README.md"
    path.write_text("\n".join(lines) + "\n")
    return path


def analysis_lines(report: Report) -> list[str]:
    """Numbers from this run that explain the figures, the missed goals above all."""
    out: list[str] = []
    lat = report.extra.get("latency")
    if lat:
        out.append(
            f"cancel → observed {lat['observe_ms'][0]:.1f} / {lat['observe_ms'][1]:.1f} ms (p50 / p99): "
            f"`request_cancel` first commits the job row (`cancelling` + a `cancel_requested` event; the row "
            f"decides which request wins), then sets the token (Lua `SET NX` + `PUBLISH`), which the worker's "
            f"watcher thread hands to the job's `token.wait()`. The whole `cancel_job()` call takes "
            f"{lat['call_ms'][0]:.1f} / {lat['call_ms'][1]:.1f} ms (it also looks for child jobs).")
    br = report.extra.get("breakdown")
    tp = report.extra.get("throughput", {})
    if br:
        out.append(
            f"per item, replayed in-process: the stages take {br['stages_ms']:.2f} ms; andon adds the item's "
            f"commit (`record_item`: an INSERT and a counter UPDATE in one transaction) {br['commit_ms']:.2f} ms "
            f"back to back — {br['commit_idle_ms']:.2f} ms after 100 ms idle (stages {br['stages_idle_ms']:.2f} "
            f"ms). The bare task does the stages only.")
    for label, data in tp.items():
        out.append(f"throughput, {label}: andon spent {data['extra_ms_per_item']:.2f} ms more per item per pool "
                   f"process than bare Celery in the worker (best runs: andon {min(data['andon_s']):.2f} s, bare "
                   f"{min(data['bare_s']):.2f} s; all runs: andon {', '.join(f'{t:.2f}' for t in data['andon_s'])}"
                   f" s, bare {', '.join(f'{t:.2f}' for t in data['bare_s'])} s).")
    out += report.notes
    return out


# --------------------------------------------------------------------------------------------------

def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--no-readme", action="store_true")
    parser.add_argument("--keep", action="store_true")
    parser.add_argument("--profile", action="store_true")
    parser.add_argument("--strict", action="store_true")
    args = parser.parse_args(argv)
    sizes = Sizes.quick() if args.quick else Sizes()

    started_at = time.perf_counter()
    busy_at_start = _cpu_busy_s()
    load_at_start = os.getloadavg()[0]
    home = Path(tempfile.mkdtemp(prefix="andon-bench-"))
    logs = home / "logs"
    logs.mkdir(parents=True)
    redis_port = _free_port()
    configure_env(home, redis_port)

    # a SIGTERM/SIGHUP to the benchmark still runs the cleanup below
    for sig in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, lambda signum, frame: sys.exit(128 + signum))

    from api.stack import start_redis, stop_process

    redis_proc = None
    worker: Worker | None = None
    report = Report()
    try:
        redis_proc = start_redis(redis_port, home / "redis", logs / "redis.log")
        from db.migrate import upgrade

        upgrade()
        say(f"home {home}, redis on 127.0.0.1:{redis_port}, load average {load_at_start:.2f}")

        say("checkpoint cost")
        bench_checkpoint(sizes, report)

        worker = Worker(f"bench-{redis_port}", logs, concurrency=CONCURRENCY).start()
        say(f"cancel latency: {sizes.cancels} andon cancels of running jobs")
        bench_cancel_latency(sizes, report)
        bench_throughput(sizes, report)
        worker.stop()
        worker = None

        say(f"bulk cancel of {sizes.bulk_jobs:,} queued jobs")
        bench_bulk_cancel(sizes, logs, report)

        say("where an item's time goes (in-process)")
        bench_breakdown(sizes, report)
        if args.profile:
            profile_noop_job()
    finally:
        if worker is not None:
            worker.stop()
        if redis_proc is not None:
            stop_process(redis_proc, signal.SIGTERM, timeout=10)
        if args.keep:
            say(f"kept {home}")
        else:
            shutil.rmtree(home, ignore_errors=True)

    total_s = time.perf_counter() - started_at
    busy_at_end = _cpu_busy_s()
    ncpu = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    if busy_at_start is not None and busy_at_end is not None:
        others = max(0.0, (busy_at_end - busy_at_start) - _own_cpu_s())
        load = (f"load average {load_at_start:.2f} at the start; other processes used {others:.0f} CPU-s during "
                f"the run (≈ {others / total_s:.2f} of {ncpu} cores)")
    else:
        load = f"load average {load_at_start:.2f} at the start"

    print()
    print_table(report.rows)
    machine = machine_info()
    print("machine: " + "; ".join(f"{k} {v}" for k, v in machine.items()))
    print(f"{load}; whole run {total_s:.0f} s")
    for line in analysis_lines(report):
        print(f"- {line}")
    if not args.quick and not args.no_readme:
        path = write_readme(report, machine, load, total_s)
        print(f"wrote {path.relative_to(ROOT)}")
    if args.strict and any(row.met is False for row in report.rows):
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
