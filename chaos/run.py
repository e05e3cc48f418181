"""andon's reliability harness: ``make chaos`` (or ``.venv/bin/python chaos/run.py``).

Starts its own embedded stack (Redis, migrations, two prefork workers with stable node names, the
API, Flower behind basic auth — all on 127.0.0.1 under a fresh temporary ANDON_HOME) and then:

1. chaos: submits a few hundred jobs through the API over time, and while they run cancels them at
   random through the API, the CLI, Flower's Revoke and Terminate, SIGKILLs worker pool children
   mid-job, warm-restarts workers (same node name, auto-resume on) and restarts Redis once;
2. race: a thousand one-item jobs, each cancelled a random moment after its submit (cancel vs
   complete);
3. checks every row (see chaos/checks.py and docs/chaos.md), prints a report, stops everything,
   and exits 1 on any violation (2 if the harness itself could not run).

    --jobs N --race N    sizes (default 320 and 1000); --quick: 80 and 200
    --seed N             random seed (default: time-based, printed)
    --keep               keep the temporary ANDON_HOME (logs, database) even when everything passed
    --budget-s S         hard bound on the whole run (default 600 s)
"""

from __future__ import annotations

import argparse
import json
import os
import secrets
import shutil
import signal
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
    parser.add_argument("--quick", action="store_true", help="80 jobs and 200 races (a smoke run)")
    parser.add_argument("--keep", action="store_true", help="keep the temporary ANDON_HOME even if all passed")
    parser.add_argument("--budget-s", type=float, help="hard bound on the whole run (default 600)")
    args = parser.parse_args(argv)
    plan = Plan.quick() if args.quick else Plan()
    if args.jobs is not None:
        plan.jobs = args.jobs
    if args.race is not None:
        plan.race = args.race
    if args.budget_s:
        plan.budget_s = args.budget_s
    seed = args.seed if args.seed is not None else int(time.time()) % 100000

    home = Path(tempfile.mkdtemp(prefix="andon-chaos-"))
    ports = {"redis": free_port(), "api": free_port(), "flower": free_port()}
    flower_auth = f"chaos:{secrets.token_urlsafe(12)}"
    configure_env(home, ports["redis"], flower_auth)

    from chaos.checks import check_rows, race_summary
    from chaos.procs import leftover_processes

    h = Harness(plan, seed, home, ports, flower_auth)
    started = time.monotonic()

    def watchdog() -> None:  # the hard bound: whatever hangs, the run ends and leaves nothing behind
        time.sleep(plan.budget_s)
        say(f"BUDGET of {plan.budget_s:.0f}s EXCEEDED: stopping everything")
        try:
            h.stack.stop()
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
        violations, info = check_rows(h.record, jobs, items, events, partials, states, parked, h.celery_meta)
        race = race_summary(h.record, jobs, events)
    except KeyboardInterrupt:
        say("interrupted: stopping the stack")
        h.stack.stop()
        print(f"logs kept in {home}", flush=True)
        return 130
    except Exception:
        say("the harness failed:\n" + traceback.format_exc())
        h.stack.stop()
        print(f"logs kept in {home}", flush=True)
        return 2
    say("stopping the stack")
    known = h.stack.all_pids()
    h.stack.stop()
    time.sleep(0.5)
    procs = leftover_processes(home, known)
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
    }, indent=1))
    if total:
        code = 1
    if total or args.keep:
        print(f"logs, database and report kept in {home}", flush=True)
    else:
        shutil.rmtree(home, ignore_errors=True)
    return code


if __name__ == "__main__":
    sys.exit(main())
