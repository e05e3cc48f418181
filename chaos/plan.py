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
    deadline_share: float = 0.15
    in_flight: int = 8  # harness jobs pending or running at a time (4 pool slots: about half queued)
    action_every_s: float = 0.3
    #: action mix (relative weights)
    weights: tuple = (("api_cancel", 36), ("cli_cancel", 10), ("flower_revoke", 16), ("flower_terminate", 14),
                      ("sigkill", 14), ("nothing", 10))
    #: disruptions, each when this share of the jobs has been submitted
    #: (the Redis restart follows the second worker restart at once: it lands while that worker,
    #: just back, auto-resumes what its shutdown stopped — a host reboot does no better)
    disruptions: tuple = ((0.2, "restart:chaos-1"), (0.45, "restart:chaos-2"), (0.45, "redis"),
                          (0.75, "restart:chaos-1"))
    redis_down_s: float = 2.0  # how long Redis stays away (heartbeat keys live 3 × 2 s)
    race_threads: int = 4
    race_max_offset_s: float = 0.03  # after the job is seen running (its one item takes ~20–70 ms)
    race_max_delay_s: float = 0.15  # after submit (it starts ~40–130 ms after its submit)
    budget_s: float = 600.0

    @classmethod
    def quick(cls) -> Plan:
        return cls(jobs=80, race=200)
