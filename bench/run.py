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
    --results PATH where to write the figures as JSON (default bench/results.json; written every run)
    --scale-rows N rows in the jobs table for the list and /metrics figures (make bench-scale: 1,000,000)
    --only-scale   only the batch-submit and scale figures (make bench-scale)
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))  # `python bench/run.py` puts bench/ first on the path, not the repo root

from api.supervisor import free_port, redis_service  # noqa: E402
from bench.async_cancel import bench_async_cancel  # noqa: E402
from bench.breakdown import bench_breakdown, profile_noop_job  # noqa: E402
from bench.bulk import bench_bulk_cancel  # noqa: E402
from bench.checkpoint import bench_checkpoint  # noqa: E402
from bench.dashboard import bench_dashboard  # noqa: E402
from bench.latency import bench_cancel_latency  # noqa: E402
from bench.machine import cpu_busy_s, machine_info, own_cpu_s  # noqa: E402
from bench.memory import bench_memory, bench_worker_rss  # noqa: E402
from bench.procs import Worker, configure_env  # noqa: E402
from bench.report import Report, analysis_lines, print_table, say, write_readme, write_results  # noqa: E402
from bench.scale import bench_batch_submit, bench_scale  # noqa: E402
from bench.sizes import CONCURRENCY, Sizes  # noqa: E402
from bench.throughput import bench_throughput  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--no-readme", action="store_true")
    parser.add_argument("--keep", action="store_true")
    parser.add_argument("--profile", action="store_true")
    parser.add_argument("--strict", action="store_true")
    parser.add_argument("--results", type=Path, default=ROOT / "bench" / "results.json")
    parser.add_argument("--scale-rows", type=int, default=None)
    parser.add_argument("--only-scale", action="store_true")
    args = parser.parse_args(argv)
    sizes = Sizes.quick() if args.quick else Sizes()
    if args.scale_rows is not None:
        sizes.scale_rows = args.scale_rows

    started_at = time.perf_counter()
    busy_at_start = cpu_busy_s()
    load_at_start = os.getloadavg()[0]
    home = Path(tempfile.mkdtemp(prefix="andon-bench-"))
    logs = home / "logs"
    logs.mkdir(parents=True)
    redis_port = free_port()
    configure_env(home, redis_port)

    # a SIGTERM/SIGHUP to the benchmark still runs the cleanup below
    for sig in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, lambda signum, frame: sys.exit(128 + signum))

    redis = None
    worker: Worker | None = None
    report = Report()
    try:
        redis = redis_service(redis_port, home / "redis", logs / "redis.log").start()
        from db.migrate import upgrade

        upgrade()
        say(f"home {home}, redis on 127.0.0.1:{redis_port}, load average {load_at_start:.2f}")

        if not args.only_scale:
            say("checkpoint cost")
            bench_checkpoint(sizes, report)

            worker = Worker(f"bench-{redis_port}", logs, concurrency=CONCURRENCY).start()
            say(f"cancel latency: {sizes.cancels} andon cancels of running jobs")
            bench_cancel_latency(sizes, report)
            say(f"cancel with async items in flight: {sizes.async_cancels} jobs")
            bench_async_cancel(sizes, report)
            bench_throughput(sizes, report)
            worker.stop()
            worker = None

            say(f"worker RSS across {sizes.rss_jobs:,} no-op jobs")
            bench_worker_rss(sizes, logs, report)

            say(f"bulk cancel of {sizes.bulk_jobs:,} queued jobs")
            bench_bulk_cancel(sizes, logs, report)

            say(f"dashboard page load with {sizes.ui_jobs:,} jobs in the database")
            bench_dashboard(sizes, logs, report)

        _scale_phases(sizes, report)

        if not args.only_scale:
            say("where an item's time goes (in-process)")
            bench_breakdown(sizes, report)
            say(f"andon's memory: {sizes.memory_jobs} running jobs, then async items in flight (in-process)")
            bench_memory(sizes, report)
        if args.profile:
            profile_noop_job()
    finally:
        if worker is not None:
            worker.stop()
        if redis is not None:
            redis.stop(signal.SIGTERM, timeout=10)
        if args.keep:
            say(f"kept {home}")
        else:
            shutil.rmtree(home, ignore_errors=True)

    total_s = time.perf_counter() - started_at
    busy_at_end = cpu_busy_s()
    ncpu = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    if busy_at_start is not None and busy_at_end is not None:
        others = max(0.0, (busy_at_end - busy_at_start) - own_cpu_s())
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
    if not args.quick and not args.no_readme and not args.only_scale:
        path = write_readme(report, machine, load, total_s)
        print(f"wrote {path.relative_to(ROOT)}")
    print(f"wrote {write_results(report, machine, load, total_s, args.results)}")
    if args.strict and any(row.met is False for row in report.rows):
        return 1
    return 0


def _scale_phases(sizes: Sizes, report: Report) -> None:
    say(f"batch submit: {sizes.batch_jobs:,} jobs per POST /api/jobs/batch")
    bench_batch_submit(sizes, report)
    bench_scale(sizes, report)


if __name__ == "__main__":
    sys.exit(main())
