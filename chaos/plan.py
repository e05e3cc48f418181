"""What a chaos run does: its sizes, its action mix, when it disrupts the stack."""

from __future__ import annotations

from dataclasses import dataclass

REASONS = ["user_requested", "timeout", "system_shutdown", "resource_limit", "dependency_failed"]


@dataclass
class Plan:
    jobs: int = 320
    race: int = 1000
    workers: int = 2
    concurrency: int = 2
    min_docs: int = 3
    max_docs: int = 15
    min_delay_s: float = 0.02
    max_delay_s: float = 0.1
    deadline_share: float = 0.2
    #: issue 13: ANDON_POLICY for the whole run: a job cancelled for timeout resumes at once, at most
    #: ``max_policy_resumes`` times along one chain of resumes
    policy: str = '{"timeout": "auto_resume"}'
    max_policy_resumes: int = 3
    in_flight: int = 8  # harness jobs pending or running at a time (4 pool slots: about half queued)
    action_every_s: float = 0.3
    #: action mix (relative weights)
    weights: tuple = (("api_cancel", 36), ("cli_cancel", 10), ("flower_revoke", 16), ("flower_terminate", 14),
                      ("sigkill", 14), ("nothing", 10),
                      # issue 11: a running job's own message delivered again (send_task with its id,
                      # Flower's async-apply), and a queued job's message deleted from the broker list
                      ("dup_send_task", 5), ("dup_flower_apply", 4), ("lose_message", 4),
                      # issue 13: concurrent submits with one supersede_key, one submit retried with one
                      # Idempotency-Key (plus the key with another body)
                      ("supersede_race", 5), ("idem_retry", 5))
    #: disruptions, each when this share of the jobs has been submitted
    #: (the Redis restart follows the second worker restart at once: it lands while that worker,
    #: just back, auto-resumes what its shutdown stopped — a host reboot does no better)
    #: issue 11's harsher faults, one at a time: "streams" (100–200 open event streams), "redis-pause"
    #: (SIGSTOP), "db-lock" (a write lock past the busy timeout), "redis-down" (stopped 10–30 s),
    #: "pg-restart" (Postgres phase only)
    disruptions: tuple = ((0.2, "restart:chaos-1"), (0.3, "streams"), (0.38, "redis-pause"),
                          (0.45, "restart:chaos-2"), (0.45, "redis"), (0.58, "db-lock"),
                          (0.75, "restart:chaos-1"), (0.85, "redis-down"))
    redis_down_s: float = 2.0  # how long Redis stays away (heartbeat keys live 3 × 2 s)
    race_threads: int = 4
    race_max_offset_s: float = 0.03  # after the job is seen running (its one item takes ~20–70 ms)
    race_max_delay_s: float = 0.15  # after submit (it starts ~40–130 ms after its submit)
    redis_pause_s: tuple = (10.0, 30.0)  # SIGSTOP → SIGCONT
    redis_outage_s: tuple = (10.0, 30.0)  # stopped → started again on the same port
    db_lock_s: tuple = (12.0, 15.0)  # SQLite's busy timeout is 10 s
    streams: tuple = (100, 200)
    #: how long the harness waits, after the last submit, for every job to end (a lost message must be
    #: found and re-sent within it)
    drain_s: float = 90.0
    budget_s: float = 600.0

    @classmethod
    def quick(cls) -> Plan:
        """About two minutes: fewer jobs, one worker restart, each harsher fault once at its shortest."""
        return cls(jobs=60, race=150, disruptions=((0.15, "restart:chaos-1"), (0.25, "streams"),
                                                   (0.4, "redis-pause"), (0.6, "db-lock"), (0.8, "redis-down")),
                   redis_pause_s=(10.0, 10.0), redis_outage_s=(10.0, 10.0), db_lock_s=(12.0, 12.0),
                   streams=(100, 100), drain_s=60.0)

    @classmethod
    def postgres(cls, quick: bool = False) -> Plan:
        """The Postgres phase: the same workload over PostgreSQL 15, restarted mid-run (pg_ctl restart -m
        fast), and its job tables write-locked for 12–15 s."""
        base = cls.quick() if quick else cls(jobs=160, race=400)
        base.disruptions = ((0.2, "restart:chaos-1"), (0.35, "pg-restart"), (0.6, "db-lock"),
                            (0.8, "pg-restart"))
        return base
