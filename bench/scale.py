"""6. At scale: jobs submitted per second through a batch submit, and the list and /metrics latencies
with many rows in the database (``--scale-rows``; ``make bench-scale`` for 1,000,000)."""

from __future__ import annotations

import gc
import json
import os
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, timedelta
from pathlib import Path

from bench.report import Report, Row, p50_p99_ms, say
from bench.sizes import GOAL_BATCH_JOBS_S, GOAL_SCALE_P99_MS, GOAL_SUBMIT_P99_MS, Sizes, documents

#: The list filters of ``GET /api/jobs`` timed at the scale's row count: each one alone, and the
#: combinations the API takes (every field given must match) — first page and a later page each.
FILTERS = {
    "no filter": {},
    "status=cancelled": {"status": "cancelled"},
    "status=pending": {"status": "pending"},
    "pipeline=documents": {"pipeline": "documents"},
    "pipeline=other": {"pipeline": "other"},
    "reason=timeout": {"reason": "timeout"},
    "tag=scale-3": {"tag": "scale-3"},
    "status=cancelled&reason=timeout": {"status": "cancelled", "reason": "timeout"},
    "status=cancelled&pipeline=other": {"status": "cancelled", "pipeline": "other"},
    "status=pending&pipeline=documents": {"status": "pending", "pipeline": "documents"},
    "pipeline=other&reason=timeout": {"pipeline": "other", "reason": "timeout"},
    "tag=scale-3&status=cancelled": {"tag": "scale-3", "status": "cancelled"},
    "tag=scale-3&pipeline=documents": {"tag": "scale-3", "pipeline": "documents"},
    # a tag and a filter that rarely meet: the page walks the side with fewer entries to the end
    "tag=scale-3&status=pending": {"tag": "scale-3", "status": "pending"},
}
#: The same lists as a tenant sees them (its token scopes every query): a big tenant and a tiny one.
TENANTS = {"acme": "acme-token", "tiny": "tiny-token"}
TENANT_FILTERS = {
    "acme: no filter": ("acme", {}),
    "acme: status=cancelled": ("acme", {"status": "cancelled"}),
    "acme: pipeline=other": ("acme", {"pipeline": "other"}),
    "acme: reason=timeout": ("acme", {"reason": "timeout"}),
    "acme: tag=scale-3": ("acme", {"tag": "scale-3"}),
    "tiny: no filter": ("tiny", {}),
    "tiny: status=cancelled": ("tiny", {"status": "cancelled"}),
    "tiny: tag=scale-3": ("tiny", {"tag": "scale-3"}),
}
#: What a smaller run (fewer than SMALL_RUN rows: ``make bench``, ``--quick``) times: a filter of each kind.
SMALL_RUN = 100_000
SMALL_RUN_LISTS = ("no filter", "status=cancelled", "tag=scale-3", "status=cancelled&reason=timeout",
                   "acme: status=cancelled", "tiny: no filter")
#: Items of the one big job whose partial results are timed (a tenth of the rows in a smaller run).
BIG_JOB_ITEMS = 100_000
#: How deep the "later page" is: the page after this many ``Link`` hops.
LATER_PAGE = 3


def _tenant(i: int) -> str:
    """Four big tenants, and one with a job in a thousand."""
    return "tiny" if i % 997 == 0 else ("acme", "globex", "initech", "umbrella")[(i // 7) % 4]


def _client():
    from fastapi.testclient import TestClient

    from api.app import app

    return TestClient(app, base_url="http://127.0.0.1")


def bench_batch_submit(sizes: Sizes, logs: Path, report: Report) -> None:
    """``POST /api/jobs/batch`` in-process (the HTTP layer included: FastAPI's validation of every
    body), rows and messages for real; beside it, in the same run, the same jobs one ``POST /api/jobs``
    each (their p99, and their rate: the batch's baseline), over HTTP to a real uvicorn API on this
    column's database, one keep-alive connection, as a service submitting jobs one by one would
    (in-process, Starlette's ``TestClient`` would add its own thread hand-offs to every request: most
    of the single submit's CPU was the test client's, not the API's). The messages go to a queue no
    worker reads, dropped after. The batch's API runs in this process, so its CPU time is this
    process's: the figures say how much of the wall time the box's load took."""
    from tasks.app import app
    from tasks.process import get_redis

    n = sizes.batch_jobs
    job = {"documents": documents(1), "tags": ["bench-batch"]}
    body = {"jobs": [job] * n}
    times: list[float] = []
    cpu: list[float] = []
    singles, singles_s, api_cpu_s = _single_submits(job, sizes.single_submits, logs)
    with _client() as client:
        # warm: the first requests import and compile what the rest reuse (a batch's paths too)
        client.post("/api/jobs/batch", json={"jobs": [job] * 200})
        for _ in range(sizes.batch_rounds):
            t0, c0 = time.perf_counter(), time.process_time()
            answer = client.post("/api/jobs/batch", json=body)
            times.append(time.perf_counter() - t0)
            cpu.append(time.process_time() - c0)
            if answer.status_code != 202 or len(answer.json()["job_ids"]) != n:
                raise RuntimeError(f"batch submit answered {answer.status_code}: {answer.text[:300]}")
    queue = app.conf.task_default_queue
    queued = get_redis().llen(queue)
    get_redis().delete(queue)  # no worker reads it here; the rows stay (pending) for the scale phase
    best = min(times)
    rate = n / best
    single_rate = len(singles) / singles_s
    s50, s99 = p50_p99_ms(singles)
    cpu_best = cpu[times.index(best)]
    say(f"batch submit: {n:,} jobs in {', '.join(f'{t:.2f}' for t in times)} s (CPU "
        f"{', '.join(f'{c:.2f}' for c in cpu)} s); {len(singles)} single submits p50 {s50:.1f} / p99 {s99:.1f} ms; "
        f"{queued:,} messages were queued")
    report.rows.append(Row(
        f"batch submit: POST /api/jobs/batch of {n:,} jobs (best of {len(times)}; CPU {cpu_best:.2f} s of it: "
        f"{n / cpu_best:,.0f} jobs per CPU-second)",
        f"{rate:,.0f} jobs/s ({best:.2f} s)", f"one POST /api/jobs per job, same run: {single_rate:,.0f} jobs/s",
        f"{rate / single_rate:.1f}× the single submits; {rate / GOAL_BATCH_JOBS_S:.2f} of goal",
        f"≥ {GOAL_BATCH_JOBS_S:,} jobs/s", rate >= GOAL_BATCH_JOBS_S, value=round(rate, 1), unit="jobs/s", n=n))
    report.rows.append(Row(
        f"single submit: POST /api/jobs over HTTP to uvicorn, p50 / p99 (n={len(singles)}, one after another; "
        f"the API's CPU {api_cpu_s / len(singles) * 1e3:.1f} ms per submit)", f"{s50:.1f} / {s99:.1f} ms",
        f"{single_rate:,.0f} jobs/s", f"{s99 / GOAL_SUBMIT_P99_MS:.2f} of goal", f"p99 ≤ {GOAL_SUBMIT_P99_MS:g} ms",
        s99 <= GOAL_SUBMIT_P99_MS, value=round(s99, 2), unit="ms", n=len(singles)))
    report.extra["batch"] = {"jobs": n, "times_s": times, "cpu_s": cpu, "single_ms": [t * 1e3 for t in singles],
                             "single_api_cpu_ms": api_cpu_s / len(singles) * 1e3}


def _single_submits(job: dict, count: int, logs: Path) -> tuple[list[float], float, float]:
    """``count`` submits one after another over one keep-alive connection to a uvicorn API started
    for them: each one's seconds, the seconds of them all, and the API process's CPU seconds."""
    import httpx

    from api.supervisor import api_service, free_port

    port = free_port()
    api = api_service(port, logs / "api-submit.log").start()
    try:
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=30) as client:
            for _ in range(3):  # warm: the first requests import and compile what the rest reuse
                client.post("/api/jobs", json=job)
            singles: list[float] = []
            cpu0, t_all = _cpu_s(api.proc.pid), time.perf_counter()
            for _ in range(count):
                t0 = time.perf_counter()
                answer = client.post("/api/jobs", json=job)
                singles.append(time.perf_counter() - t0)
                if answer.status_code != 202:
                    raise RuntimeError(f"submit answered {answer.status_code}: {answer.text[:300]}")
            return singles, time.perf_counter() - t_all, _cpu_s(api.proc.pid) - cpu0
    finally:
        api.stop()


def _cpu_s(pid: int) -> float:
    """A process's CPU seconds so far (user + system), from ``/proc``."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


_FILL_COLUMNS = ("id", "tenant", "status", "pipeline", "documents", "options", "total_items", "completed_items",
                 "failed_items", "cancellation_reason", "resumable", "deferred", "fence", "created_at",
                 "finished_at", "cancel_requested_at", "cancel_observed_at")


def fill(rows: int, chunk: int = 20_000) -> float:
    """Top the jobs table up to ``rows`` rows, the way a long-lived installation looks: mostly ended
    (a third cancelled, for every reason), a few pending; five tenants (one tiny), tags on one job in
    ten. Returns seconds.

    Multi-row inserts in big transactions. On SQLite the rows go straight to the driver's
    ``executemany`` as the text SQLAlchemy would store (its per-value processing was most of the
    time), with a large page cache for this connection only (the ids land all over their index)."""
    from sqlalchemy import func, insert, select

    from db.models import Job, JobTag, utcnow
    from db.session import get_engine
    from db.vocabulary import CancellationReason

    engine = get_engine()
    with engine.connect() as conn:
        have = conn.scalar(select(func.count()).select_from(Job))
    sqlite = engine.dialect.name == "sqlite"
    reasons = [r.value for r in CancellationReason]
    start = (utcnow() - timedelta(days=60)).replace(tzinfo=None)
    doc, options = documents(1), {}
    if sqlite:  # the stored forms: JSON text, naive UTC datetimes, booleans as 0/1
        doc, options = json.dumps(doc), json.dumps(options)

    def when(moment):
        if moment is None or not sqlite:
            return moment if moment is None else moment.replace(tzinfo=UTC)
        return moment.isoformat(" ", "microseconds")

    def job_row(i: int) -> tuple:
        kind = i % 100
        status = "pending" if kind == 99 else ("cancelled", "completed", "failed")[kind % 3]
        created = start + timedelta(seconds=i * 0.5)
        cancelled = status == "cancelled"
        return (str(uuid.uuid4()), _tenant(i), status, "documents" if i % 4 else "other", doc, options, 1, 0, 0,
                reasons[i % len(reasons)] if cancelled else None, False, False, 0, when(created),
                None if status == "pending" else when(created + timedelta(seconds=2)),
                when(created) if cancelled else None,
                when(created + timedelta(milliseconds=3)) if cancelled else None)

    t0 = time.perf_counter()
    jobs_sql = f"INSERT INTO jobs ({', '.join(_FILL_COLUMNS)}) VALUES ({', '.join('?' * len(_FILL_COLUMNS))})"
    with engine.connect() as conn:
        if sqlite:
            conn.exec_driver_sql("PRAGMA cache_size=-400000")  # 400 MB, this connection only
            conn.commit()
        for base in range(have, rows, chunk):
            jobs = [job_row(i) for i in range(base, min(rows, base + chunk))]
            tags = [(job[0], f"scale-{(i // 10) % 10}", job[13]) for i, job in zip(range(base, rows), jobs)
                    if i % 10 == 0]
            with conn.begin():
                if sqlite:
                    cursor = conn.connection.driver_connection.cursor()
                    cursor.executemany(jobs_sql, jobs)
                    cursor.executemany("INSERT INTO job_tags (job_id, tag, created_at) VALUES (?, ?, ?)", tags)
                    cursor.close()
                else:
                    conn.execute(insert(Job.__table__), [dict(zip(_FILL_COLUMNS, job)) for job in jobs])
                    conn.execute(insert(JobTag.__table__),
                                 [{"job_id": j, "tag": t, "created_at": c} for j, t, c in tags])
        if sqlite:
            conn.exec_driver_sql("PRAGMA cache_size=-2000")  # back to SQLite's default
            conn.commit()
    return time.perf_counter() - t0


def big_job(items: int = BIG_JOB_ITEMS, chunk: int = 20_000) -> str:
    """One cancelled job of ``items`` items, as a run leaves it: most done, some failed, the last few
    interrupted; its counters as ``db.jobs.record_item`` keeps them. Returns its id."""
    from sqlalchemy import insert

    from db.models import Job, JobItem, utcnow
    from db.session import get_engine

    job_id = str(uuid.uuid4())
    now = utcnow()
    result = {"summary": " ".join(documents(1)[0].split()[:20]), "keywords": ["cancel", "scale", "index"],
              "sentiment": 0.1, "words": 35}
    interrupted = items - 3
    statuses = ["interrupted" if i >= interrupted else ("failed" if i % 50 == 49 else "done") for i in range(items)]
    done = statuses.count("done")
    with get_engine().begin() as conn:
        conn.execute(insert(Job.__table__), [{
            "id": job_id, "status": "cancelled", "pipeline": "documents", "documents": documents(1) * 4,
            "options": {}, "total_items": items, "completed_items": done, "failed_items": statuses.count("failed"),
            "cancellation_reason": "user_requested", "cancelled_at_item": 49, "resumable": True, "deferred": False,
            "fence": 1, "created_at": now, "started_at": now, "finished_at": now, "cancel_requested_at": now,
            "cancel_observed_at": now}])
        for base in range(0, items, chunk):
            conn.execute(insert(JobItem.__table__), [
                {"job_id": job_id, "index": i, "stage": "analyze" if statuses[i] != "interrupted" else "embed",
                 "status": statuses[i], "result": result if statuses[i] == "done" else None,
                 "error": "boom" if statuses[i] == "failed" else None, "finished_at": now, "retries": 0}
                for i in range(base, min(items, base + chunk))])
    return job_id


def settle_statistics() -> float:
    """On PostgreSQL, ``VACUUM (ANALYZE)`` the tables just filled; returns seconds. A table that grew
    to this size over weeks was vacuumed and analyzed by autovacuum many times on the way; one filled
    in seconds is in neither state until autovacuum's next turns:

    * no statistics: the planner, guessing each filter's selectivity, chose plans that took 25–90 ms
      for one page of ``status=cancelled`` or ``pipeline=documents`` at 50,000 rows (0.1 ms each after
      ``ANALYZE``; EXPLAIN ANALYZE, both);
    * pages not yet all-visible (38 % of ``jobs``' right after a 1,000,000-row fill): an index-only
      scan reads the table page of each such entry too — a sparse tag-and-status list at 1,000,000
      rows cost the server 61 ms of CPU a page so, 14 ms vacuumed.

    SQLite keeps no statistics unless asked, and andon never asks, nor has a visibility map: nothing
    to settle there."""
    from db.session import get_engine, statement_writes

    if get_engine().dialect.name != "postgresql":
        return 0.0
    t0 = time.perf_counter()
    with statement_writes() as conn:  # VACUUM runs outside a transaction
        conn.exec_driver_sql("VACUUM (ANALYZE) jobs, job_tags, job_items")
    return time.perf_counter() - t0


#: CPU seconds this process spent on each timed request, by what was asked (``_timed_gets(kind=)``).
_CPU: dict[str, list[float]] = {}


def _timed_gets(client, path: str, params: dict, count: int, kind: str | None = None) -> list[float]:
    """Wall seconds of ``count`` GETs; with ``kind``, their CPU seconds go to ``_CPU[kind]`` too: the
    process's CPU time (every thread: the app runs in TestClient's), which a loaded machine doesn't
    inflate as it does the wall clock."""
    times = []
    for _ in range(count):
        t0, cpu0 = time.perf_counter(), time.process_time()
        answer = client.get(path, params=params)
        times.append(time.perf_counter() - t0)
        if kind is not None:
            _CPU.setdefault(kind, []).append(time.process_time() - cpu0)
        if answer.status_code != 200:
            raise RuntimeError(f"GET {path} {params} answered {answer.status_code}: {answer.text[:300]}")
    return times


def _later_page(client, path: str, params: dict) -> str | None:
    """The URL of the page LATER_PAGE ``Link`` hops after the first (None if the list is shorter)."""
    url: str | None = path
    for hop in range(LATER_PAGE + 1):
        answer = client.get(url, params=params if hop == 0 else None)
        url = answer.links.get("next", {}).get("url")
        if url is None:
            return None
    return url


def _time_list(client, params: dict, count: int) -> dict[str, tuple[float, float] | None]:
    """p50 / p99 of the first page of a list and of a later one (by cursor)."""
    params = {**params, "limit": 50}
    _timed_gets(client, "/api/jobs", params, 2)  # warm the page cache
    first = p50_p99_ms(_timed_gets(client, "/api/jobs", params, count, "list"))
    later_url = _later_page(client, "/api/jobs", params)
    later = p50_p99_ms(_timed_gets(client, later_url, {}, count, "list")) if later_url else None
    return {"first": first, "later": later}


@contextmanager
def _gc_pauses() -> Iterator[dict[int, list[float]]]:
    """Each garbage collection's wall milliseconds while the block runs, by generation: a full one
    over the whole heap was the list p99s' outliers once (api/heap.py), so the run says what it saw."""
    pauses: dict[int, list[float]] = {0: [], 1: [], 2: []}
    started: list[float] = []

    def note(phase: str, info: dict) -> None:
        if phase == "start":
            started.append(time.perf_counter())
        elif started:
            pauses[info["generation"]].append((time.perf_counter() - started.pop()) * 1e3)

    gc.callbacks.append(note)
    try:
        yield pauses
    finally:
        gc.callbacks.remove(note)


@contextmanager
def _as_tenants(tenants: dict[str, str]) -> Iterator[None]:
    """Tokens for these tenants while the block runs (every request then needs one)."""
    from db.settings import get_settings

    os.environ["ANDON_API_TOKENS"] = json.dumps(tenants)
    get_settings.cache_clear()
    try:
        yield
    finally:
        os.environ.pop("ANDON_API_TOKENS", None)
        get_settings.cache_clear()


def bench_scale(sizes: Sizes, report: Report) -> None:
    rows = sizes.scale_rows
    say(f"scale: filling the jobs table to {rows:,} rows")
    fill_s = fill(rows)
    t0 = time.perf_counter()
    items = min(BIG_JOB_ITEMS, rows // 10)
    big = big_job(items)
    big_s = time.perf_counter() - t0
    analyze_s = settle_statistics()
    say(f"scale: filled in {fill_s:.1f} s, and a job of {items:,} items in {big_s:.1f} s"
        + (f"; VACUUM (ANALYZE) took {analyze_s:.1f} s" if analyze_s else "") + "; timing the reads")
    n = sizes.scale_requests
    with _client() as client, _gc_pauses() as pauses:
        timed = FILTERS.keys() | TENANT_FILTERS.keys() if rows >= SMALL_RUN else set(SMALL_RUN_LISTS)
        lists = {label: _time_list(client, params, n) for label, params in FILTERS.items() if label in timed}
        with _as_tenants(TENANTS):
            for label, (tenant, params) in TENANT_FILTERS.items():
                if label not in timed:
                    continue
                client.headers["Authorization"] = f"Bearer {TENANTS[tenant]}"
                lists[label] = _time_list(client, params, n)
            client.headers.pop("Authorization")
        one_job = p50_p99_ms(_timed_gets(client, f"/api/jobs/{big}", {}, n, "one job"))
        partial_path = f"/api/jobs/{big}/partial-results"
        _timed_gets(client, partial_path, {}, 2)
        partial_first = p50_p99_ms(_timed_gets(client, partial_path, {}, n, "partial results"))
        later_url = _later_page(client, partial_path, {})
        partial_later = (p50_p99_ms(_timed_gets(client, later_url, {}, n, "partial results"))
                         if later_url else None)
        page_bytes = len(client.get(partial_path).content)
        t0 = time.perf_counter()
        client.get("/metrics")  # the first scrape of a process counts every job once
        first_metrics_ms = (time.perf_counter() - t0) * 1e3
        metrics = p50_p99_ms(_timed_gets(client, "/metrics", {}, n, "/metrics"))

    def worst(which: str) -> tuple[str, tuple[float, float]]:
        timed = {label: t[which] for label, t in lists.items() if t[which] is not None}
        label = max(timed, key=lambda k: timed[k][1])
        return label, timed[label]

    goal = f"p99 ≤ {GOAL_SCALE_P99_MS:g} ms"

    def row(figure: str, p50: float, p99: float, baseline: str = "—") -> None:
        report.rows.append(Row(figure, f"{p50:.1f} / {p99:.1f} ms", baseline, f"{p99 / GOAL_SCALE_P99_MS:.2f} of goal",
                               goal, p99 <= GOAL_SCALE_P99_MS, value=round(p99, 2), unit="ms", n=n))

    c50, c99 = lists["status=cancelled"]["first"]
    row(f"GET /api/jobs?status=cancelled&limit=50 at {rows:,} rows, p50 / p99 (n={n})", c50, c99,
        "before 0008: 744 ms p50 at 300,000 rows (issue 12)")
    label, (w50, w99) = worst("first")
    row(f"GET /api/jobs, slowest first page of {len(lists)} filters and tenants ({label}) at {rows:,} rows, "
        f"p50 / p99 (n={n} each)", w50, w99, "tag=scale-3 before 0013: 235 ms p50")
    label, (l50, l99) = worst("later")
    row(f"GET /api/jobs, slowest page {LATER_PAGE + 1} by cursor of {len(lists)} filters and tenants ({label}), "
        f"p50 / p99 (n={n} each)", l50, l99)
    row(f"GET /api/jobs/{{id}} of a {items:,}-item job at {rows:,} rows, p50 / p99 (n={n})", *one_job)
    row(f"GET /api/jobs/{{id}}/partial-results of a {items:,}-item job, first page "
        f"({page_bytes // 1024} KiB), p50 / p99 (n={n})", *partial_first,
        "before: every item in one answer")
    if partial_later:
        row(f"GET /api/jobs/{{id}}/partial-results, page {LATER_PAGE + 1} by cursor, p50 / p99 (n={n})",
            *partial_later)
    m50, m99 = metrics
    row(f"GET /metrics at {rows:,} rows, p50 / p99 (n={n}; the process's first scrape {first_metrics_ms:.0f} ms)",
        m50, m99, "before: 855 ms p50 at 300,000 rows (issue 12)")
    cpu = {kind: p50_p99_ms(values) for kind, values in _CPU.items()}
    report.rows.append(Row(
        f"CPU per request at {rows:,} rows, p50 / p99 (this process's CPU time: what a loaded machine doesn't "
        f"inflate)", "; ".join(f"{kind} {c50:.1f} / {c99:.1f} ms" for kind, (c50, c99) in cpu.items()), "—", "—",
        "—", None, value=round(max(c99 for _, c99 in cpu.values()), 2), unit="ms", n=n))
    report.extra["scale"] = {"cpu_ms": cpu, "rows": rows, "fill_s": fill_s, "big_job_s": big_s,
                             "analyze_s": analyze_s, "lists_ms": lists,
                             "one_job_ms": one_job, "partial_results_ms": {"first": partial_first,
                                                                          "later": partial_later},
                             "metrics_ms": metrics, "first_metrics_ms": first_metrics_ms,
                             "gc_pause_ms": {g: sorted(ms)[-5:] for g, ms in pauses.items()}}
    report.notes.append(
        f"scale, {rows:,} rows (filled in {fill_s:.0f} s): list p50 / p99, first page | page {LATER_PAGE + 1}: "
        + "; ".join(f"{k} {v['first'][0]:.1f} / {v['first'][1]:.1f}"
                    + (f" | {v['later'][0]:.1f} / {v['later'][1]:.1f}" if v["later"] else "") + " ms"
                    for k, v in lists.items())
        + f". /metrics: the first scrape of a process counts every job once ({first_metrics_ms:.0f} ms), later "
          f"ones only what is unfinished or ended since (api/metrics.py). Garbage collections while timing: "
        + ", ".join(f"generation {g} ×{len(ms)} (longest {max(ms, default=0):.1f} ms)" for g, ms in pauses.items())
        + ".")
