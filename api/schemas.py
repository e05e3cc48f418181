"""Request and response shapes, as DESIGN.md states them."""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, StringConstraints, model_validator

from db.vocabulary import CancellationReason, JobStatus
from tasks.intake import MAX_ITEMS, MAX_SECONDS
from tasks.tags import MAX_TAGS, TAG_PATTERN

Tag = Annotated[str, StringConstraints(pattern=TAG_PATTERN)]

#: What a supersede key or an Idempotency-Key may be: 1-128 printable ASCII characters from a safe set
#: (a UUID, a ULID, ``conversation:42``, ``user@example.com/thread-7``).
KEY_PATTERN = r"^[A-Za-z0-9._:/@+=-]{1,128}$"
#: The most steps one chain, or one chord's header, may have.
MAX_STEPS = 1000


class SubmitRequest(BaseModel):
    """A job: a pipeline (default ``documents``) over ``items`` (for ``documents``, ``documents`` is an
    alias of ``items``; give one of them). ``options``: andon's own (time limits, memory limit,
    escalation timers, each at most the operator's ceiling) and the pipeline's own (its
    ``options_model``; for ``documents``: ``stage_delay_s``, ``analyzer``, ``embedder``)."""

    model_config = ConfigDict(extra="forbid")

    pipeline: str = Field(default="documents", min_length=1, max_length=64)
    items: list[Any] | None = Field(default=None, min_length=1, max_length=MAX_ITEMS)
    documents: list[str] | None = Field(default=None, min_length=1, max_length=MAX_ITEMS)
    options: dict[str, Any] = Field(default_factory=dict, examples=[{"stage_delay_s": 0.1, "time_limit_s": 600}])
    deadline_s: float | None = Field(default=None, gt=0, le=MAX_SECONDS)
    #: Run after this job completes; cancelled (dependency_failed) if it fails or is cancelled.
    parent_job_id: str | None = Field(default=None, min_length=1, max_length=64)
    #: Labels to find and bulk-cancel the job by (``batch-7``, ``customer:acme``).
    tags: list[Tag] = Field(default_factory=list, max_length=MAX_TAGS)
    #: Cancel every unfinished job of the caller's tenant submitted with this key (source
    #: ``superseded``); submits with one key are serialized and the newest wins.
    supersede_key: str | None = Field(default=None, pattern=KEY_PATTERN, examples=["conversation:42"])
    #: Where andon POSTs the job object, signed, when the job ends (only hosts in ANDON_WEBHOOK_HOSTS).
    callback_url: str | None = Field(default=None, min_length=1, max_length=2048)

    @model_validator(mode="after")
    def items_or_documents(self) -> SubmitRequest:
        if self.items is not None and self.documents is not None:
            raise ValueError("give `items` or `documents`, not both")
        if self.items is None and self.documents is None:
            raise ValueError("give `items` (or, for the documents pipeline, `documents`)")
        if self.documents is not None and self.pipeline != "documents":
            raise ValueError("`documents` is only for the documents pipeline: use `items`")
        return self

    @property
    def inputs(self) -> tuple[list[Any], str]:
        """The items, and the field they came in (for error locations)."""
        return (self.items, "items") if self.items is not None else (self.documents or [], "documents")


class BatchSubmitRequest(BaseModel):
    """Many jobs at once, each body as ``POST /api/jobs`` takes it. All or nothing: one rejected body
    (422 naming its index) and no job is made."""

    model_config = ConfigDict(extra="forbid")

    jobs: list[SubmitRequest] = Field(min_length=1, max_length=10_000)


class BatchSubmitResponse(BaseModel):
    #: One per submitted body, in the same order.
    job_ids: list[str]


class PruneRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    #: Delete jobs that ended more than this many seconds ago (unfinished jobs are never deleted).
    older_than_s: float = Field(ge=0, le=100 * 365 * 86400.0, examples=[30 * 86400])


class PruneResponse(BaseModel):
    deleted: int


class SubmitResponse(BaseModel):
    job_id: str
    status: JobStatus


class ChainRequest(BaseModel):
    """Jobs run one after another (a Celery chain): each starts when the one before completes; if one
    fails or is cancelled, the rest end ``dependency_failed`` without running. Each step is a submit
    body; steps don't pass results to each other. ``parent_job_id`` and ``supersede_key`` are not
    for steps."""

    model_config = ConfigDict(extra="forbid")

    jobs: list[SubmitRequest] = Field(min_length=1, max_length=MAX_STEPS)


class ChordRequest(BaseModel):
    """Header jobs run in parallel, then the body job (a Celery chord); if a header job fails or is
    cancelled, the body ends ``dependency_failed`` without running. Each is a submit body."""

    model_config = ConfigDict(extra="forbid")

    header: list[SubmitRequest] = Field(min_length=1, max_length=MAX_STEPS)
    body: SubmitRequest


class ChainResponse(BaseModel):
    job_ids: list[str]


class ChordResponse(BaseModel):
    #: The header jobs, then the body job.
    job_ids: list[str]
    body_job_id: str


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


class JobCount(BaseModel):
    count: int


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


class JobUsage(BaseModel):
    """LLM tokens over the job's items that reported usage (``estimated``: some were counted from the
    stream because the server sent none, as happens when a cancel hangs up)."""

    prompt_tokens: int
    completion_tokens: int
    items: int
    cut_short_items: int
    estimated: bool


class JobView(BaseModel):
    job_id: str
    pipeline: str
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
    #: The job that resumed this one (by hand or by its per-reason policy).
    resumed_by: str | None = None
    parent_job_id: str | None
    tags: list[str]
    #: The job's LLM usage totals (on ``GET /api/jobs/{id}``), None when no item reported any.
    usage: JobUsage | None = None


class FailedItem(BaseModel):
    index: int
    stage: str
    error: str | None
    #: What the item had produced when it stopped, if anything.
    partial: Any = None
    #: How many times a stage of the item was tried again.
    retries: int = 0


class InterruptedItem(BaseModel):
    """An item in flight when the job was cancelled: not done, not failed; resume runs it again."""

    index: int
    stage: str
    #: What it had produced when it was cut (an LLM answer so far), if anything.
    partial: Any = None
    retries: int = 0


class PipelineView(BaseModel):
    name: str
    stages: list[str]
    concurrency: int
    description: str | None
    queue: str | None


class PartialResultView(BaseModel):
    job_id: str
    pipeline: str
    status: Literal["complete", "partial", "empty"]
    job_status: JobStatus
    completion_percent: float
    total_items: int
    completed_items: int
    results: list[dict[str, Any]]
    failed_items: list[FailedItem]
    interrupted_items: list[InterruptedItem]
    #: The lowest index not done when the job stopped.
    cancelled_at_item: int | None


class ErrorResponse(BaseModel):
    detail: str
