"""`make chaos` itself keeps working: a cut-down quick run (a few jobs, the event-stream storm, a short
Redis pause and database lock, duplicate deliveries and lost messages as they come) starts its stack,
runs every phase, checks every row, prints the report with the new checks, and leaves nothing behind.

It asserts that the harness runs (exit 0 = clean, 1 = violations found), not that andon is clean under
it: that is `make chaos`'s own verdict, which this smoke run is too short to give.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.timeout(150)
def test_quick_chaos_runs() -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("ANDON_")}
    done = subprocess.run(
        [sys.executable, str(ROOT / "chaos" / "run.py"), "--quick", "--seed", "7", "--jobs", "16", "--race", "20",
         "--faults", "streams,redis-pause,db-lock", "--fault-s", "3", "--no-postgres", "--budget-s", "120"],
        cwd=str(ROOT), env=env, capture_output=True, text=True, timeout=140)
    out = done.stdout
    kept = re.search(r"logs, database and report kept in (\S+)", out)
    if kept and done.returncode in (0, 1) and Path(kept.group(1)).name.startswith("andon-chaos-"):
        shutil.rmtree(kept.group(1), ignore_errors=True)  # violations are the lead's business, not this test's
    assert done.returncode in (0, 1), f"exit {done.returncode}\n{out[-3000:]}\n{done.stderr[-3000:]}"
    assert "andon chaos report — seed 7" in out
    for line in ("stream storm: ", "redis-pause: ", "db-lock (BEGIN IMMEDIATE on the SQLite file): "):
        assert line in out, line
    for check in ("no harsher fault", "one owner at a time", "a job whose queue message was deleted",
                  "database outage", "event streams open",
                  # issue 13: supersede races, idempotent retries, policy resumes
                  "a supersede race leaves one job standing", "one Idempotency-Key, one body",
                  "every timeout-cancelled job was resumed by the policy"):
        assert check in out, check
    assert "the harness failed" not in out
    assert "no process left behind after the stack stopped" in out
    assert "FAIL no process left behind" not in out
