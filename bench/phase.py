"""One phase of the benchmark, run so that the run goes on whatever it does: bounded in time, its
failure turned into a "not measured" row with the reason, and its rows stamped with the database
column and how loaded the machine was while it ran."""

from __future__ import annotations

import signal
import traceback
from collections.abc import Callable
from pathlib import Path

from bench.machine import load_between, sample_load
from bench.report import Report, say

__all__ = ["PhaseTimeout", "run_phase"]


class PhaseTimeout(BaseException):
    """A phase ran past its budget. Raised in the main thread by SIGALRM, so it can't interrupt a
    blocking system call any sooner than Python gets control back (the calls here all time out).
    A ``BaseException``, like andon's cancellation: the ``except Exception`` of the code it lands in
    (andon's notify, a figure's retry) can't swallow it and carry on past the budget."""


def run_phase(report: Report, name: str, fn: Callable[[], object], *, budget_s: float,
              database: str | None = None) -> bool:
    """Run ``fn`` (which appends its rows to ``report``); True if it finished. An exception or a run
    past ``budget_s`` leaves the rows it made so far plus one row saying what was not measured and
    why; a Ctrl-C or SIGTERM still stops the whole run."""
    first = len(report.rows)
    before = sample_load()

    def out_of_time(signum, frame):
        raise PhaseTimeout(f"the phase ran past its budget of {budget_s:.0f} s" if budget_s >= 10 else
                           f"the phase ran past its budget of {budget_s:g} s")

    previous = signal.signal(signal.SIGALRM, out_of_time)
    signal.setitimer(signal.ITIMER_REAL, budget_s)
    reason = None
    try:
        fn()
    except (Exception, PhaseTimeout) as exc:  # noqa: BLE001 — every failure is reported, none stops the run
        reason = " ".join(f"{type(exc).__name__}: {exc}".split())[:300]
        say(f"{name}: not measured — {reason}")
        frames = [f for f in traceback.extract_tb(exc.__traceback__) if not f.filename.endswith("phase.py")]
        where = f" (in {Path(frames[-1].filename).name}:{frames[-1].lineno}, {frames[-1].name})" if frames else ""
        report.notes.append(f"{name} was not measured: {reason}{where}")
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)
    if reason is not None:
        report.not_measured(name, reason)
    load = load_between(before, sample_load())
    for row in report.rows[first:]:
        row.phase, row.database, row.load = name, database, load
    return reason is None
