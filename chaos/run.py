"""andon's reliability harness: ``make chaos`` (or ``.venv/bin/python chaos/run.py``).

Starts its own embedded stack (Redis, migrations, two prefork workers with stable node names, the
API, Flower behind basic auth — all on 127.0.0.1 under a fresh temporary ANDON_HOME) and then:

1. chaos: submits a few hundred jobs through the API over time, and while they run cancels them at
   random through the API, the CLI, Flower's Revoke and Terminate, SIGKILLs worker pool children
   mid-job, re-delivers running jobs' messages (send_task with the job's id, Flower's apply), deletes
   queued jobs' messages from the broker, warm-restarts workers (same node name, auto-resume on),
   restarts Redis once, pauses it (SIGSTOP) and stops it for 10–30 s, holds the database's write lock
   past its busy timeout, and opens 100–200 event streams at once;
2. race: a thousand one-item jobs, each cancelled a random moment after its submit (cancel vs
   complete);
3. checks every row (see chaos/checks.py and docs/chaos.md), prints a report, stops everything,
   and exits 1 on any violation (2 if the harness itself could not run).

Then, when PostgreSQL is available (initdb/pg_ctl on PATH), the Postgres phase: the same workload
over a throwaway PostgreSQL 15, restarted mid-run (pg_ctl restart -m fast) and write-locked for 12–15 s
(a subprocess of this script, ``--db postgres``; skipped with the reason printed otherwise).

    --jobs N --race N    sizes (default 320 and 1000); --quick: 60 and 150, each fault once, shortest
    --seed N             random seed (default: time-based, printed)
    --postgres           run the Postgres phase (an error if Postgres is missing); default: when available,
                         except with --quick
    --no-postgres        skip the Postgres phase
    --db sqlite|postgres run one backend only (the Postgres phase alone: --db postgres)
    --keep               keep the temporary ANDON_HOME (logs, database) even when everything passed
    --budget-s S         hard bound on each phase's run (default 600 s)
"""

from __future__ import annotations

import argparse
import json
import os
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import traceback
from datetime import datetime
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))  # `python chaos/run.py` puts chaos/ first, not the repo root

from api.supervisor import free_port  # noqa: E402
from chaos.console import say  # noqa: E402
from chaos.harness import Harness  # noqa: E402
from chaos.plan import Plan  # noqa: E402
from chaos.procs import configure_env  # noqa: E402
from chaos.report import report  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--jobs", type=int, help="phase 1 jobs (default 320)")
    parser.add_argument("--race", type=int, help="phase 2 cancel-vs-complete jobs (default 1000)")
    parser.add_argument("--seed", type=int, help="random seed (default: from the clock; printed)")
    parser.add_argument("--quick", action="store_true", help="60 jobs and 150 races, each fault once (a smoke run)")
    parser.add_argument("--keep", action="store_true", help="keep the temporary ANDON_HOME even if all passed")
    parser.add_argument("--budget-s", type=float, help="hard bound on each phase's run (default 600)")
    parser.add_argument("--postgres", action="store_true", help="also run the Postgres phase (required)")
    parser.add_argument("--no-postgres", action="store_true", help="skip the Postgres phase")
    parser.add_argument("--db", choices=("sqlite", "postgres"), help="run this backend only")
    parser.add_argument("--faults", help="only these disruptions, comma-separated (restart, redis, streams, "
                        "redis-pause, redis-down, db-lock, pg-restart), or 'none'")
    parser.add_argument("--fault-s", type=float, help="every fault this long (smoke tests; the real run draws "
                        "10–30 s, 12–15 s for the lock)")
    args = parser.parse_args(argv)
    seed = args.seed if args.seed is not None else int(time.time()) % 100000
    if args.db:
        return run_one(args, seed, args.db)
    code = run_one(args, seed, "sqlite")
    if code == 130:
        return code
    pg_code = None
    skip = postgres_skip_reason(args)
    if skip:
        say(f"Postgres phase skipped: {skip}")
        if args.postgres:
            return 2
    else:
        say("Postgres phase: the same run over PostgreSQL 15 (a subprocess: --db postgres)")
        child = [sys.executable, str(Path(__file__).resolve()), "--db", "postgres", "--seed", str(seed)]
        for flag in ("quick", "keep"):
            if getattr(args, flag):
                child.append(f"--{flag}")
        for opt in ("jobs", "race", "budget_s", "faults", "fault_s"):
            if getattr(args, opt) is not None:
                child += [f"--{opt.replace('_', '-')}", str(getattr(args, opt))]
        try:
            pg_code = subprocess.run(child, cwd=str(ROOT)).returncode
        except KeyboardInterrupt:
            return 130
    say(f"summary (seed {seed}): SQLite run exit {code}" +
        (f", Postgres run exit {pg_code}" if pg_code is not None else f", Postgres run skipped ({skip})"))
    codes = {code, pg_code} - {None}
    return 130 if 130 in codes else 2 if 2 in codes else 1 if 1 in codes else 0


def postgres_skip_reason(args) -> str | None:
    if args.no_postgres:
        return "--no-postgres"
    if args.quick and not args.postgres:
        return "--quick (add --postgres to include it)"
    try:
        from tests.pgserver import postgres_available
    except ImportError as exc:
        return f"tests/pgserver.py not importable: {exc}"
    return postgres_available()


def run_one(args, seed: int, db: str) -> int:
    if db == "postgres":
        plan = Plan.postgres(quick=args.quick)
        plan.budget_s = 480.0
    else:
        plan = Plan.quick() if args.quick else Plan()
    if args.jobs is not None:
        plan.jobs = args.jobs
    if args.race is not None:
        plan.race = args.race
    if args.budget_s:
        plan.budget_s = args.budget_s
    if args.faults:
        keep = set() if args.faults == "none" else set(args.faults.split(","))
        unknown = keep - {"restart", "redis", "streams", "redis-pause", "redis-down", "db-lock", "pg-restart"}
        if unknown:
            say(f"--faults: unknown {sorted(unknown)}")
            return 2
        plan.disruptions = tuple((share, what) for share, what in plan.disruptions
                                 if what.split(":", 1)[0] in keep)
    if args.fault_s:
        plan.redis_pause_s = plan.redis_outage_s = plan.db_lock_s = (args.fault_s, args.fault_s)

    home = Path(tempfile.mkdtemp(prefix="andon-chaos-"))
    ports = {"redis": free_port(), "api": free_port(), "flower": free_port()}
    flower_auth = f"chaos:{secrets.token_urlsafe(12)}"
    pg = None
    database_url = None
    if db == "postgres":
        reason = postgres_skip_reason(argparse.Namespace(no_postgres=False, quick=False, postgres=True))
        if reason:
            say(f"Postgres phase: cannot run: {reason}")
            return 2
        from tests.pgserver import PostgresServer

        say("starting a throwaway PostgreSQL (tests/pgserver.py)")
        pg = PostgresServer().start()
        database_url = pg.create_database("andon_chaos")
    configure_env(home, ports["redis"], flower_auth, database_url, plan.policy, plan.max_policy_resumes)
    # once, here: action threads that import it lazily at the same moment race on its import cycle
    # (ImportError: partially initialized module 'tasks.process')
    import tasks.process  # noqa: F401
    from chaos.checks import check_beyond, check_rows, race_summary
    from chaos.procs import leftover_processes

    h = Harness(plan, seed, home, ports, flower_auth, database_url=database_url, pg=pg)
    started = time.monotonic()

    def stop_all() -> None:
        try:
            h.stack.stop()
        finally:
            if pg is not None:
                pg.stop()

    phase_over = threading.Event()

    def watchdog() -> None:  # the hard bound: whatever hangs, the run ends and leaves nothing behind
        if phase_over.wait(plan.budget_s):  # this phase's own bound only: the Postgres phase has its own
            return
        say(f"BUDGET of {plan.budget_s:.0f}s EXCEEDED: stopping everything")
        try:
            stop_all()
        finally:
            print(f"logs kept in {home}", flush=True)
            os._exit(2)

    threading.Thread(target=watchdog, daemon=True).start()

    def on_sigterm(_signum, _frame):  # stopped from outside: still stop the stack (its own sessions)
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, on_sigterm)
    code = 0
    try:
        h.start()
        h.run_chaos()
        h.run_race()
        say("checking every row")
        leftovers_dirs = h.leftover_dirs()
        jobs, items, events = h.load_rows()
        partials = h.fetch_partials([j.id for j in jobs])
        states = h.celery_states(jobs)
        parked = h.parked_messages()
        violations, info = check_rows(h.record, jobs, items, events, partials, states, parked, h.celery_meta,
                                      integrity=h.integrity_errors(), worker_errors=h.worker_errors())
        more, beyond = check_beyond(h.record, jobs, events, h.supersede_winners(), plan.max_policy_resumes,
                                    policy_on="auto_resume" in (plan.policy or ""))
        violations += more
        info.update(beyond)
        info["results-settled"] = h.results_settled()
        race = race_summary(h.record, jobs, events)
    except KeyboardInterrupt:
        say("interrupted: stopping the stack")
        stop_all()
        phase_over.set()
        print(f"logs kept in {home}", flush=True)
        return 130
    except Exception:
        say("the harness failed:\n" + traceback.format_exc())
        stop_all()
        phase_over.set()
        print(f"logs kept in {home}", flush=True)
        return 2
    say("stopping the stack")
    known = h.stack.all_pids()
    stop_all()
    phase_over.set()
    time.sleep(0.5)
    procs = leftover_processes(home, known, pg.base_dir if pg is not None else None)
    text, total = report(h, jobs, events, violations, info, race, leftovers_dirs, procs,
                         time.monotonic() - started)
    print(text, flush=True)
    (home / "chaos-report.txt").write_text(text + "\n")
    (home / "violations.json").write_text(json.dumps(
        [{"check": c, "job_id": j, "message": m} for c, j, m in violations], indent=1))
    (home / "actions.json").write_text(json.dumps({  # what the harness did, for a look at a violation
        "actions": [{"kind": a.kind, "job_id": a.job_id, "at": a.at.isoformat(), "reason": a.reason,
                     "source": a.source, "result": a.result, "pid": a.pid} for a in h.record.actions],
        "restarts": [{k: (v.isoformat() if isinstance(v, datetime) else v) for k, v in r.items()}
                     for r in h.record.restarts],
        "redis_restart": [t.isoformat() for t in h.record.redis_restart] if h.record.redis_restart else None,
        "faults": [{k: (v.isoformat() if isinstance(v, datetime) else v) for k, v in f.items()}
                   for f in h.record.faults],
        "worker_deaths": h.record.worker_deaths,
    }, indent=1, default=str))
    if total:
        code = 1
    if total or args.keep:
        print(f"logs, database and report kept in {home}", flush=True)
    else:
        shutil.rmtree(home, ignore_errors=True)
    return code


if __name__ == "__main__":
    sys.exit(main())
