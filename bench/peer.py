"""The peer baseline: how long dramatiq-abort takes from ``abort()`` to the running actor seeing it,
on the same machine and the same Redis as andon's cancel → observed and Celery's AbortableTask.

The workload is the latency figure's (bench/latency.py): jobs of ``cancel_items`` items of three
stages of ``cancel_stage_delay_s`` each, ``cancel_ahead`` in flight, each aborted at a random moment
within an item once one item is done; latency = ``time.time()`` when the actor caught ``Abort`` −
``time.time()`` just before ``abort()`` (both on this machine's clock).
"""

from __future__ import annotations

import random
import sys
import time
import uuid
from pathlib import Path

from bench.report import Report, Row, p50_p99_ms, say
from bench.sizes import Sizes, documents

__all__ = ["FIGURE", "bench_peer_abort", "peer_row_texts"]

ROOT = Path(__file__).resolve().parent.parent
FIGURE = "running job abort → seen, p50 / p99: peer dramatiq + dramatiq-abort (n={n})"


def _worker(logs: Path, redis_url: str):
    from api.supervisor import Service

    argv = [sys.executable, "-m", "dramatiq", "bench.peer_worker", "--processes", "1", "--threads", "2",
            "--queues", "bench-peer"]
    return Service("dramatiq worker", argv, logs / "dramatiq-peer.log", {"BENCH_PEER_REDIS_URL": redis_url},
                   cwd=ROOT, ready=lambda s: "Worker process is ready for action" in s.output(),
                   ready_timeout=60, stop_timeout=15)


def bench_peer_abort(sizes: Sizes, logs: Path, report: Report, redis_url: str) -> None:
    import os

    os.environ["BENCH_PEER_REDIS_URL"] = redis_url
    from dramatiq_abort import abort

    from bench import peer_worker

    worker = _worker(logs, redis_url).start()
    try:
        latencies, unseen = _abort_runs(sizes, peer_worker, abort)
    finally:
        worker.stop()
    if not latencies:
        raise RuntimeError(f"no dramatiq-abort abort was seen by its actor ({unseen} runs ended otherwise)")
    p50, p99 = p50_p99_ms(latencies)
    say(f"peer: dramatiq-abort abort() → seen {p50:.1f} / {p99:.1f} ms (p50 / p99, n={len(latencies)})")
    report.rows.append(Row(FIGURE.format(n=len(latencies)), "(andon's cancel → observed: below)",
                           f"dramatiq-abort abort() → seen: {p50:.1f} / {p99:.1f} ms", "—", "—", None,
                           value=round(p99, 2), unit="ms", n=len(latencies)))
    report.extra["peer"] = {"p50_ms": p50, "p99_ms": p99, "n": len(latencies), "unseen": unseen}


def _abort_runs(sizes: Sizes, peer_worker, abort) -> tuple[list[float], int]:
    rng = random.Random(3)
    item_s = 3 * sizes.cancel_stage_delay_s
    docs = documents(sizes.cancel_items)
    client = peer_worker.client
    active: dict[str, str] = {}  # run id -> message id
    due: dict[str, float] = {}
    requested: dict[str, float] = {}
    ends: dict[str, float] = {}
    latencies: list[float] = []
    unseen = 0
    submitted = 0
    deadline = time.monotonic() + max(30.0, sizes.peer_cancels * 1.5)
    while (submitted < sizes.peer_cancels or active) and time.monotonic() < deadline:
        while len(active) < sizes.cancel_ahead and submitted < sizes.peer_cancels:
            run_id = str(uuid.uuid4())
            active[run_id] = peer_worker.peer_pipeline.send(run_id, docs, sizes.cancel_stage_delay_s).message_id
            submitted += 1
        runs = list(active)
        progress = client.mget([peer_worker.progress_key(r) for r in runs])
        seen = client.mget([peer_worker.seen_key(r) for r in runs])
        now = time.monotonic()
        for run_id, done, seen_at in zip(runs, progress, seen):
            if run_id not in requested:
                if done is not None and int(done) >= 1 and now >= due.setdefault(run_id, now + rng.uniform(0, item_s)):
                    requested[run_id] = time.time()
                    abort(active[run_id], middleware=peer_worker.abortable)
                    ends[run_id] = now + 10.0  # seen well within this, or counted unseen
            elif seen_at is not None:
                latencies.append(float(seen_at) - requested[run_id])
                del active[run_id]
            elif now > ends[run_id] or (done is not None and int(done) >= len(docs)):
                unseen += 1
                del active[run_id]
        time.sleep(sizes.cancel_poll_s)
    return latencies, unseen


def peer_row_texts(report: Report) -> None:
    """Once the database columns ran: put andon's cancel → observed and AbortableTask's abort → seen
    (from each column's latency figure) beside the peer's, with the ratios."""
    peer = report.extra.get("peer")
    row = next((r for r in report.rows if r.phase == "peer baseline" and r.measured), None)
    if not peer or row is None:
        return
    from bench.report import DATABASE_NAMES

    andon, ratios, celery = [], [], []
    for key, column in report.columns.items():
        database = DATABASE_NAMES.get(key, key)
        lat = column.get("extra", {}).get("latency")
        if not lat:
            continue
        o50, o99 = lat["observe_ms"]
        andon.append(f"{database}: {o50:.1f} / {o99:.1f} ms")
        ratios.append(f"{database}: p99 {peer['p99_ms'] / o99:.0f}× faster")
        if lat.get("abortable_ms"):
            a50, a99 = lat["abortable_ms"]
            celery.append(f"{a50:.1f} / {a99:.1f} ms ({database} run)")
    if andon:
        row.andon = "andon cancel → observed: " + "; ".join(andon)
        row.ratio = "; ".join(ratios)
    if celery:
        row.baseline += "; Celery AbortableTask abort() → seen: " + "; ".join(celery)
