"""The benchmark's output: bench/results.json in DESIGN.md's shape ("bench output"), and a phase that
fails is reported as not measured while the run goes on. (The figures themselves are benchmarks, not
timed tests: `make bench`; the quick mode's run is tests/test_scale.py.)"""

from __future__ import annotations

import json
import numbers
import time
from pathlib import Path

from bench.machine import load_between, sample_load
from bench.phase import run_phase
from bench.report import Report, Row, interleave, results_data

ROOT = Path(__file__).resolve().parent.parent
DESIGN_KEYS = {"name", "value", "unit", "n", "goal", "met"}


def check_results_shape(results: dict) -> None:
    """DESIGN.md: {"figures": [{"name", "value", "unit", "n", "goal", "met"}], "machine": {...}, "load": ...};
    a figure held to a goal that was measured has a number and its unit."""
    assert set(results) >= {"figures", "machine", "load"}
    assert results["figures"] and isinstance(results["machine"], dict) and results["load"]
    for figure in results["figures"]:
        assert set(figure) >= DESIGN_KEYS, figure
        assert figure["met"] in (True, False, None)
        assert figure["database"] in (None, "sqlite", "postgres")
        if figure["measured"] and figure["goal"] is not None:
            assert isinstance(figure["value"], numbers.Real) and figure["unit"], figure
            assert isinstance(figure["n"], int) and figure["met"] in (True, False), figure
        if not figure["measured"]:
            assert figure["reason"] and figure["value"] is None and figure["met"] is None, figure


def _report() -> Report:
    report = Report()
    report.rows.append(Row("checkpoint cost", "check(): 60 ns", "—", "—", "≤ 1 µs", True, value=60.0, unit="ns",
                           n=1000))
    sqlite = [Row("cancel → observed", "3 ms", "—", "—", "p99 ≤ 5 ms", True, value=3.0, unit="ms", n=200,
                  database="sqlite", phase="cancel latency")]
    postgres = [Row("cancel → observed", "7 ms", "—", "—", "p99 ≤ 5 ms", False, value=7.0, unit="ms", n=199,
                    database="postgres", phase="cancel latency")]
    report.rows += interleave({"sqlite": sqlite, "postgres": postgres})
    report.not_measured("bulk cancel", "RuntimeError: the queue was not drained").database = "sqlite"
    report.columns = {"sqlite": {"server": "SQLite 3", "load": None}, "postgres": {"reason": "no initdb"}}
    return report


def test_results_json_has_the_shape_design_md_gives():
    start = sample_load()
    results = json.loads(json.dumps(results_data(_report(), {"OS": "Linux"}, load_between(start, sample_load()),
                                                 1.0)))
    check_results_shape(results)
    by_db = [(f["name"], f["database"]) for f in results["figures"]]
    assert by_db[:3] == [("checkpoint cost", None), ("cancel → observed", "sqlite"), ("cancel → observed", "postgres")]
    assert results["machine"]["databases"] == {"sqlite": "SQLite 3", "postgres": None}
    assert {"loadavg_1m", "busy_cores", "steal_percent"} <= set(results["load"])


def test_strict_fails_on_a_missed_goal_and_on_a_figure_not_measured():
    missed = [r.figure for r in _report().missed()]
    assert missed == ["cancel → observed", "bulk cancel"]


def test_a_failing_phase_is_reported_not_measured_and_the_next_still_runs():
    report = Report()

    def fails():
        report.rows.append(Row("half a phase", "1 ms", "—", "—", "—", None, value=1.0, unit="ms", n=1))
        raise RuntimeError("the blocker job stopped")

    assert run_phase(report, "bulk cancel", fails, budget_s=30, database="sqlite") is False
    def swallows():  # code that catches Exception (andon's notify does) can't outlive the budget
        for _ in range(50):
            try:
                time.sleep(0.1)
            except Exception:
                pass

    assert run_phase(report, "slow", swallows, budget_s=0.2) is False
    assert run_phase(report, "fine", lambda: None, budget_s=30) is True
    kept, failed, timed_out = report.rows
    assert kept.measured and kept.database == "sqlite" and kept.load["loadavg_1m"]
    assert not failed.measured and "the blocker job stopped" in failed.reason and failed.database == "sqlite"
    assert not timed_out.measured and "budget of 0.2 s" in timed_out.reason


def test_the_committed_results_json_has_design_mds_shape():
    results = json.loads((ROOT / "bench" / "results.json").read_text())
    check_results_shape(results)
    assert {f["database"] for f in results["figures"]} >= {"sqlite", "postgres"}
