"""The benchmark's figures: rows, number formatting, the printed table, bench/README.md and
bench/results.json (DESIGN.md's "bench output")."""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, field, fields
from datetime import UTC, datetime
from pathlib import Path

from bench.machine import load_text

BENCH_DIR = Path(__file__).resolve().parent


@dataclass
class Row:
    figure: str
    andon: str
    baseline: str
    ratio: str
    goal: str
    met: bool | None  # None: informational, no goal (or not measured: see ``reason``)
    #: The figure as a number, for results.json (None: only the text in ``andon``).
    value: float | None = None
    unit: str | None = None
    n: int | None = None
    #: Set by the phase that ran it (bench/phase.py): the database column (None: the figure does not
    #: touch a database), the phase's name, how loaded the machine was meanwhile.
    database: str | None = None
    phase: str | None = None
    load: dict | None = None
    #: Why the figure could not be measured (None: it was).
    reason: str | None = None

    @property
    def measured(self) -> bool:
        return self.reason is None


@dataclass
class Report:
    rows: list[Row] = field(default_factory=list)
    extra: dict = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    #: database column -> the server it ran on and how loaded the machine was during it
    columns: dict[str, dict] = field(default_factory=dict)
    #: database column -> its "where the time goes" lines
    analysis: dict[str, list[str]] = field(default_factory=dict)

    def not_measured(self, figure: str, reason: str) -> Row:
        """A figure that could not be measured: it stays in the table, with why."""
        row = Row(figure, f"not measured: {reason}", "—", "—", "—", None, reason=reason)
        self.rows.append(row)
        return row

    def to_json(self) -> dict:
        return {"rows": [asdict(r) for r in self.rows], "extra": self.extra, "notes": self.notes,
                "columns": self.columns, "analysis": self.analysis}

    @classmethod
    def from_json(cls, data: dict) -> Report:
        names = {f.name for f in fields(Row)}
        return cls(rows=[Row(**{k: v for k, v in r.items() if k in names}) for r in data.get("rows", [])],
                   extra=data.get("extra", {}), notes=data.get("notes", []), columns=data.get("columns", {}),
                   analysis=data.get("analysis", {}))

    def missed(self) -> list[Row]:
        """Rows whose goal was missed, or that have a goal (or none known) and were not measured:
        what ``--strict`` fails on."""
        return [r for r in self.rows if r.met is False or not r.measured]


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


HEADERS = ["figure", "database", "andon", "baseline", "ratio", "goal", "met?", "load"]

#: how a database column is named in the table
DATABASE_NAMES = {"sqlite": "SQLite", "postgres": "PostgreSQL"}


def met_text(row: Row) -> str:
    if not row.measured:
        return "not measured"
    return "—" if row.met is None else ("yes" if row.met else "NO")


def load_cell(row: Row) -> str:
    """The phase's load in a few characters: 1-minute load average at its start → end, steal."""
    if not row.load:
        return "—"
    a, b = row.load["loadavg_1m"]
    steal = row.load.get("steal_percent")
    return f"{a:.1f} → {b:.1f}" + (f", steal {steal:.1f} %" if steal and steal >= 0.1 else "")


def cells(row: Row) -> list[str]:
    database = DATABASE_NAMES.get(row.database, row.database) if row.database else "—"
    return [row.figure, database, row.andon, row.baseline, row.ratio, row.goal, met_text(row), load_cell(row)]


def print_table(rows: list[Row]) -> None:
    try:
        from rich.console import Console
        from rich.table import Table
    except ImportError:
        for row in rows:
            print(" | ".join(cells(row)))
        return
    table = Table(title="andon benchmark", show_lines=True)
    for header in HEADERS:
        table.add_column(header, overflow="fold")
    for row in rows:
        style = "bold red" if not row.measured else {True: "green", False: "bold red", None: "dim"}[row.met]
        text = cells(row)
        text[6] = f"[{style}]{text[6]}[/{style}]"
        table.add_row(*text)
    Console(width=200).print(table)


def markdown_table(rows: list[Row]) -> str:
    def cell(text: str) -> str:
        return text.replace("|", "\\|").replace("\n", " ")

    lines = ["| " + " | ".join(HEADERS) + " |", "|" + "---|" * len(HEADERS)]
    for row in rows:
        text = cells(row)
        if row.met is False or not row.measured:
            text[6] = f"**{text[6]}**"
        lines.append("| " + " | ".join(cell(c) for c in text) + " |")
    return "\n".join(lines)


def interleave(columns: dict[str, list[Row]]) -> list[Row]:
    """The columns' rows side by side: each figure's SQLite row, then its PostgreSQL row (rows are
    matched by phase and position in it, so a figure whose name carries its n still pairs up)."""
    by_phase: dict[str, dict[str, list[Row]]] = {}
    for database, rows in columns.items():
        for row in rows:
            by_phase.setdefault(row.phase or "", {}).setdefault(database, []).append(row)
    out: list[Row] = []
    for per_db in by_phase.values():
        for i in range(max(len(r) for r in per_db.values())):
            out += [rows[i] for rows in per_db.values() if i < len(rows)]
    return out


README_HEAD = """\
# andon benchmark

```sh
make bench                 # = .venv/bin/python bench/run.py  (after installing .[dev])
make bench ARGS=--quick    # a smoke run, small counts (the test suite runs it)
make bench-scale           # the batch-submit, list and /metrics figures at 1,000,000 job rows
```

One command, about ten minutes on a busy two-core box. It starts everything it needs itself, on
127.0.0.1 only, in a temporary `ANDON_HOME`: a Redis-compatible server (`api.stack.start_redis` on a
free port), a throwaway **PostgreSQL 15** started exactly as the tests start theirs
(`tests/pgserver.py`: `initdb`/`pg_ctl` as the `postgres` user, a private data directory and port,
`fsync=off`), SQLite databases (each migrated with `db.migrate.upgrade`), and real prefork Celery
workers (`celery -A tasks.app worker -P prefork -c 2 -E --include bench.bare`). It measures every
figure side by side with its baseline **in the same run**, prints the table, rewrites this file with
it, writes the figures to `bench/results.json`, and stops every process it started (warm shutdown,
then the whole process group).

**Two database columns.** Every figure that touches the database is measured twice, once on SQLite and
once on PostgreSQL: `bench/column.py` runs the same phases in a process of its own per database (its
settings, engines, workers and caches belong to that database alone; Redis is emptied between the
two). A column process calls the service layer (`api.service`) where a client would call the API, so
it freezes its heap at start as the API process does (`api/heap.py`). The table pairs the columns:
each figure's SQLite row, then its PostgreSQL row. The figures that touch
no database (the checkpoint, the peer baseline) run once. If PostgreSQL can't start here, the table
says why and the run goes on with SQLite (`--databases sqlite` asks for that).

**It never aborts, and it ends.** Each phase runs through `bench/phase.py`: bounded in time
(`Sizes.budget_s`, four minutes; the scale phase grows with its rows), and a phase that fails or runs
out of time is reported as **not measured**, with the reason, while the next phase still runs; its own
rows so far are kept. The whole run is bounded too (`--budget`, 14 minutes; `--quick` 9): the two
columns share what the database-free phases leave, and a phase that would start past its column's
share is reported not run, so a box too busy for everything still gets a table.
No phase depends on another phase's job: after a failure the shared worker is restarted and the
queues are emptied, and the bulk-cancel phase queues its jobs with no worker serving the queue until
the cancel is done (it used to keep a "blocker" job running, which a SQLite write-lock timeout on a
loaded box could stop). Each column is bounded too, and what it measured is saved after every phase.

**The load.** A small shared box moves every p99, so every figure says how loaded the machine was
while it was measured (the `load` column: the 1-minute load average at the start → end of its phase,
and the CPU the hypervisor stole, when there was any), and the lines under the table say it for each
column and for the whole run (load average, the cores other processes used, steal, from `/proc/stat`).

Flags: `--quick` (small counts; this file is left alone), `--no-readme`, `--keep` (keep the temp home
with the worker logs and the databases), `--profile` (also cProfile one no-op andon job in each
column), `--strict` (exit 1 if a goal is missed or a figure could not be measured), `--results PATH`,
`--databases sqlite,postgres`, `--scale-rows N`, `--only-scale`, `--budget S`, `--phases L` (only
the named phases, e.g. `"bulk cancel"`; this file is left alone).

## results.json

DESIGN.md's shape: `{"figures": [{"name", "value", "unit", "n", "goal", "met"}, ...], "machine": {...},
"load": {...}}`. Each figure also has `database` (`"sqlite"`, `"postgres"`, or null for a figure that
touches no database), `measured` and `reason` (why not, when it could not be measured: then `value`
and `met` are null), `baseline`, `ratio`, `phase` and the phase's `load`. `value` is the number the
goal is judged on (a p99 in ms, a ratio, seconds, jobs/s). `machine` names each column's server under
`databases`; `load` is the whole run's (`loadavg_start`/`loadavg_end`, `busy_cores`, `others_cores`,
`steal_percent`) with each column's under `columns`.

## The baselines

`bench/bare.py` registers them on andon's own app (`tasks.app.app`), so they run on **the same
worker, pool, broker, result backend and Celery settings** as andon's task: `bench.bare_pipeline`
runs the same stages (`tasks.stages`: parse → embed → analyze_local) on the same documents with no
token, no job row and no per-item commit, and returns the results list; `bench.abortable_pipeline` is
the same loop as a `celery.contrib.abortable.AbortableTask` that calls `self.is_aborted()` before every
stage — plain Celery's way to stop a running task.

The **peer baseline** is another task queue's way to stop a running task: dramatiq with dramatiq-abort
(`bench/peer_worker.py`), set up as its README says — an `Abortable` middleware with its Redis event
backend on a `RedisBroker` — on the same Redis server, in a `dramatiq` worker subprocess with two
threads (two tasks at a time, like `-c 2`), running the same stages on the same documents.
dramatiq-abort raises `Abort` into the actor's thread (`PyThreadState_SetAsyncExc`), which lands at
the thread's next bytecode — it can't cut a `time.sleep` short — and its watcher thread listens
(a 1-second `BLPOP`) only for the messages that were running when that wait began, after sleeping a
second whenever none was: both are in the figure.

## What each figure is

* **checkpoint cost** — `timeit`, best of 5 repeats, of (a) `CancellationToken.check()` on the live
  token a running job holds (from `TokenWatcher.watch()`, its watcher thread subscribed), 10⁶ calls
  per repeat; (b) `AbortableAsyncResult(id, app=app).is_aborted()` — exactly what
  `AbortableTask.is_aborted()` does on each call — against the app's Redis result backend, with the
  task's state stored as `STARTED`; (c) a plain `redis.exists(key)` on the same server. (b) and (c)
  run 3,000 calls per repeat. Ratio = baseline ÷ andon. Goal: ≥ 100× faster than AbortableTask and
  ≤ 1 µs. The token is then cancelled through Redis to check it still raises.
* **running job abort → seen (peer)** — informational: 60 jobs of the latency figure's shape on the
  dramatiq worker, each `abort()`ed at a random moment of an item once one is done; latency =
  `time.time()` when the actor caught `Abort` − `time.time()` just before `abort()`. Beside it, andon's
  cancel → observed and AbortableTask's abort → seen from each column.
* **cancel → observed** — 200 jobs of 30 items, `stage_delay_s=0.05` (an item is 150 ms), on the
  `-c 2` worker, three in flight (two running, one queued). Once a job is `running` with ≥ 1 item
  committed, it is cancelled with `api.service.cancel_job` at a random moment within the next item.
  The figure is `cancel_observed_at − cancel_requested_at` from the job row — both stamped on this
  machine's clock: the request when `request_cancel` begins, the observation when the job's
  checkpoint raised. Goal: p99 ≤ 5 ms. Baseline: 60 of the same jobs as `AbortableTask`s,
  `abort()`ed at a random moment of an item once one is done; latency = `time.time()` when the task
  saw `is_aborted()` − `time.time()` just before `abort()`. It is bounded by the stage sleep it can't
  interrupt.
* **observed → terminal row committed** — from `cancel_observed_at` to the first time a reader (this
  process, reading the rows of the jobs in flight every ~1 ms, each read one statement outside a
  transaction: on PostgreSQL one round trip, not three) sees the row `cancelled`: an upper
  bound on the commit, including the read interval. The next jobs are submitted, and the cancels
  sent, from two other threads, and for this phase the process hands the GIL over every 0.5 ms
  instead of 5: a submit is ~5 ms of its CPU, and in the reader's loop it held reads back. In brackets, the row's own stamps
  (`finished_at − cancel_observed_at`), taken before the commit. Goal: p99 ≤ 20 ms.
* **client** — informational: how long the `cancel_job()` call takes, and from its return until the
  caller, reading the row, sees the job over.
* **cancel → observed with async items in flight** — a user pipeline (`bench/pipelines.py`) with four
  items awaiting `ctx.sleep` per job; requested → observed from the job rows. Goal: p99 ≤ 100 ms.
* **throughput** — the same N-item pipeline as andon jobs (`api.service.submit_job`) and as bare
  Celery tasks, on the same `-c 2` worker with the same documents (~35 words each) and the same
  number of jobs; wall time from the first submit to the last result (`AsyncResult.get`), items/s,
  ratio = andon ÷ bare. Each side runs twice, alternating (bare, andon, andon, bare), best of each.
  100 ms items: 8 jobs × 20 items, the 100 ms spread over the three stages (andon:
  `stage_delay_s=0.0333`, spent in `token.wait()`; bare: `time.sleep`). No-op items: 60 jobs × 50
  items, `stage_delay_s=0`, the stages only, three runs each side (bare, andon, andon, bare, bare,
  andon): a side takes well under a second, so one hiccup of the box moved the best of two by a
  tenth (30 jobs, two runs each, until 2026-11-30). Goals: ≥ 0.99× and ≥ 0.5×.
* **bulk cancel** — the column's last phase (on a box too busy for the whole column, it is the one
  left out): 10,000 jobs are queued on a queue no worker serves yet (rows and messages as a batch
  submit makes them: `db.jobs.create_jobs`, `tasks.sending.enqueue_many`), tagged so that only they
  match; `api.service.cancel_matching(JobStatus.PENDING, tag=...)` is timed, after one untimed bulk
  cancel of 20 jobs (the first in a process compiles its statements). Three rounds, each of its own
  10,000 jobs; the figure is the best, every round's time beside it (on this 2-core box the same
  cancel took 0.33–0.60 s from one run to the next; its CPU time moved as much). The 100,000-job
  cancel: the same, best of 2, no workers. Goals: ≤ 0.5 s, 0 started; ≤ 5 s.
* **skipping an already-cancelled queued message** — then two `-c 1` workers start on that queue
  while its messages wait aside (the list `RENAME`d away, so the first worker up can't drain it
  alone before the other is ready); the clock starts when both are ready and the list is put back,
  and they drain it for at most 60 s (drained = queue empty and every message answered in the
  result backend, polled every 20 ms); the figure is that time × 2 workers ÷ the messages they took
  (all 10,000 if drained; a queue not drained misses the goal), and the jobs among the 10,000 with a
  `started` event are counted for the bulk-cancel row. Goal: ≤ 0.5 ms per message.
* **dashboard page load** — the database holds at least 10,000 jobs (the batch submit's, topped up
  with queued rows if need be); a real uvicorn API serves `/ui`; Playwright drives the system Chromium
  (headless, as the browser tests do). Each load is a fresh browser context (cold cache): from
  `page.goto("/ui")` until the jobs table holds its first page (50 rows, read from `GET /api/jobs`).
  One warm-up load is not counted; the figure is the median of 6 (the max in brackets). Goal: < 1 s.
  Without Chromium the row says it was not measured, and why.
* **batch submit** — `POST /api/jobs/batch` of 10,000 jobs in-process (FastAPI's validation
  included), rows and messages for real, best of 2. Goal: ≥ 5,000 jobs/s.
* **single submit** — 300 `POST /api/jobs` one after another over one keep-alive HTTP connection
  (httpx) to a real uvicorn API started on the column's database, timed one by one after three
  warm-ups; in brackets, the API process's CPU per submit (from `/proc`). Their rate is the batch's
  baseline. (Runs before 2026-11-30 sent them through Starlette's in-process `TestClient`, whose own
  thread hand-offs made most of each request's CPU.) Goal: p99 ≤ 10 ms.
* **lists and /metrics at scale** — the jobs table filled to 50,000 rows (`make bench-scale`:
  1,000,000), mostly ended, a third cancelled; `GET /api/jobs?...&limit=50` for six filters and
  `GET /metrics`, 50 timed requests each after two warm-ups. On PostgreSQL the filled tables are
  vacuumed and `ANALYZE`d first (a table filled in seconds has no planner statistics and pages not
  yet all-visible, for index-only scans, until autovacuum's next turns; one grown over weeks has
  both). Goal: p99 ≤ 50 ms.
* **where the time goes** (below the table, per column) — the per-item steps of `run_job` replayed
  in the benchmark process (no worker): the stages, and the item's commit (`db.jobs.record_item` in
  its own `db.session.transaction`), back to back and after 100 ms idle.

"""

def write_readme(report: Report, machine: dict[str, str], load: dict, total_s: float) -> Path:
    lines = [README_HEAD, "## Latest run", "",
             f"{datetime.now(UTC):%Y-%m-%d %H:%M} UTC, whole run {total_s:.0f} s; "
             f"{load_text(load)} over the run.", "",
             markdown_table(report.rows), "", "Machine:", ""]
    lines += [f"* {key}: {value}" for key, value in machine.items()]
    for database, column in report.columns.items():
        name = DATABASE_NAMES.get(database, database)
        lines.append(f"* {name} column: {column.get('server', 'not run')}"
                     + (f"; {load_text(column['load'])}, {column['load']['seconds']:.0f} s" if column.get("load")
                        else "") + (f" — **{column['reason']}**" if column.get("reason") else ""))
    lines += [f"* load over the whole run: {load_text(load)}"]
    if report.notes or report.analysis:
        lines += ["", "## Where the time goes (this run)", ""] + [f"* {line}" for line in report.notes]
        for database, analysis in report.analysis.items():
            name = DATABASE_NAMES.get(database, database)
            lines += [f"* **{name}** — {line}" for line in analysis]
    path = BENCH_DIR / "README.md"
    path.write_text("\n".join(lines) + "\n")
    return path


def figure_data(row: Row) -> dict:
    """One figure of results.json: DESIGN.md's six keys first, then what says where it comes from."""
    value = row.value if row.value is not None or not row.measured else row.andon
    return {"name": row.figure, "value": value, "unit": row.unit, "n": row.n,
            "goal": None if row.goal in ("—", "") else row.goal, "met": row.met,
            "database": row.database, "measured": row.measured, "reason": row.reason,
            "baseline": None if row.baseline in ("—", "") else row.baseline,
            "ratio": None if row.ratio in ("—", "") else row.ratio, "phase": row.phase, "load": row.load}


def results_data(report: Report, machine: dict[str, str], load: dict, total_s: float) -> dict:
    """What bench/results.json holds (DESIGN.md: bench output): every figure with its unit, n, goal
    and whether it was met (a figure that could not be measured says why); the machine, with each
    database column's server; the load over the whole run and during each phase."""
    return {
        "figures": [figure_data(row) for row in report.rows],
        "machine": {**machine, "databases": {db: c.get("server") for db, c in report.columns.items()}},
        "load": {**load, "summary": load_text(load),
                 "columns": {db: c.get("load") for db, c in report.columns.items()}},
        "whole_run_s": round(total_s, 1),
        "at": f"{datetime.now(UTC):%Y-%m-%dT%H:%M:%SZ}",
    }


def write_results(report: Report, machine: dict[str, str], load: dict, total_s: float, path: Path) -> Path:
    path.write_text(json.dumps(results_data(report, machine, load, total_s), indent=2, ensure_ascii=False) + "\n")
    return path


def analysis_lines(report: Report) -> list[str]:
    """Numbers from this run that explain the figures, the missed goals above all."""
    out: list[str] = []
    lat = report.extra.get("latency")
    if lat:
        out.append(
            f"cancel → observed {lat['observe_ms'][0]:.1f} / {lat['observe_ms'][1]:.1f} ms (p50 / p99): "
            f"`request_cancel` sets a running job's token first, with no read (one Lua call: only while the "
            f"job's heartbeat lives; `SET NX` decides which request wins, `PUBLISH` tells the workers; any other "
            f"job's row is read first, for the 404/400), which the worker's watcher thread hands to the job's "
            f"`token.wait()`; the row follows with the winner. The whole `cancel_job()` call takes "
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
