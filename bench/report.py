"""The benchmark's figures: rows, number formatting, the printed table, bench/README.md."""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

BENCH_DIR = Path(__file__).resolve().parent


@dataclass
class Row:
    figure: str
    andon: str
    baseline: str
    ratio: str
    goal: str
    met: bool | None  # None: informational, no goal
    #: The figure as a number, for results.json (None: only the text in ``andon``).
    value: float | None = None
    unit: str | None = None
    n: int | None = None


@dataclass
class Report:
    rows: list[Row] = field(default_factory=list)
    extra: dict = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)


def fmt_s(seconds: float) -> str:
    if seconds < 1e-6:
        return f"{seconds * 1e9:.0f} ns"
    if seconds < 1e-3:
        return f"{seconds * 1e6:.1f} µs"
    if seconds < 1:
        return f"{seconds * 1e3:.1f} ms"
    return f"{seconds:.2f} s"


def pct(values: list[float], p: float) -> float:
    """Nearest-rank percentile."""
    ordered = sorted(values)
    rank = max(1, -(-len(ordered) * p // 100))  # ceil
    return ordered[int(rank) - 1]


def p50_p99_ms(values_s: list[float]) -> tuple[float, float]:
    if not values_s:
        return float("nan"), float("nan")
    return pct(values_s, 50) * 1e3, pct(values_s, 99) * 1e3


def say(msg: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {msg}", flush=True)


HEADERS = ["figure", "andon", "baseline", "ratio", "goal", "met?"]


def met_text(met: bool | None) -> str:
    return "—" if met is None else ("yes" if met else "NO")


def print_table(rows: list[Row]) -> None:
    try:
        from rich.console import Console
        from rich.table import Table
    except ImportError:
        for row in rows:
            print(" | ".join([row.figure, row.andon, row.baseline, row.ratio, row.goal, met_text(row.met)]))
        return
    table = Table(title="andon benchmark", show_lines=True)
    for header in HEADERS:
        table.add_column(header, overflow="fold")
    for row in rows:
        style = {True: "green", False: "bold red", None: "dim"}[row.met]
        table.add_row(row.figure, row.andon, row.baseline, row.ratio, row.goal,
                      f"[{style}]{met_text(row.met)}[/{style}]")
    Console(width=180).print(table)


def markdown_table(rows: list[Row]) -> str:
    def cell(text: str) -> str:
        return text.replace("|", "\\|")

    lines = ["| " + " | ".join(HEADERS) + " |", "|" + "---|" * len(HEADERS)]
    for row in rows:
        cells = (row.figure, row.andon, row.baseline, row.ratio, row.goal, f"**{met_text(row.met)}**"
                 if row.met is False else met_text(row.met))
        lines.append("| " + " | ".join(cell(c) for c in cells) + " |")
    return "\n".join(lines)


README_HEAD = """\
# andon benchmark

```sh
make bench          # = .venv/bin/python bench/run.py  (after installing .[dev])
```

One command, about three to four minutes on two cores. It starts everything it needs itself, on
127.0.0.1 only, in a temporary `ANDON_HOME`: a Redis-compatible server (`api.stack.start_redis` on a
free port), a SQLite database (migrated with `db.migrate.upgrade`), and real prefork Celery workers
(`celery -A tasks.app worker -P prefork -c 2 -E --include bench.bare`). It measures every figure
side by side with its baseline **in the same run**, prints the table, rewrites this file with it, and
stops every process it started (warm shutdown, then the whole process group). Flags: `--quick` (small
counts for a smoke run; this file is left alone), `--no-readme`, `--keep` (keep the temp home with
the worker logs and the database), `--profile` (also cProfile one no-op andon job in-process),
`--strict` (exit 1 if a goal is missed). On a small shared box the p99s and the bulk-cancel time
move with whatever else runs; the `load` line under the table says how much did.

The baselines are in `bench/bare.py`. They are registered on andon's own app (`tasks.app.app`), so
they run on **the same worker, pool, broker, result backend and Celery settings** as andon's task:
`bench.bare_pipeline` runs the same stages (`tasks.stages`: parse → embed → analyze_local) on the
same documents with no token, no job row and no per-item commit, and returns the results list;
`bench.abortable_pipeline` is the same loop as a `celery.contrib.abortable.AbortableTask` that calls
`self.is_aborted()` before every stage — plain Celery's way to stop a running task.

## What each figure is

* **checkpoint cost** — `timeit`, best of 5 repeats, of (a) `CancellationToken.check()` on the live
  token a running job holds (from `TokenWatcher.watch()`, its watcher thread subscribed), 10⁶ calls
  per repeat; (b) `AbortableAsyncResult(id, app=app).is_aborted()` — exactly what
  `AbortableTask.is_aborted()` does on each call — against the app's Redis result backend, with the
  task's state stored as `STARTED`; (c) a plain `redis.exists(key)` on the same server. (b) and (c)
  run 3,000 calls per repeat. Ratio = baseline ÷ andon. Goal: ≥ 100× faster than AbortableTask and
  ≤ 1 µs. The token is then cancelled through Redis to check it still raises.
* **cancel → observed** — 200 jobs of 30 items, `stage_delay_s=0.05` (an item is 150 ms), on the
  `-c 2` worker, three in flight (two running, one queued). Once a job is `running` with ≥ 1 item
  committed, it is cancelled with `api.service.cancel_job` at a random moment within the next item.
  The figure is `cancel_observed_at − cancel_requested_at` from the job row — both stamped on this
  machine's clock: the request when `request_cancel` begins, the observation when the job's
  checkpoint raised; it includes writing the job row, which `request_cancel` does before it sets
  the token. Goal: p99 ≤ 10 ms. Baseline: 60 of the same jobs as `AbortableTask`s, `abort()`ed at a
  random moment of an item once one is done; latency = `time.time()` when the task saw
  `is_aborted()` − `time.time()` just before `abort()`. It is bounded by the stage sleep it can't
  interrupt.
* **observed → terminal row committed** — from `cancel_observed_at` to the first time a reader (this
  process, reading the rows of the jobs in flight every ~1 ms) sees the row `cancelled`: an upper
  bound on the commit, including the read interval. In brackets, the row's own stamps
  (`finished_at − cancel_observed_at`), taken before the commit. Goal: p99 ≤ 50 ms.
* **client** — informational: how long the `cancel_job()` call takes, and from its return until the
  caller, reading the row, sees the job over.
* **throughput** — the same N-item pipeline as andon jobs (`api.service.submit_job`) and as bare
  Celery tasks, on the same `-c 2` worker with the same documents (~35 words each) and the same
  number of jobs; wall time from the first submit to the last result (`AsyncResult.get`), items/s,
  ratio = andon ÷ bare. Each side runs twice, alternating (bare, andon, andon, bare), best of each.
  100 ms items: 8 jobs × 20 items, the 100 ms spread over the three stages (andon:
  `stage_delay_s=0.0333`, spent in `token.wait()`; bare: `time.sleep`). No-op items: 30 jobs × 50
  items, `stage_delay_s=0`, the stages only. Goals: ≥ 0.98× and ≥ 0.5×.
* **bulk cancel** — a `-c 1` worker on its own queue is kept busy by a long blocker job; 10,000 jobs
  are queued behind it (rows with `db.jobs.create_job` in one session, tokens with
  `CancellationStore.create_many`, messages through one producer). `api.service.cancel_matching(
  JobStatus.PENDING)` is timed. Then the blocker is cancelled, a second `-c 1` worker joins, and the
  workers drain the queue (bounded at 180 s; drained = queue empty and every message answered in the
  result backend); the jobs among the 10,000 with a `started` event are counted. Goal: ≤ 2 s, 0
  started.
* **dashboard page load** — the database holds at least 10,000 jobs (the bulk-cancel phase's, topped
  up with queued rows); a real uvicorn API serves `/ui`; Playwright drives the system Chromium
  (headless, as the browser tests do). Each load is a fresh browser context (cold cache): from
  `page.goto("/ui")` until the jobs table holds its first page (50 rows, read from `GET /api/jobs`).
  One warm-up load is not counted; the figure is the median of 10 (the max in brackets). Goal: < 1 s.
  Without Chromium the row says it was skipped.
* **where the time goes** (below the table) — the per-item steps of `run_job` replayed in the
  benchmark process (no worker): the stages, and the item's commit (`db.jobs.record_item` in its own
  `db.session.transaction`), back to back and after 100 ms idle.

"""


def write_readme(report: Report, machine: dict[str, str], load: str, total_s: float) -> Path:
    lines = [README_HEAD, "## Latest run", "",
             f"{datetime.now(UTC):%Y-%m-%d %H:%M} UTC, whole run {total_s:.0f} s.", "",
             markdown_table(report.rows), "", "Machine:", ""]
    lines += [f"* {key}: {value}" for key, value in machine.items()]
    lines += [f"* load: {load}"]
    analysis = analysis_lines(report)
    if analysis:
        lines += ["", "## Where the time goes (this run)", ""] + [f"* {line}" for line in analysis]
    path = BENCH_DIR / "README.md"
    path.write_text("\n".join(lines) + "\n")
    return path


def results_data(report: Report, machine: dict[str, str], load: str, total_s: float) -> dict:
    """What bench/results.json holds (DESIGN.md: bench output): every figure with its unit, n, goal
    and whether it was met; the machine; the load. A figure with no number of its own carries its
    text as the value (and no unit)."""
    return {
        "figures": [{"name": row.figure, "value": row.value if row.value is not None else row.andon,
                     "unit": row.unit, "n": row.n, "goal": None if row.goal in ("—", "") else row.goal,
                     "met": row.met, "baseline": None if row.baseline in ("—", "") else row.baseline}
                    for row in report.rows],
        "machine": machine,
        "load": load,
        "whole_run_s": round(total_s, 1),
        "at": f"{datetime.now(UTC):%Y-%m-%dT%H:%M:%SZ}",
    }


def write_results(report: Report, machine: dict[str, str], load: str, total_s: float, path: Path) -> Path:
    path.write_text(json.dumps(results_data(report, machine, load, total_s), indent=2, ensure_ascii=False) + "\n")
    return path


def analysis_lines(report: Report) -> list[str]:
    """Numbers from this run that explain the figures, the missed goals above all."""
    out: list[str] = []
    lat = report.extra.get("latency")
    if lat:
        out.append(
            f"cancel → observed {lat['observe_ms'][0]:.1f} / {lat['observe_ms'][1]:.1f} ms (p50 / p99): "
            f"`request_cancel` first commits the job row (`cancelling` + a `cancel_requested` event; the row "
            f"decides which request wins), then sets the token (Lua `SET NX` + `PUBLISH`), which the worker's "
            f"watcher thread hands to the job's `token.wait()`. The whole `cancel_job()` call takes "
            f"{lat['call_ms'][0]:.1f} / {lat['call_ms'][1]:.1f} ms (it also looks for child jobs).")
    br = report.extra.get("breakdown")
    tp = report.extra.get("throughput", {})
    if br:
        out.append(
            f"per item, replayed in-process: the stages take {br['stages_ms']:.2f} ms; andon adds the item's "
            f"commit (`record_item`: an INSERT and a counter UPDATE in one transaction) {br['commit_ms']:.2f} ms "
            f"back to back — {br['commit_idle_ms']:.2f} ms after 100 ms idle (stages {br['stages_idle_ms']:.2f} "
            f"ms). The bare task does the stages only.")
    for label, data in tp.items():
        out.append(f"throughput, {label}: andon spent {data['extra_ms_per_item']:.2f} ms more per item per pool "
                   f"process than bare Celery in the worker (best runs: andon {min(data['andon_s']):.2f} s, bare "
                   f"{min(data['bare_s']):.2f} s; all runs: andon {', '.join(f'{t:.2f}' for t in data['andon_s'])}"
                   f" s, bare {', '.join(f'{t:.2f}' for t in data['bare_s'])} s).")
    out += report.notes
    return out
