"""Every Redis key and channel andon uses, in one place (compare rq's ``keys.py``).

All keys carry a TTL, so an abandoned job never leaks.
"""

from __future__ import annotations

__all__ = [
    "cancel_key", "cancel_requests_key", "cancellations_channel", "heartbeat_key", "job_changes_channel", "lost_key", "lost_run_key",
    "queued_cancels_channel", "queued_cancels_key", "rows_deleted_key", "sweep_lock_key",
]


def cancel_key(job_id: str) -> str:
    """The *winning* cancel request of a job, JSON; set with ``SET NX`` so the first cancel wins."""
    return f"andon:cancel:{job_id}"


def cancel_requests_key(job_id: str) -> str:
    """Every cancel request of a job, winners and losers, for the record (a list). A bulk cancel's
    request is not logged here for the queued jobs it ends: each such job's events hold it."""
    return f"andon:cancel:{job_id}:requests"


def heartbeat_key(job_id: str) -> str:
    """Beaten by the process running a job (its pid, item and stage); lives three beats."""
    return f"andon:heartbeat:{job_id}"


def lost_key(job_id: str) -> str:
    """How many times a job's worker process was lost (a poison job is failed, not requeued forever)."""
    return f"andon:lost:{job_id}"


def lost_run_key(job_id: str, fence: int) -> str:
    """Set by whoever recovers run ``fence`` of a job once it is lost: one recovery per lost run."""
    return f"andon:lost:{job_id}:run-{fence}"


def cancellations_channel(db: int) -> str:
    """Where winning cancels are published. Pub/sub ignores database numbers, so the channel carries
    the store's: two deployments on one Redis server (different ``/db``) never hear each other."""
    return f"andon:cancellations:{db}"


def queued_cancels_key(db: int) -> str:
    """The jobs cancelled while queued, recently (a sorted set scored by time, trimmed to a bound):
    what a worker's main process reads to skip their messages without a pool process
    (:mod:`tasks.cancellation.queued`); per database like the channels."""
    return f"andon:queued-cancels:{db}"


def queued_cancels_channel(db: int) -> str:
    """Where a cancel of a queued job is pushed (one id, or a JSON list of a bulk cancel's ids)."""
    return f"andon:queued-cancels:{db}"


def job_changes_channel(db: int) -> str:
    """Where "job X changed" notifications go (:mod:`tasks.notify`), per database like the cancels."""
    return f"andon:job-changes:{db}"


def sweep_lock_key() -> str:
    """Held by the one worker that looks for lost and parked messages this round."""
    return "andon:broker-sweep"


def rows_deleted_key() -> str:
    """Raised each time a prune deletes job rows: every API process's /metrics then recounts the
    jobs that ended long ago instead of keeping its running total (``api.metrics``)."""
    return "andon:rows-deleted"
