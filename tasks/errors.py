"""Every exception andon raises on purpose, in one place."""

from __future__ import annotations

from datetime import datetime

from db.vocabulary import CancellationReason, CancellationSource


class AndonError(Exception):
    """Base class: a problem andon can explain in one line to a user."""


class CancellationError(AndonError):
    """Raised at a checkpoint once a job's token is cancelled.

    It carries the winning cancel (first one wins), so whoever catches it can record why the job
    stopped without asking Redis again.
    """

    def __init__(
        self,
        job_id: str,
        reason: CancellationReason,
        message: str | None = None,
        source: CancellationSource | None = None,
        cancelled_at: datetime | None = None,
    ) -> None:
        self.job_id = job_id
        self.reason = CancellationReason(reason)
        self.message = message
        self.source = CancellationSource(source) if source else None
        self.cancelled_at = cancelled_at
        text = f"job {job_id} cancelled: {self.reason.value}"
        super().__init__(f"{text} - {message}" if message else text)

    def __reduce__(self):  # survive pickling between pool processes
        return (type(self), (self.job_id, self.reason, self.message, self.source, self.cancelled_at))


class ForcedCancellation(CancellationError):
    """Raised *into* a job's thread by the escalation ladder when it ignored its token.

    Python instantiates it with no arguments; whoever catches it takes the reason from the token.
    """

    def __init__(self, *args: object) -> None:
        if args:
            super().__init__(*args)
        else:
            Exception.__init__(self, "cancellation forced into a job that ignored its token")
            self.job_id, self.reason, self.message, self.source, self.cancelled_at = "", None, None, None, None


class JobNotFound(AndonError):
    def __init__(self, job_id: str) -> None:
        self.job_id = job_id
        super().__init__(f"job {job_id} not found")


class JobAlreadyTerminal(AndonError):
    def __init__(self, job_id: str, status: str) -> None:
        self.job_id = job_id
        self.status = status
        super().__init__(f"job {job_id} is already {status}")


class BrokerUnavailable(AndonError):
    """A job row was made but its message could not be queued (broker or Redis away)."""


class InvalidParent(AndonError):
    """``parent_job_id`` names no job the caller can see."""


class InvalidTag(AndonError):
    """A tag that breaks the rule in :mod:`tasks.tags`, or too many of them."""


class NotResumable(AndonError):
    """The job can't be resumed (still running, completed, or stopped for a reason we don't resume)."""
