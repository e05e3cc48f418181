"""Every exception andon raises on purpose, in one place (the cancellations themselves live with the
cancellation core and are re-exported here)."""

from __future__ import annotations

from typing import Any

from tasks.cancellation.errors import CancellationError, ForcedCancellation

__all__ = [
    "AndonError", "BrokerUnavailable", "CancellationError", "EmbeddingError", "LLMError", "ForcedCancellation",
    "IdempotencyConflict", "InvalidInput", "InvalidJobId",
    "InvalidParent", "InvalidTag", "JobAlreadyTerminal", "JobNotFound", "NotResumable", "PipelineError",
    "UnknownPipeline",
]


class AndonError(Exception):
    """Base class: a problem andon can explain in one line to a user."""


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


class IdempotencyConflict(AndonError):
    """An Idempotency-Key already used for a different request, or whose first request is still
    running after the wait (HTTP 409)."""


class InvalidParent(AndonError):
    """``parent_job_id`` names no job the caller can see."""


class InvalidTag(AndonError):
    """A tag that breaks the rule in :mod:`tasks.tags`, or too many of them."""


class NotResumable(AndonError):
    """The job can't be resumed (still running, completed, or stopped for a reason we don't resume)."""


class PipelineError(AndonError):
    """A pipeline definition or an ``ANDON_PIPELINES`` module is wrong: found at start, not at the first job."""


class UnknownPipeline(AndonError):
    """No pipeline of that name is registered here; the message names the known ones."""

    def __init__(self, name: str, known: list[str]) -> None:
        self.name = name
        self.known = known
        super().__init__(f"unknown pipeline {name!r} (known: {', '.join(known) or 'none'})")


class InvalidInput(AndonError):
    """Submitted items or options that a pipeline's models reject. ``errors`` are pydantic-style
    ``{"loc", "msg", "type"}`` entries naming the field (and the item's index)."""

    def __init__(self, errors: list[dict[str, Any]]) -> None:
        self.errors = errors
        first = errors[0] if errors else {"loc": (), "msg": "invalid input"}
        super().__init__(f"{'.'.join(str(p) for p in first['loc'])}: {first['msg']}")


class InvalidJobId(AndonError):
    """A job id from outside the API (a broker message, Flower, ``send_task``) that is not one andon accepts."""


class LLMError(AndonError):
    """An LLM endpoint failed (unreachable, HTTP error status, timeout): this item fails, the job goes on."""


class EmbeddingError(AndonError):
    """The embeddings endpoint failed, or answered something other than one vector per input."""
