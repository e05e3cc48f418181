"""Request and response shapes, as DESIGN.md states them."""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, StringConstraints, model_validator

from db.vocabulary import CancellationReason, JobStatus
from tasks.tags import MAX_TAGS, TAG_PATTERN

#: 30 days: longer than any job should be allowed to wait, and well inside what timers accept.
MAX_SECONDS = 30 * 24 * 3600.0

Tag = Annotated[str, StringConstraints(pattern=TAG_PATTERN)]


class JobOptions(BaseModel):
    model_config = ConfigDict(extra="allow")

    stage_delay_s: float = Field(default=0.0, ge=0, le=3600)
    #: Simulated work per stage that ignores the token (like a C call): only a signal stops it.
    stage_block_s: float = Field(default=0.0, ge=0, le=3600)
    #: Simulated work per stage spinning in a Python loop that never checks the token.
    stage_spin_s: float = Field(default=0.0, ge=0, le=3600)
    #: The escalation ladder for this job (see ANDON_ESCALATE_AFTER_S / ANDON_KILL_AFTER_S).
    escalate_after_s: float | None = Field(default=None, gt=0, le=MAX_SECONDS)
    kill_after_s: float | None = Field(default=None, gt=0, le=MAX_SECONDS)
    analyzer: Literal["local", "llm"] = "local"
    #: Celery time limits for this job (soft → a `timeout` cancel at a checkpoint; hard → child killed).
    soft_time_limit_s: float | None = Field(default=None, gt=0, le=MAX_SECONDS)
    time_limit_s: float | None = Field(default=None, gt=0, le=MAX_SECONDS)
    #: RSS ceiling for this job's worker process, in MiB (overrides ANDON_MAX_JOB_RSS_MB).
    max_rss_mb: float | None = Field(default=None, gt=0, le=1024 * 1024)

    @model_validator(mode="after")
    def soft_before_hard(self) -> JobOptions:
        if self.soft_time_limit_s and self.time_limit_s and self.soft_time_limit_s >= self.time_limit_s:
            raise ValueError("soft_time_limit_s must be below time_limit_s")
        return self


class SubmitRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    documents: list[str] = Field(min_length=1, max_length=100_000)
    options: JobOptions = Field(default_factory=JobOptions)
    deadline_s: float | None = Field(default=None, gt=0, le=MAX_SECONDS)
    #: Run after this job completes; cancelled (dependency_failed) if it fails or is cancelled.
    parent_job_id: str | None = Field(default=None, min_length=1, max_length=64)
    #: Labels to find and bulk-cancel the job by (``batch-7``, ``customer:acme``).
    tags: list[Tag] = Field(default_factory=list, max_length=MAX_TAGS)


class SubmitResponse(BaseModel):
    job_id: str
    status: JobStatus


class CancelRequestBody(BaseModel):
    model_config = ConfigDict(extra="forbid")

    reason: CancellationReason = CancellationReason.USER_REQUESTED
    message: str | None = Field(default=None, max_length=2000)
    #: Also cancel the job's unfinished child jobs (dependency_failed).
    cascade: bool = True


class ResumeResponse(BaseModel):
    job_id: str
    resumed_from: str
    status: JobStatus


class BulkCancelRequest(BaseModel):
    """Which jobs to cancel: at least one filter, combined with AND."""

    model_config = ConfigDict(extra="forbid")

    status: Literal["pending", "running", "cancelling"] | None = None
    parent_job_id: str | None = None
    tag: Tag | None = None
    reason: CancellationReason = CancellationReason.USER_REQUESTED
    message: str | None = Field(default=None, max_length=2000)

    @model_validator(mode="after")
    def needs_a_filter(self) -> BulkCancelRequest:
        if self.status is None and self.parent_job_id is None and self.tag is None:
            raise ValueError("give at least one filter: status, parent_job_id or tag")
        return self


class BulkCancelResponse(BaseModel):
    matched: int
    cancelled: int
    cancelling: int


class CancelResponse(BaseModel):
    job_id: str
    status: JobStatus
    message: str


class CancelLatency(BaseModel):
    """Milliseconds between the three moments of a cancel."""

    request_to_observe_ms: float | None
    observe_to_stop_ms: float | None


class JobView(BaseModel):
    job_id: str
    status: JobStatus
    cancelled: bool
    cancellation_reason: CancellationReason | None
    cancellation_message: str | None
    cancellation_source: str | None
    total_items: int
    completed_items: int
    failed_items: int
    resumable: bool
    error: str | None
    created_at: datetime
    started_at: datetime | None
    cancel_requested_at: datetime | None
    cancel_observed_at: datetime | None
    finished_at: datetime | None
    cancel_latency: CancelLatency | None
    resumed_from: str | None
    parent_job_id: str | None
    tags: list[str]


class FailedItem(BaseModel):
    index: int
    stage: str
    error: str | None
    #: What the item had produced when it stopped (an LLM answer cut short by a cancel), if anything.
    partial: dict[str, Any] | None = None


class PartialResultView(BaseModel):
    job_id: str
    status: Literal["complete", "partial", "empty"]
    job_status: JobStatus
    completion_percent: float
    total_items: int
    completed_items: int
    results: list[dict[str, Any]]
    failed_items: list[FailedItem]
    cancelled_at_item: int | None


class ErrorResponse(BaseModel):
    detail: str
