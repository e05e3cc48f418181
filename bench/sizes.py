"""How big each phase of the benchmark is, the goals its figures are held to, and its documents."""

from __future__ import annotations

from dataclasses import dataclass


# Every phase is bounded (``budget_s``; bench/phase.py), and so is the whole run (``run_budget_s``):
# a box so busy that the two database columns would take longer gets the figures that fit, and the
# rest reported not measured.
@dataclass
class Sizes:
    check_number: int = 1_000_000  # calls per repeat for the in-process check()
    net_number: int = 3_000  # calls per repeat for the two network checks
    repeat: int = 5
    cancels: int = 200  # andon cancels of running jobs
    abortable_cancels: int = 60  # AbortableTask baseline aborts
    async_cancels: int = 40  # cancels of jobs with four async items in flight
    cancel_items: int = 30
    cancel_stage_delay_s: float = 0.05
    cancel_ahead: int = 3  # jobs in flight: two running (one per pool process), one queued behind
    cancel_poll_s: float = 0.001  # how often the job rows are read while cancels are in flight
    slow_jobs: int = 8  # 100 ms items
    slow_items: int = 20
    noop_jobs: int = 60  # no-op items (a side takes well under a second: long enough to outlast a hiccup)
    noop_items: int = 50
    rounds: int = 2  # throughput: bare, andon, andon, bare, ... best of each
    noop_rounds: int = 3  # the no-op side, short and so the noisiest, runs a third time each
    bulk_jobs: int = 10_000
    bulk_rounds: int = 3  # bulk cancels of bulk_jobs, each of its own jobs: best of them (all are reported)
    drain_timeout_s: float = 60.0  # the skip rate is measured over the messages taken by then
    breakdown_items: int = 200
    ui_jobs: int = 10_000  # rows in the database when the dashboard loads
    ui_loads: int = 6
    batch_jobs: int = 10_000  # jobs in one POST /api/jobs/batch
    batch_rounds: int = 2
    single_submits: int = 300  # one POST /api/jobs each, timed one by one (p99 and the baseline rate)
    bulk_jobs_large: int = 100_000  # the large bulk cancel (full size only: not in --quick)
    bulk_large_rounds: int = 2
    scale_rows: int = 50_000  # rows in the jobs table for the list and /metrics figures (bench-scale: 1,000,000)
    scale_requests: int = 50  # timed requests per list filter, and of /metrics
    memory_jobs: int = 100  # jobs running at once in-process for andon's memory per job
    memory_async_jobs: int = 4  # jobs of 250 async items in flight, for the memory per item
    rss_jobs: int = 10_000  # no-op jobs through a worker while its RSS is watched
    peer_cancels: int = 60  # dramatiq-abort aborts (bench/peer.py)
    budget_s: float = 240.0  # the most one phase may take before it is reported not measured
    run_budget_s: float = 840.0  # the whole run (the columns share what the database-free phases leave)

    @classmethod
    def quick(cls) -> Sizes:
        return cls(check_number=200_000, net_number=1_000, repeat=3, cancels=30, abortable_cancels=10,
                   slow_jobs=4, slow_items=10, noop_jobs=10, noop_items=50, rounds=1, noop_rounds=1, bulk_jobs=500, bulk_rounds=2,
                   drain_timeout_s=45.0, breakdown_items=50, async_cancels=6, ui_jobs=2_000, ui_loads=2,
                   batch_jobs=2_000, batch_rounds=1, scale_rows=12_000, scale_requests=20, single_submits=50,
                   bulk_jobs_large=0, memory_jobs=10, memory_async_jobs=1, rss_jobs=100, peer_cancels=10,
                   budget_s=120.0, run_budget_s=540.0)

    def budget_for(self, phase: str) -> float:
        """A phase's time budget: the scale phase grows with the rows it fills (1,000,000: ~20 min)."""
        if phase == "scale":
            return max(self.budget_s, self.scale_rows / 800)
        return self.budget_s

    def whole_run_budget(self) -> float:
        """The whole run's bound: ``run_budget_s``, or more when the scale phase alone needs it."""
        return max(self.run_budget_s, 2 * self.budget_for("scale") + 300)


GOAL_CHECK_RATIO = 100.0
GOAL_CHECK_NS = 1_000.0
# issue 12's goals, on SQLite and PostgreSQL alike
GOAL_OBSERVE_P99_MS = 5.0
GOAL_TERMINAL_P99_MS = 20.0
GOAL_SLOW_RATIO = 0.99
GOAL_NOOP_RATIO = 0.5
GOAL_BULK_S = 0.5
GOAL_BULK_LARGE_S = 5.0  # 100,000 queued jobs
GOAL_SKIP_MS = 0.5  # per already-cancelled queued message a worker skips
GOAL_SUBMIT_P99_MS = 10.0  # one POST /api/jobs
GOAL_UI_LOAD_S = 1.0
GOAL_BATCH_JOBS_S = 5_000
GOAL_SCALE_P99_MS = 50.0
ITEM_S = 0.1  # the "100 ms item", spread over the three stages
CONCURRENCY = 2

def documents(count: int) -> list[str]:
    """Deterministic documents of ~35 words (the demo's, without its blank one), the same for andon
    and for the baselines."""
    from api.demo import TOPICS

    return [f"Document {i + 1} about {TOPICS[i % len(TOPICS)][0]}. {TOPICS[i % len(TOPICS)][1]}"
            for i in range(count)]


#: the job statuses a job never leaves
TERMINAL = {"cancelled", "completed", "failed"}
