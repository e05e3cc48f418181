"""The exceptions a cancel raises. Both are ``BaseException``s, like Trio's ``Cancelled`` and
dramatiq's ``Interrupt``: the ``except Exception:`` a stage wraps around its own work can't swallow a
cancel, and neither can a library's."""

from __future__ import annotations

from datetime import datetime

from db.vocabulary import CancellationReason, CancellationSource

__all__ = ["CancellationError", "ForcedCancellation", "cancellation_in"]


class CancellationError(BaseException):
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
    """Raised *into* a stage's thread by the escalation ladder when it ignored its token.

    Python instantiates it with no arguments; whoever catches it takes the reason from the token. It
    lands only when the thread runs Python again: it can't interrupt a blocking system or C call.
    """

    def __init__(self, *args: object) -> None:
        if args:
            super().__init__(*args)
        else:
            BaseException.__init__(self, "cancellation forced into a job that ignored its token")
            self.job_id, self.reason, self.message, self.source, self.cancelled_at = "", None, None, None, None


def cancellation_in(exc: BaseException) -> CancellationError | None:
    """The cancellation inside ``exc``: itself, or one wrapped in a (Base)ExceptionGroup — a
    ``TaskGroup`` on Python 3.11 wraps whatever its tasks raise."""
    if isinstance(exc, CancellationError):
        return exc
    if isinstance(exc, BaseExceptionGroup):
        for inner in exc.exceptions:
            found = cancellation_in(inner)
            if found is not None:
                return found
    return None
