"""The words andon uses everywhere: why a job stopped, who asked, what state it is in.

Values are the strings stored in the database and returned by the API (see DESIGN.md).
"""

from __future__ import annotations

from enum import StrEnum


class CancellationReason(StrEnum):
    """Why a job was stopped. Exactly five; every Celery stop path maps to one."""

    USER_REQUESTED = "user_requested"
    TIMEOUT = "timeout"
    SYSTEM_SHUTDOWN = "system_shutdown"
    RESOURCE_LIMIT = "resource_limit"
    DEPENDENCY_FAILED = "dependency_failed"


class CancellationSource(StrEnum):
    """Who or what asked for the stop."""

    API = "api"
    CLI = "cli"
    REVOKE = "revoke"
    TIME_LIMIT = "time_limit"
    DEADLINE = "deadline"
    WORKER_SHUTDOWN = "worker_shutdown"
    WORKER_LOST = "worker_lost"
    MEMORY_WATCHDOG = "memory_watchdog"
    PARENT = "parent"
    SUPERSEDED = "superseded"
    DATABASE_UNAVAILABLE = "database_unavailable"


class JobStatus(StrEnum):
    PENDING = "pending"
    RUNNING = "running"
    CANCELLING = "cancelling"
    CANCELLED = "cancelled"
    COMPLETED = "completed"
    FAILED = "failed"

    @property
    def is_terminal(self) -> bool:
        return self in TERMINAL_STATUSES


TERMINAL_STATUSES = frozenset({JobStatus.CANCELLED, JobStatus.COMPLETED, JobStatus.FAILED})


class EventKind(StrEnum):
    """What a ``job_events`` row records. A cancel is *requested*, then *observed* at a checkpoint,
    then the job is *cancelled* (its terminal row committed) — three moments, three events."""

    SUBMITTED = "submitted"
    STARTED = "started"
    CANCEL_REQUESTED = "cancel_requested"
    CANCEL_OBSERVED = "cancel_observed"
    CANCELLED = "cancelled"
    COMPLETED = "completed"
    FAILED = "failed"
    CLEANUP_FAILED = "cleanup_failed"
    REQUEUED = "requeued"
    ESCALATED = "escalated"
    RESUMED = "resumed"
    #: A second delivery of a running job found its owner alive and did nothing.
    DUPLICATE_SKIPPED = "duplicate_skipped"
    #: A delivery found the job's owner gone and took over the items not done.
    TAKEN_OVER = "taken_over"
    #: A queued job whose message the broker lost was sent again.
    RESENT = "resent"
    #: One delivery attempt of a job's webhook (tasks/webhooks.py): status, error, next retry.
    WEBHOOK_ATTEMPT = "webhook_attempt"


class ItemStatus(StrEnum):
    DONE = "done"
    FAILED = "failed"
    #: In flight when a cancel came: not done, not failed; resume runs it again from its first stage.
    INTERRUPTED = "interrupted"


#: Cancelled for these reasons, a job is worth resuming: nothing was wrong with the job itself.
RESUMABLE_REASONS = frozenset({CancellationReason.TIMEOUT, CancellationReason.SYSTEM_SHUTDOWN})
