"""One database column of the benchmark: every figure that touches the database, run in a process of
its own (``python -m bench.column SPEC.json``, started by bench/run.py) so that its settings, engines,
workers and caches belong to that database alone — the SQLite column and the PostgreSQL column are the
same code on a different ``ANDON_DATABASE_URL``.

Each phase goes through ``bench.phase.run_phase``: bounded, and a phase that fails is reported as not
measured while the next one still runs. Nothing carries over from one phase to the next but the rows
in the database: the shared ``-c 2`` worker is restarted, and the queues emptied, after a failure.

A figure function takes ``(sizes, report)`` — or ``(sizes, logs, report)`` when it starts processes
of its own — and appends ``bench.report.Row`` s; the database is the process's
(``db.session.get_engine()``), and ``run_phase`` stamps each row with the column and the load.
"""

from __future__ import annotations

import gc
import json
import os
import signal
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from bench.machine import describe_database, load_between, sample_load  # noqa: E402
from bench.phase import run_phase  # noqa: E402
from bench.procs import Worker  # noqa: E402
from bench.report import Report, analysis_lines, say  # noqa: E402
from bench.sizes import CONCURRENCY, Sizes  # noqa: E402

__all__ = ["ColumnSpec", "run_column"]


@dataclass
class ColumnSpec:
    """What bench/run.py hands a column: written as JSON, read back by the child."""

    database: str  # "sqlite" | "postgres"
    url: str
    sizes: dict
    logs: str
    out: str  # where the child writes its Report as JSON
    only_scale: bool = False
    profile: bool = False
    time_s: float = 3600.0  # what the column may take in all: phases that would start later are not run
    phases: list[str] | None = None  # only these (bench/run.py --phases); None: all of them


class SharedWorker:
    """The ``-c 2`` worker the latency, async-cancel and throughput phases share; started on first
    use, and after a phase fails stopped (its jobs with it) and the queues emptied, so the next
    phase starts clean."""

    def __init__(self, name: str, logs: Path) -> None:
        self.name, self.logs = name, logs
        self.worker: Worker | None = None

    def ensure(self) -> None:
        if self.worker is not None and not self.worker.service.alive():
            self.stop()
        if self.worker is None:
            self.worker = Worker(self.name, self.logs, concurrency=CONCURRENCY).start()

    def stop(self) -> None:
        if self.worker is not None:
            self.worker.stop()
            self.worker = None


def purge_queues() -> None:
    """Drop every queued and unacked Celery message (a failed phase's leftovers), and cancel the
    jobs they belonged to, so no later phase's worker picks them up."""
    from api import service
    from db.vocabulary import JobStatus
    from tasks.app import app
    from tasks.process import get_redis

    redis = get_redis()
    redis.delete(app.conf.task_default_queue, "bench-bulk", "unacked", "unacked_index")
    for status in (JobStatus.PENDING, JobStatus.RUNNING):
        try:
            service.cancel_matching(status, message="bench: a failed phase's leftovers", actor="bench")
        except Exception as exc:  # noqa: BLE001
            say(f"purge: cancelling leftover {status.value} jobs failed: {exc}")


def run_column(spec: ColumnSpec) -> Report:
    from bench.async_cancel import bench_async_cancel
    from bench.breakdown import bench_breakdown, profile_noop_job
    from bench.bulk import bench_bulk_cancel
    from bench.dashboard import bench_dashboard
    from bench.latency import bench_cancel_latency
    from bench.memory import bench_memory, bench_worker_rss
    from bench.scale import bench_batch_submit, bench_scale
    from bench.throughput import bench_throughput
    from db.migrate import upgrade

    sizes = Sizes(**spec.sizes)
    logs = Path(spec.logs)
    report = Report()
    started = sample_load()
    upgrade()
    # this process calls the service layer as the API process does, so it starts as the API does
    # (api/app.py's lifespan): SQLite's WAL checkpointed by a thread, not inside a commit (before, only
    # a run with the batch-submit phase, whose in-process API started it, had it: a bulk cancel run
    # alone took SQLite's checkpoints in its own commits), and its heap frozen (api/heap.py): a full GC
    # here would land in the figures as the API's
    from api.heap import freeze_startup_heap
    from db.session import checkpoint_in_background

    checkpoint_in_background()
    freeze_startup_heap()
    server = describe_database(spec.url)
    say(f"{spec.database} column: {server}")
    shared = SharedWorker(f"bench-{spec.database}-{os.getpid()}", logs)

    def on_worker(fn: Callable[[Sizes, Report], object]) -> Callable[[], object]:
        def phase() -> None:
            shared.ensure()
            fn(sizes, report)
        return phase

    def alone(fn: Callable[[], object]) -> Callable[[], object]:
        def phase() -> None:
            shared.stop()  # these start their own workers (or none): the shared one would only compete
            fn()
        return phase

    # The cheap figures first, the bulk cancel (10,000 jobs queued one by one, then drained) last: on a
    # box too busy for the whole column it is the one left out, not everything after it.
    phases: list[tuple[str, Callable[[], object]]] = []
    if not spec.only_scale:
        phases += [
            ("cancel latency", on_worker(bench_cancel_latency)),
            ("async cancel", on_worker(bench_async_cancel)),
            ("throughput", on_worker(bench_throughput)),
            ("worker rss", alone(lambda: bench_worker_rss(sizes, logs, report))),
        ]
    phases.append(("batch submit", alone(lambda: bench_batch_submit(sizes, logs, report))))
    if not spec.only_scale:  # the batch submit's rows are the dashboard's 10,000 (it tops them up if not)
        phases.append(("dashboard", alone(lambda: bench_dashboard(sizes, logs, report))))
    phases.append(("scale", alone(lambda: bench_scale(sizes, report))))
    if not spec.only_scale:
        phases += [("breakdown", alone(lambda: bench_breakdown(sizes, report))),
                   ("memory", alone(lambda: bench_memory(sizes, report))),
                   ("bulk cancel", alone(lambda: bench_bulk_cancel(sizes, logs, report)))]

    if spec.phases:
        phases = [(name, fn) for name, fn in phases if name in spec.phases]

    def save() -> None:
        """After every phase: what this column measured so far survives whatever comes next."""
        report.columns[spec.database] = {"server": server, "load": load_between(started, sample_load()),
                                         "extra": report.extra}
        report.analysis[spec.database] = analysis_lines(report)
        Path(spec.out).write_text(json.dumps(report.to_json(), default=str))

    ends_at = started.at + spec.time_s - 20  # time left to stop the workers and write the report
    try:
        for name, fn in phases:
            left = ends_at - time.monotonic()
            if left < 10:
                say(f"{spec.database}: {name} not run — the column's time is up")
                report.not_measured(name, f"not run, the column's share of the run's time ({spec.time_s:.0f} s) "
                                          f"was spent before it")
                report.rows[-1].phase, report.rows[-1].database = name, spec.database
                continue
            say(f"{spec.database}: {name}")
            # what earlier phases left in this process (their rows and ids, the dashboard's in-process
            # Playwright) is the harness's, not the API's: out of the collector's walks before the next
            # one, as an API process holds none of it (a full collection over it landed in the timings)
            gc.collect()
            gc.freeze()
            budget = min(sizes.budget_for(name), left)
            if not run_phase(report, name, fn, budget_s=budget, database=spec.database):
                shared.stop()
                purge_queues()
            save()
        if spec.profile:
            profile_noop_job()
    finally:
        shared.stop()
    save()
    return report


def main(argv: list[str]) -> int:
    spec = ColumnSpec(**json.loads(Path(argv[0]).read_text()))
    # a SIGTERM from bench/run.py (its time bound, or its own stop) still stops this column's workers
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))
    run_column(spec)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
