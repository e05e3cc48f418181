"""andon's benchmark: ``make bench`` (or ``.venv/bin/python bench/run.py``).

Starts its own Redis-compatible server, a throwaway PostgreSQL 15 (as the tests do) and prefork
Celery workers (all on 127.0.0.1, all in a temporary ANDON_HOME, all stopped at the end), measures
every figure of issue 12 side by side with its baseline in the same run — each database figure once
on SQLite and once on PostgreSQL (bench/column.py, a process per database) — prints one table,
writes it with the machine and the load to bench/README.md, and the figures to bench/results.json.
No phase stops the run: one that fails or runs past its budget is reported as not measured, with why;
and the whole run is bounded (14 minutes; --quick 9): a phase that would start past it is not run.

    --quick        smaller counts (a smoke run; the README is not written)
    --no-readme    print the table only
    --keep         keep the temporary ANDON_HOME (worker logs, databases) for a look afterwards
    --profile      also cProfile one no-op andon job in each column's process and print the top
    --strict       exit 1 if any goal is not met or any figure could not be measured
    --results PATH where to write the figures as JSON (default bench/results.json; written every run)
    --databases L  which database columns, comma-separated (default sqlite,postgres)
    --scale-rows N rows in the jobs table for the list and /metrics figures (make bench-scale: 1,000,000)
    --only-scale   only the batch-submit and scale figures (make bench-scale)
    --budget S     the whole run's bound in seconds (default: Sizes.run_budget_s)
    --phases L     only these phases, comma-separated (e.g. "bulk cancel,throughput"; a look at one
                   figure while working on it: the README is not written)
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))  # `python bench/run.py` puts bench/ first on the path, not the repo root

from api.supervisor import free_port, redis_service  # noqa: E402
from bench.checkpoint import bench_checkpoint  # noqa: E402
from bench.column import ColumnSpec  # noqa: E402
from bench.machine import load_between, load_text, machine_info, sample_load  # noqa: E402
from bench.peer import bench_peer_abort, peer_row_texts  # noqa: E402
from bench.phase import run_phase  # noqa: E402
from bench.postgres import start_postgres  # noqa: E402
from bench.procs import configure_env  # noqa: E402
from bench.report import (  # noqa: E402
    DATABASE_NAMES,
    Report,
    interleave,
    print_table,
    say,
    write_readme,
    write_results,
)
from bench.sizes import Sizes  # noqa: E402

DATABASES = ("sqlite", "postgres")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--no-readme", action="store_true")
    parser.add_argument("--keep", action="store_true")
    parser.add_argument("--profile", action="store_true")
    parser.add_argument("--strict", action="store_true")
    parser.add_argument("--results", type=Path, default=ROOT / "bench" / "results.json")
    parser.add_argument("--databases", default=",".join(DATABASES))
    parser.add_argument("--scale-rows", type=int, default=None)
    parser.add_argument("--only-scale", action="store_true")
    parser.add_argument("--budget", type=float, default=None)
    parser.add_argument("--phases", default=None)
    args = parser.parse_args(argv)
    args.phases = [p.strip() for p in args.phases.split(",") if p.strip()] if args.phases else None
    databases = [d.strip() for d in args.databases.split(",") if d.strip()]
    if not databases or set(databases) - set(DATABASES):
        parser.error(f"--databases: choose from {', '.join(DATABASES)}")
    sizes = Sizes.quick() if args.quick else Sizes()
    if args.scale_rows is not None:
        sizes.scale_rows = args.scale_rows
    if args.budget is not None:
        sizes.run_budget_s = args.budget

    started_at = time.perf_counter()
    ends_at = time.monotonic() + sizes.whole_run_budget()
    load_start = sample_load()
    home = Path(tempfile.mkdtemp(prefix="andon-bench-"))
    logs = home / "logs"
    logs.mkdir(parents=True)
    redis_port = free_port()
    configure_env(home, redis_port)
    redis_url = os.environ["ANDON_REDIS_URL"]
    # this process's own database: the token watcher of the checkpoint figure reads job rows; each
    # column has its own (bench/column.py)
    os.environ["ANDON_DATABASE_URL"] = f"sqlite:///{home / 'independent.db'}"

    # a SIGTERM/SIGHUP to the benchmark still runs the cleanup below
    for sig in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, lambda signum, frame: sys.exit(128 + signum))

    redis = None
    pg = None
    report = Report()
    columns: dict[str, list] = {}
    try:
        redis = redis_service(redis_port, home / "redis", logs / "redis.log").start()
        say(f"home {home}, redis on 127.0.0.1:{redis_port}, load average {load_start.loadavg[0]:.2f}")
        from db.migrate import upgrade

        upgrade()

        if not args.only_scale:  # the figures that touch no database: once, before the columns
            if _chosen(args, "checkpoint"):
                say("checkpoint cost")
                run_phase(report, "checkpoint", lambda: bench_checkpoint(sizes, report), budget_s=sizes.budget_s)
            if _chosen(args, "peer baseline"):
                say(f"peer baseline: {sizes.peer_cancels} dramatiq-abort aborts")
                run_phase(report, "peer baseline", lambda: bench_peer_abort(sizes, logs, report, redis_url),
                          budget_s=sizes.budget_s)

        for i, database in enumerate(databases):
            _flush(redis_port)  # each column starts on an empty Redis: no queue or token carries over
            url = f"sqlite:///{home / 'sqlite' / 'andon.db'}" if database == "sqlite" else None
            if database == "postgres":
                say("starting a throwaway PostgreSQL (tests/pgserver.py)")
                pg, url, why = start_postgres()
                if why:
                    say(f"PostgreSQL column: not run — {why}")
                    report.columns[database] = {"reason": f"not run: {why}"}
                    report.not_measured("PostgreSQL column", why).database = database
                    continue
            # the columns share what is left of the run's budget: the first one can't take it all
            time_s = (ends_at - time.monotonic()) / (len(databases) - i)
            columns[database] = _run_column(database, url, sizes, args, home, report, time_s)
    finally:
        if pg is not None:
            pg.stop()
        if redis is not None:
            redis.stop(signal.SIGTERM, timeout=10)
        if args.keep:
            say(f"kept {home}")
        else:
            shutil.rmtree(home, ignore_errors=True)

    report.rows += interleave(columns)
    peer_row_texts(report)
    total_s = time.perf_counter() - started_at
    load = load_between(load_start, sample_load(), others=True)
    load["loadavg_start"], load["loadavg_end"] = list(load_start.loadavg), list(os.getloadavg())

    print()
    print_table(report.rows)
    machine = machine_info()
    print("machine: " + "; ".join(f"{k} {v}" for k, v in machine.items()))
    for database, column in report.columns.items():
        print(f"{DATABASE_NAMES[database]}: {column.get('server') or 'not run: ' + column.get('reason', '?')}"
              + (f"; {load_text(column['load'])}" if column.get("load") else ""))
    print(f"{load_text(load)}; whole run {total_s:.0f} s")
    for line in report.notes:
        print(f"- {line}")
    for database, lines in report.analysis.items():
        for line in lines:
            print(f"- {DATABASE_NAMES[database]}: {line}")
    if not args.quick and not args.no_readme and not args.only_scale and not args.phases:
        path = write_readme(report, machine, load, total_s)
        print(f"wrote {path.relative_to(ROOT)}")
    print(f"wrote {write_results(report, machine, load, total_s, args.results)}")
    missed = report.missed()
    if args.strict and missed:
        say(f"--strict: {len(missed)} figures missed their goal or were not measured")
        return 1
    return 0


def _chosen(args, phase: str) -> bool:
    return not args.phases or phase in args.phases


def _flush(redis_port: int) -> None:
    import redis

    redis.Redis(port=redis_port).flushall()


def _run_column(database: str, url: str, sizes: Sizes, args, home: Path, report: Report, time_s: float) -> list:
    """Run one database column in its own process (bench/column.py); its rows, or one row saying why
    there are none. Bounded: it starts no phase past ``time_s`` and bounds each one; if it still runs a
    minute after that it is stopped (SIGTERM: it stops its workers), and what it measured is kept."""
    column_home = home / database
    (column_home / "logs").mkdir(parents=True, exist_ok=True)
    out = column_home / "report.json"
    spec = ColumnSpec(database=database, url=url, sizes=dataclasses.asdict(sizes), logs=str(column_home / "logs"),
                      out=str(out), only_scale=args.only_scale, profile=args.profile, time_s=max(time_s, 30.0),
                      phases=args.phases)
    spec_path = column_home / "spec.json"
    spec_path.write_text(json.dumps(dataclasses.asdict(spec)))
    env = {**os.environ, "ANDON_DATABASE_URL": url, "ANDON_HOME": str(column_home)}
    bound = spec.time_s + 60
    say(f"{DATABASE_NAMES[database]} column (bounded at {bound:.0f} s)")
    proc = subprocess.Popen([sys.executable, "-m", "bench.column", str(spec_path)], cwd=ROOT, env=env)
    why = None
    try:
        code = proc.wait(bound)
        if code != 0:
            why = f"the column's process exited with code {code}"
    except subprocess.TimeoutExpired:
        why = f"the column was stopped after {bound:.0f} s, past its share of the run's time"
    finally:
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(90)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
    if out.exists():
        child = Report.from_json(json.loads(out.read_text()))
        rows = child.rows
        report.columns.update(child.columns)
        report.analysis.update(child.analysis)
    else:
        rows = []
    if why:
        report.columns.setdefault(database, {})["reason"] = why
        rows.append(report.not_measured(f"{DATABASE_NAMES[database]} column", why))
        report.rows.pop()  # it goes in with the column's rows
        rows[-1].database = database
    return rows


if __name__ == "__main__":
    sys.exit(main())
