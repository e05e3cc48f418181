"""The in-process cancellation token a running job checks before every stage.

A token lives in one process and is cheap to check (an ``Event`` lookup, no network). The durable
truth lives in Redis (:mod:`.store`) and in the job row; a :class:`~.watcher.TokenWatcher` copies it
into the local token, so the API cancelling in one process stops a job running in another.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from db.vocabulary import CancellationReason, CancellationSource
from tasks.cancellation.errors import CancellationError

__all__ = ["CancelRequest", "CancellationToken"]


@dataclass(frozen=True)
class CancelRequest:
    """One request to cancel a job. The first one a token sees wins; later ones are only recorded."""

    reason: CancellationReason
    message: str | None = None
    source: CancellationSource | None = None
    at: datetime = field(default_factory=lambda: datetime.now(UTC))
    #: who asked (a user, a worker's hostname): carried in the token so that whoever records the
    #: winning request first — the request itself or the worker that observed it — can name its actor
    actor: str | None = None

    def to_json(self, job_id: str) -> dict[str, Any]:
        data = {
            "job_id": job_id,
            "reason": self.reason.value,
            "message": self.message,
            "source": self.source.value if self.source else None,
            "at": self.at.isoformat(),
        }
        if self.actor is not None:
            data["actor"] = self.actor
        return data

    def same_as(self, other: CancelRequest | None) -> bool:
        """The same request, compared by what a job row keeps of it (reason, message, source)."""
        return other is not None and (self.reason, self.message, self.source) == (
            other.reason, other.message, other.source)

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> CancelRequest:
        return cls(
            reason=CancellationReason(data["reason"]),
            message=data.get("message"),
            source=CancellationSource(data["source"]) if data.get("source") else None,
            at=datetime.fromisoformat(data["at"]),
            actor=data.get("actor"),
        )


Callback = Callable[["CancellationToken"], Any]


class CancellationToken:
    """Says whether a job has been asked to stop, why, and by whom.

    ``cancel()`` may be called from any thread; the first call wins and fixes the reason. Callbacks
    run exactly once, in the thread that cancels (or at once, if registered after the cancel); an
    exception from one is collected in ``callback_errors`` and never reaches the canceller.
    """

    def __init__(self, job_id: str) -> None:
        self.job_id = job_id
        self._event = threading.Event()
        self._lock = threading.Lock()
        self._first: CancelRequest | None = None
        self._callbacks: list[Callback] = []
        self.requests: list[CancelRequest] = []
        self.callback_errors: list[BaseException] = []

    def cancel(
        self,
        reason: CancellationReason | str = CancellationReason.USER_REQUESTED,
        message: str | None = None,
        source: CancellationSource | str | None = None,
        *,
        at: datetime | None = None,
    ) -> bool:
        """Request cancellation. Returns True if this request won (was the first)."""
        request = CancelRequest(
            reason=CancellationReason(reason),
            message=message,
            source=CancellationSource(source) if source else None,
            at=at or datetime.now(UTC),
        )
        return self.apply(request)

    def apply(self, request: CancelRequest) -> bool:
        with self._lock:
            self.requests.append(request)
            if self._first is not None:
                return False
            self._first = request
            callbacks, self._callbacks = self._callbacks, []
            self._event.set()
        for callback in callbacks:
            self._run_callback(callback)
        return True

    def register_callback(self, callback: Callback) -> None:
        """Run ``callback(token)`` once on cancel — at once if the token is already cancelled."""
        with self._lock:
            if self._first is None:
                self._callbacks.append(callback)
                return
        self._run_callback(callback)

    def _run_callback(self, callback: Callback) -> None:
        try:
            callback(self)
        except Exception as exc:  # a broken callback must not break cancellation
            self.callback_errors.append(exc)

    def check(self) -> None:
        """The checkpoint: raise :class:`CancellationError` if cancellation was requested."""
        if self._event.is_set():
            raise self.error()

    def error(self) -> CancellationError:
        first = self._first
        assert first is not None, "token is not cancelled"
        return CancellationError(self.job_id, first.reason, first.message, first.source, first.at)

    def wait(self, timeout: float | None = None) -> bool:
        """Sleep up to ``timeout`` seconds, returning early (True) the moment the job is cancelled."""
        return self._event.wait(timeout)

    @property
    def is_cancelled(self) -> bool:
        return self._event.is_set()

    @property
    def first_request(self) -> CancelRequest | None:
        return self._first

    @property
    def reason(self) -> CancellationReason | None:
        return self._first.reason if self._first else None

    @property
    def message(self) -> str | None:
        return self._first.message if self._first else None

    @property
    def source(self) -> CancellationSource | None:
        return self._first.source if self._first else None

    @property
    def cancelled_at(self) -> datetime | None:
        return self._first.at if self._first else None

    def __repr__(self) -> str:
        state = f"cancelled:{self.reason}" if self.is_cancelled else "active"
        return f"<CancellationToken {self.job_id} {state}>"
