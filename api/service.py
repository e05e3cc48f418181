"""The service layer both front doors call: submit, list, show, cancel, partial results.

Routes and CLI commands are a few lines each over these functions; nothing here knows about HTTP.
Errors are :mod:`tasks.errors` exceptions that each front door turns into a 4xx or a one-line message.
"""

from __future__ import annotations

import re
import uuid
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any, NoReturn

from celery import chain, chord
from sqlalchemy import and_, func, literal_column, or_, select
from sqlalchemy.orm import defer, selectinload
from sqlalchemy.sql.expression import UnaryExpression
from sqlalchemy.sql.operators import custom_op

from api import cursors, metrics
from api.schemas import (
    KEY_PATTERN,
    BulkCancelResponse,
    CancelResponse,
    ChainRequest,
    ChainResponse,
    ChordRequest,
    ChordResponse,
    FailedItem,
    InterruptedItem,
    JobView,
    PartialResultView,
    PipelineView,
    ResumeResponse,
    SubmitRequest,
    SubmitResponse,
)
from db import jobs as job_rows
from db import supersede
from db.models import Job, JobItem, JobTag, utcnow
from db.session import session_scope
from db.settings import MAX_PRUNE_AGE_S
from db.vocabulary import (
    TERMINAL_STATUSES,
    CancellationReason,
    CancellationSource,
    ItemStatus,
    JobStatus,
)
from tasks import control, lifecycle, notify, registry, resume
from tasks.control import cancel_children, request_cancel, settle_children
from tasks.errors import (
    AndonError,
    BrokerUnavailable,
    InvalidInput,
    InvalidParent,
    InvalidTag,
    JobNotFound,
    UnknownPipeline,
)
from tasks.intake import check_storable, check_submission, unstorable
from tasks.sending import enqueue, enqueue_many, job_signature
from tasks.tags import check_tags
from tasks.webhooks import check_callback_url


def _view(job: Job, usage: dict[str, Any] | None = None) -> JobView:
    return JobView.model_validate(job_rows.job_object(job, usage))


def check_job_id(job_id: str) -> None:
    """JobNotFound for an id no job can have (text the database can't even compare: a NUL byte makes
    PostgreSQL raise) — before it reaches a query."""
    if unstorable(job_id):
        raise JobNotFound(job_id)


#: What showing a job reads of its row: never its items as submitted (possibly a 100,000-element
#: JSON array) nor its options, unless a caller touches them (then they load, in the session).
_SHOWN = (defer(Job.inputs), defer(Job.options))


def _visible(session, job_id: str, tenant: str | None) -> Job:
    """The job, if it exists and ``tenant`` may see it; else JobNotFound (404, never 403: ids don't leak)."""
    check_job_id(job_id)
    job = session.get(Job, job_id, options=_SHOWN)
    if job is None or (tenant is not None and job.tenant != tenant):
        raise JobNotFound(job_id)
    return job


def check_visible(job_id: str, tenant: str | None) -> None:
    check_job_id(job_id)
    if tenant is not None:
        with session_scope() as session:
            _visible(session, job_id, tenant)


def submit_job(
    items: list[Any],
    options: dict[str, Any] | None = None,
    deadline_s: float | None = None,
    actor: str | None = None,
    queue: str | None = None,
    parent_job_id: str | None = None,
    tenant: str | None = None,
    tags: list[str] | None = None,
    pipeline: str = "documents",
    items_field: str = "items",
    supersede_key: str | None = None,
    callback_url: str | None = None,
) -> SubmitResponse:
    """Check the submission, make the job row, commit, *then* enqueue (the worker must find the row).

    With a parent, the job waits for it: enqueued when the parent completes, cancelled with
    ``dependency_failed`` (never run) if the parent fails or is cancelled. With a ``supersede_key``,
    every unfinished job of the tenant with that key is cancelled (see :func:`_supersede`).
    """
    job_id = str(uuid.uuid4())
    check_key(supersede_key, ["body", "supersede_key"])
    submission = check_submission(pipeline, items, options, items_field=items_field)
    options = submission.options
    queue = queue or submission.pipeline.queue
    tags = check_tags(tags or [])
    if callback_url is not None:
        check_callback_url(callback_url)
    with session_scope() as session:
        parent_status = None
        if parent_job_id is not None:
            try:
                parent = _visible(session, parent_job_id, tenant)
            except JobNotFound:
                raise InvalidParent(f"parent job {parent_job_id} not found") from None
            parent_status = JobStatus(parent.status)
        deferred = parent_status is not None and not parent_status.is_terminal
        superseded = supersede.claim(session, tenant, supersede_key, job_id) if supersede_key else []
        job_rows.create_jobs(session, [{
            "id": job_id, "inputs": submission.items, "options": options, "pipeline": submission.pipeline.name,
            "queue": queue, "deadline_s": deadline_s, "parent_job_id": parent_job_id, "deferred": deferred,
            "tenant": tenant, "tags": tags, "supersede_key": supersede_key, "callback_url": callback_url}], actor=actor)
        sent_now = parent_status is None or parent_status is JobStatus.COMPLETED
        # its ``submitted`` event is announced with its message (one round trip), not by the commit hook
        announced = notify.claim(session.connection(), [job_id]) if sent_now else set()
    _supersede(superseded, job_id, actor)
    if not sent_now:
        if parent_status.is_terminal:  # the parent already failed or was cancelled: never run
            cancel_children(parent_job_id, f"parent job {parent_job_id} {parent_status.value}", actor)
            return SubmitResponse(job_id=job_id, status=JobStatus.CANCELLED)
        settle_children(parent_job_id)  # the parent may have ended while we were writing the row
        return SubmitResponse(job_id=job_id, status=JobStatus.PENDING)
    try:
        enqueue(job_id, options, queue, announce=bool(announced))
    except Exception as exc:
        _fail_unsent(job_id, exc)
    return SubmitResponse(job_id=job_id, status=JobStatus.PENDING)


def _fail_unsent(job_id: str, exc: Exception) -> NoReturn:
    """The row exists but the job can't be queued: end it ``failed`` (never ``pending`` forever)."""
    why = " ".join(str(exc).split()) or type(exc).__name__  # one line, whatever the broker client said
    lifecycle.end_failed(job_id, f"could not enqueue: {why}")
    raise BrokerUnavailable(f"could not enqueue job {job_id}: {why}") from exc


def check_key(key: str | None, loc: list[str | int]) -> None:
    """InvalidInput (422) naming ``loc`` unless ``key`` is None or a key by :data:`KEY_PATTERN`."""
    if key is not None and (not isinstance(key, str) or not re.fullmatch(KEY_PATTERN, key)):
        raise InvalidInput([{"loc": loc, "type": "string_pattern_mismatch",
                             "msg": "1-128 characters from A-Z a-z 0-9 . _ : / @ + = -"}])


def _supersede(job_ids: list[str], new_job_id: str, actor: str | None) -> None:
    """Cancel the jobs ``new_job_id`` supersedes: ``user_requested``, source ``superseded`` (which
    no resume policy acts on), with a message naming the new job."""
    for old_job_id in job_ids:
        try:
            request_cancel(old_job_id, CancellationReason.USER_REQUESTED, f"superseded by job {new_job_id}",
                           CancellationSource.SUPERSEDED, actor)
        except AndonError:
            pass  # it ended meanwhile


@dataclass(frozen=True)
class Step:
    """One job of a chain or a chord: what a submit body says, less a parent of its own."""

    items: list[Any]
    pipeline: str = "documents"
    options: dict[str, Any] | None = None
    deadline_s: float | None = None
    tags: list[str] | None = None
    #: Where the items came in (``items`` or ``documents``), for error locations.
    items_field: str = "items"

    @classmethod
    def of(cls, body: SubmitRequest, loc: list[str | int]) -> Step:
        """The step a submit body describes; InvalidInput for what a step can't have."""
        for name in ("parent_job_id", "supersede_key"):
            if getattr(body, name, None) is not None:
                raise InvalidInput([{"loc": [*loc, name], "type": "value_error",
                                     "msg": "not allowed in a chain or chord step (its parents are the steps before it)"}])
        items, field = body.inputs
        return cls(items, body.pipeline, body.options, body.deadline_s, body.tags, field)


@dataclass(frozen=True)
class _CheckedStep:
    step: Step
    submission: Any
    tags: list[str]

    @property
    def queue(self) -> str | None:
        return self.submission.pipeline.queue


def _check_step(step: Step, loc: list[str | int]) -> _CheckedStep:
    """Check one step like a submit; errors name ``loc`` (``["body", "jobs", 2]``) before the field."""
    try:
        submission = check_submission(step.pipeline, step.items, step.options, items_field=step.items_field)
        tags = check_tags(step.tags or [])
    except InvalidInput as exc:
        raise InvalidInput([{**error, "loc": [*loc, *list(error["loc"])[1:]]} for error in exc.errors]) from None
    except (UnknownPipeline, InvalidTag) as exc:
        field = "pipeline" if isinstance(exc, UnknownPipeline) else "tags"
        raise InvalidInput([{"loc": [*loc, field], "msg": str(exc), "type": "value_error"}]) from None
    return _CheckedStep(step, submission, tags)


def _create_step(session, job_id: str, checked: _CheckedStep, actor: str | None, tenant: str | None,
                 queue: str | None, **links: Any) -> None:
    sub = checked.submission
    job_rows.create_job(session, job_id, sub.items, sub.options, pipeline=sub.pipeline.name, actor=actor,
                        tenant=tenant, queue=queue or checked.queue, deadline_s=checked.step.deadline_s,
                        tags=checked.tags, **links)


#: The most jobs one batch submit may hold (DESIGN.md: batch submit).
MAX_BATCH = 10_000


def submit_batch(bodies: list[SubmitRequest], actor: str | None = None,
                 tenant: str | None = None) -> list[str]:
    """Submit many jobs at once; their ids, in order. All or nothing: every body is checked before
    anything is written, and the first one rejected is a 422 naming its index
    (``["body", "jobs", i, ...]``). Then the rows go in one transaction of multi-row INSERTs, and
    the messages through one producer — what makes thousands of jobs a second possible where
    :func:`submit_job` pays a commit and a broker connection per job.

    A job with ``parent_job_id`` waits for that parent exactly as with :func:`submit_job`. If the
    broker fails part-way, the jobs whose message wasn't sent end ``failed`` and BrokerUnavailable is
    raised (the ones already sent run).
    """
    if len(bodies) > MAX_BATCH:
        raise InvalidInput([{"loc": ["body", "jobs"], "msg": f"at most {MAX_BATCH} jobs", "type": "too_long"}])
    jobs: list[dict[str, Any]] = []
    for i, body in enumerate(bodies):
        if body.supersede_key is not None:  # submits with one key are serialized: single submits only
            raise InvalidInput([{"loc": ["body", "jobs", i, "supersede_key"], "type": "value_error",
                                 "msg": "supersede_key is not taken in a batch; submit that job on its own"}])
        items, field = body.inputs
        try:
            submission = check_submission(body.pipeline, items, body.options, items_field=field)
            tags = check_tags(body.tags)
            if body.callback_url is not None:
                check_callback_url(body.callback_url)
        except InvalidInput as exc:
            raise InvalidInput([{**e, "loc": ["body", "jobs", i, *list(e["loc"])[1:]]} for e in exc.errors]) from None
        except AndonError as exc:  # an unknown pipeline, a bad tag: name the job it came from
            raise InvalidInput([{"loc": ["body", "jobs", i], "msg": str(exc), "type": "value_error"}]) from None
        jobs.append({"id": str(uuid.uuid4()), "inputs": submission.items, "options": submission.options,
                     "pipeline": submission.pipeline.name, "queue": submission.pipeline.queue,
                     "deadline_s": body.deadline_s, "parent_job_id": body.parent_job_id, "tenant": tenant,
                     "tags": tags, "callback_url": body.callback_url})
    parents = {job["parent_job_id"] for job in jobs if job["parent_job_id"] is not None}
    with session_scope() as session:
        parent_status = _parent_statuses(session, parents, tenant)
        for i, job in enumerate(jobs):
            parent = job["parent_job_id"]
            if parent is not None and parent not in parent_status:
                raise InvalidInput([{"loc": ["body", "jobs", i, "parent_job_id"], "type": "value_error",
                                     "msg": f"parent job {parent} not found"}])
            job["deferred"] = parent is not None and not parent_status[parent].is_terminal
        job_rows.create_jobs(session, jobs, actor=actor)
        waiting, ready = [], []  # (a job dict compares by value: split once, never ``job in waiting``)
        for job in jobs:
            parent = job["parent_job_id"]
            (waiting if parent is not None and parent_status[parent] is not JobStatus.COMPLETED else ready).append(job)
        # the ready jobs' ``submitted`` events are announced with their messages, not by the commit hook
        announced = notify.claim(session.connection(), [job["id"] for job in ready])
    sent: list[str] = []
    try:
        enqueue_many([(job["id"], job["options"], job["queue"]) for job in ready], sent, announced)
    except Exception as exc:
        done = set(sent)
        unsent = [job["id"] for job in ready if job["id"] not in done]
        why = " ".join(str(exc).split()) or type(exc).__name__
        for job_id in unsent:
            lifecycle.end_failed(job_id, f"could not enqueue: {why}")
        raise BrokerUnavailable(f"could not enqueue {len(unsent)} of {len(jobs)} jobs: {why}") from exc
    for parent in dict.fromkeys(job["parent_job_id"] for job in waiting):
        if parent_status[parent].is_terminal:  # the parent already failed or was cancelled: never run
            cancel_children(parent, f"parent job {parent} {parent_status[parent].value}", actor)
        else:
            settle_children(parent)  # the parent may have ended while we were writing the rows
    return [job["id"] for job in jobs]


def _parent_statuses(session, job_ids: set[str], tenant: str | None) -> dict[str, JobStatus]:
    """The status of each of these jobs that exists and ``tenant`` may see."""
    found: dict[str, JobStatus] = {}
    ids = [job_id for job_id in job_ids if not unstorable(job_id)]
    for start in range(0, len(ids), 1000):
        query = select(Job.id, Job.status).where(Job.id.in_(ids[start:start + 1000]))
        if tenant is not None:
            query = query.where(Job.tenant == tenant)
        found.update((job_id, JobStatus(status)) for job_id, status in session.execute(query))
    return found


def submit_chain(item_sets: list[list[Any]], options: dict[str, Any] | None = None,
                 queue: str | None = None, actor: str | None = None, pipeline: str = "documents",
                 tenant: str | None = None) -> list[str]:
    """Run jobs of one pipeline one after another over ``item_sets`` (see :func:`submit_chain_steps`)."""
    return submit_chain_steps([Step(items, pipeline, options) for items in item_sets], actor=actor, tenant=tenant,
                              queue=queue)


def submit_chain_steps(steps: list[Step], actor: str | None = None, tenant: str | None = None,
                       queue: str | None = None) -> list[str]:
    """Run jobs one after another as a Celery chain: each step's row names the previous as parent.

    Celery sends a step only after the previous one succeeded; when a step fails or is cancelled,
    andon ends the later rows ``cancelled`` / ``dependency_failed`` and they show REVOKED or FAILURE
    in the result backend, never PENDING forever. Every step is checked before any row is written.
    """
    if not steps:
        raise InvalidInput([{"loc": ["body", "jobs"], "msg": "a chain needs at least one job", "type": "too_short"}])
    checked = [_check_step(step, ["body", "jobs", i]) for i, step in enumerate(steps)]
    job_ids = [str(uuid.uuid4()) for _ in checked]
    with session_scope() as session:
        for i, (job_id, step) in enumerate(zip(job_ids, checked)):
            _create_step(session, job_id, step, actor, tenant, queue, parent_job_id=job_ids[i - 1] if i else None)
    chain(job_signature(job_id, step.submission.options, queue or step.queue)
          for job_id, step in zip(job_ids, checked)).apply_async()
    return job_ids


def submit_chord(header_sets: list[list[Any]], body_items: list[Any], options: dict[str, Any] | None = None,
                 queue: str | None = None, actor: str | None = None, pipeline: str = "documents",
                 tenant: str | None = None) -> tuple[list[str], str]:
    """Header jobs of one pipeline, then a body job (see :func:`submit_chord_steps`)."""
    return submit_chord_steps([Step(items, pipeline, options) for items in header_sets],
                              Step(body_items, pipeline, options), actor=actor, tenant=tenant, queue=queue)


def submit_chord_steps(header: list[Step], body: Step, actor: str | None = None, tenant: str | None = None,
                       queue: str | None = None) -> tuple[list[str], str]:
    """Run header jobs in parallel, then a body job, as a Celery chord; returns (header ids, body id).

    The body's row waits for every header job (``job_parents``): if any of them fails or is
    cancelled, andon ends the body ``cancelled`` / ``dependency_failed`` at once, and Celery, once
    every header has returned, marks the body FAILURE (ChordError) instead of running it.
    """
    if not header:
        raise InvalidInput([{"loc": ["body", "header"], "msg": "a chord needs at least one header job",
                             "type": "too_short"}])
    headers = [_check_step(step, ["body", "header", i]) for i, step in enumerate(header)]
    last = _check_step(body, ["body", "body"])
    header_ids = [str(uuid.uuid4()) for _ in headers]
    body_id = str(uuid.uuid4())
    with session_scope() as session:
        for job_id, step in zip(header_ids, headers):
            _create_step(session, job_id, step, actor, tenant, queue)
        _create_step(session, body_id, last, actor, tenant, queue, waits_for=header_ids)
    chord(job_signature(job_id, step.submission.options, queue or step.queue)
          for job_id, step in zip(header_ids, headers))(
        job_signature(body_id, last.submission.options, queue or last.queue))
    return header_ids, body_id


def submit_chain_request(body: ChainRequest, actor: str | None = None, tenant: str | None = None) -> ChainResponse:
    """``POST /api/chains`` and ``andon chain``: each step a submit body."""
    steps = [Step.of(job, ["body", "jobs", i]) for i, job in enumerate(body.jobs)]
    return ChainResponse(job_ids=submit_chain_steps(steps, actor=actor, tenant=tenant))


def submit_chord_request(body: ChordRequest, actor: str | None = None, tenant: str | None = None) -> ChordResponse:
    """``POST /api/chords`` and ``andon chord``: header jobs and a body job, each a submit body."""
    header = [Step.of(job, ["body", "header", i]) for i, job in enumerate(body.header)]
    header_ids, body_id = submit_chord_steps(header, Step.of(body.body, ["body", "body"]), actor=actor, tenant=tenant)
    return ChordResponse(job_ids=[*header_ids, body_id], body_job_id=body_id)


def list_pipelines() -> list[PipelineView]:
    return [PipelineView(**pipeline.describe()) for pipeline in registry.pipelines()]


def list_jobs(status: JobStatus | None = None, limit: int = 50, tenant: str | None = None,
              tag: str | None = None, pipeline: str | None = None, reason: CancellationReason | None = None,
              resumed_from: str | None = None) -> list[JobView]:
    return page_jobs(JobFilter(status, tag, pipeline, reason, resumed_from), limit, tenant=tenant)[0]


@dataclass(frozen=True)
class JobFilter:
    """Which jobs a list (or a count) is about; every field given must match (AND)."""

    status: JobStatus | None = None
    tag: str | None = None
    pipeline: str | None = None
    reason: CancellationReason | None = None
    resumed_from: str | None = None
    #: Only jobs not yet terminal (what a bulk cancel would touch).
    unfinished: bool = False

    def where(self, query, tenant: str | None):
        """``query`` (over ``Job``) narrowed to these jobs; with a tag, joined to its ``job_tags`` row."""
        if self.tag is not None:
            check_tags([self.tag])
            query = query.join(JobTag, and_(JobTag.job_id == Job.id, JobTag.tag == self.tag))
        return self.where_row(query, tenant)

    def where_row(self, query, tenant: str | None):
        """``query`` narrowed by what the ``jobs`` row itself says (every field but the tag)."""
        for column, value in ((Job.status, self.status), (Job.pipeline, self.pipeline),
                              (Job.cancellation_reason, self.reason), (Job.resumed_from, self.resumed_from),
                              (Job.tenant, tenant)):
            if value is not None:
                query = query.where(column == str(value))
        if self.unfinished:
            query = query.where(Job.status.not_in([s.value for s in TERMINAL_STATUSES]))
        return query

    def narrows_row(self, tenant: str | None) -> bool:
        """Whether anything but the tag narrows the list (then a tag's list has two ways to walk)."""
        return self.unfinished or any(value is not None for value in (
            self.status, self.pipeline, self.reason, self.resumed_from, tenant))

    @property
    def order(self) -> tuple[Any, Any]:
        """The list's order, ``(created_at, id)`` newest first, as columns of the index that serves it:
        a tag's list reads the tag's own copy (``ix_job_tags_tag_created_id``), so a page is a range
        scan of that index; every other filter has an index on ``jobs`` (``ix_jobs_*_created_id``)."""
        return (JobTag.created_at, JobTag.job_id) if self.tag is not None else (Job.created_at, Job.id)


#: What a list reads: what showing a job reads, and the page's tags in one more query.
_LISTED = (*_SHOWN, selectinload(Job.tag_rows))
#: Index entries of a tag a tag-and-filter list walks first, before it looks for a cheaper side
#: (:func:`_tag_page`): a page of jobs dense among the tag's is found within them.
FIRST_WALK = 250
#: How many times the other side's entries a side may have for SQLite to merge the two (an
#: INTERSECT of both ranges, read in step: a tenth of a probe's cost an entry) rather than probe
#: each of the fewer side's entries.
MERGE_SPREAD = 4
#: The most index entries a side's count reads: enough to tell a small side from a big one, and
#: (index-only) a few milliseconds at most.
COUNT_CAP = 100_000


def page_jobs(which: JobFilter, limit: int = 50, cursor: str | None = None,
              tenant: str | None = None) -> tuple[list[JobView], str | None]:
    """One page of jobs, newest first, and the cursor of the next page (None on the last).

    Keyset pagination on ``(created_at, id)``: a page costs the same at row 1,000,000 as at row 0
    (each filter's index is in this order), and jobs submitted meanwhile don't shift the pages after
    them. ``cursor`` is opaque to clients."""
    after = cursors.decode(cursor, _job_key, _job_key_id) if cursor is not None else None
    with session_scope() as session:
        if which.tag is not None and which.narrows_row(tenant):
            rows = _tag_page(session, which, tenant, after, limit + 1)
        else:
            rows = _walk(session, which.where(select(Job).options(*_LISTED), tenant), which.order, after, limit + 1)
        views = [_view(job) for job in rows[:limit]]
    last = rows[limit - 1] if len(rows) > limit else None
    return views, (cursors.encode(last.created_at.isoformat(), last.id) if last is not None else None)


def _after(order: tuple[Any, Any], after: tuple[datetime, str] | None, query):
    """``query`` from just after the cursor's key on, in the list's order."""
    if after is None:
        return query
    created, key = order
    return query.where(or_(created < after[0], and_(created == after[0], key > after[1])))


def _walk(session, query, order: tuple[Any, Any], after: tuple[datetime, str] | None, count: int) -> list[Job]:
    created, key = order
    return list(session.scalars(_after(order, after, query).order_by(created.desc(), key).limit(count)))


def _tag_page(session, which: JobFilter, tenant: str | None, after: tuple[datetime, str] | None,
              count: int) -> list[Job]:
    """The first ``count`` jobs after ``after`` with a tag and what else ``which`` says.

    Two indexes can serve such a page: the tag's (``job_tags``, each entry then checked against its
    job) or the other filter's on ``jobs`` (each entry then checked for the tag). Either walk stops
    after ``count`` matches, so the cheap one is the side where matches are dense — which only the
    data knows (SQLite keeps no statistics; PostgreSQL's can't see how a tag and a status
    correlate). Both sides list the same jobs in the same order ``(created_at, id)`` (a tag's row
    carries its job's ``created_at``), so either gives the exact page. First the tag's next
    FIRST_WALK entries (the page, if its jobs are dense there: the common case); if not, matches
    are as sparse among the tag's entries as among the other side's in proportion to their counts,
    so the side with fewer entries left drives the rest — counted on their indexes alone, no
    further than the smaller side or the tag's expected walk (:func:`_sizes`); two sides of about
    one size are merged instead (read in step, a tenth of a probe's cost an entry). That rest reads
    index keys only (the ids of the page, then its rows by id): a probe of the other side is an
    index seek, never a table row. PostgreSQL plans that key-only query from its statistics of each
    side's size (a hash join of two such sides reads each once), so it is not counted there: the
    counts were half its work. Without an index on both at once, a page of two big sides that
    rarely meet still walks the smaller one."""
    tag = which.tag
    check_tags([tag])
    tag_order, row_order = (JobTag.created_at, JobTag.job_id), (Job.created_at, Job.id)
    by_tag = which.where(select(Job).options(*_LISTED), tenant)
    tag_entries = _after(tag_order, after, select(JobTag.created_at).where(JobTag.tag == tag))
    edge = session.scalar(tag_entries.order_by(JobTag.created_at.desc(), JobTag.job_id)
                          .offset(FIRST_WALK - 1).limit(1))
    rows = _walk(session, by_tag if edge is None else by_tag.where(JobTag.created_at >= edge), tag_order, after,
                 count)
    if edge is None or len(rows) == count:
        return rows
    # every match at or after ``edge`` is in ``rows``: the rest of the page is older than it
    # (each side's entries in its index's order: a count walks that index, never the table)
    tag_left = _after(tag_order, after, select(JobTag.created_at).where(JobTag.tag == tag, JobTag.created_at < edge)
                      ).order_by(JobTag.created_at.desc(), JobTag.job_id)
    row_left = _after(row_order, after, which.where_row(select(Job.created_at), tenant).where(Job.created_at < edge)
                      ).order_by(Job.created_at.desc(), Job.id)
    # the tag's walk would take about this many more entries at the density its first ones showed:
    # a few times FIRST_WALK is cheaper to walk than to count about; else no need to count further
    # than that to know whether the other side is cheaper
    expected = COUNT_CAP if not rows else min(COUNT_CAP, (count - len(rows)) * FIRST_WALK // len(rows) + 1)
    rows_n = tags_n = 0
    exact = False  # PostgreSQL plans the key-only query below from its own statistics: not counted
    if session.get_bind().dialect.name == "sqlite" and expected > 4 * FIRST_WALK:
        rows_n, tags_n, exact = _sizes(session, row_left, tag_left, expected)
    more = count - len(rows)
    if exact and max(rows_n, tags_n) <= MERGE_SPREAD * min(rows_n, tags_n):
        # both ranges in step, ordered as both indexes are: SQLite merges the two scans, to the page's end
        tags = _after(tag_order, after, select(JobTag.created_at, JobTag.job_id).where(
            JobTag.tag == tag, JobTag.created_at < edge))
        matches = tags.intersect(_after(row_order, after, which.where_row(
            select(Job.created_at, Job.id), tenant).where(Job.created_at < edge)))
        keys = select(matches.order_by(literal_column("created_at").desc(), literal_column("job_id"))
                      .limit(more).subquery().c.job_id)
    elif rows_n < tags_n:  # the filter's entries, each probed for the tag (job_tags' primary key)
        has_tag = select(JobTag.job_id).where(JobTag.job_id == Job.id, JobTag.tag == tag).exists()
        keys = _after(row_order, after, which.where_row(select(Job.id), tenant).where(
            has_tag, Job.created_at < edge)).order_by(Job.created_at.desc(), Job.id).limit(more)
    else:  # the tag's entries, each probed by its key in the filter's list index
        in_row = which.where_row(select(Job.id), tenant).where(
            _unindexed(session, Job.id) == JobTag.job_id, Job.created_at == JobTag.created_at).exists()
        keys = _after(tag_order, after, select(JobTag.job_id).where(
            JobTag.tag == tag, JobTag.created_at < edge, in_row)).order_by(
            JobTag.created_at.desc(), JobTag.job_id).limit(more)
    return rows + _walk(session, select(Job).options(*_LISTED).where(Job.id.in_(keys)), row_order, None, count)


def _unindexed(session, column):
    """``column``, compared without its own index on SQLite (``+column``, SQLite's way to say so).

    A probe of a job by its key (``created_at``, ``id``) is a seek in the filter's list index,
    which holds the key and the filter's columns; SQLite, seeing ``id =``, prefers the primary key's
    index, which then reads each job's table row (its JSON included) for the filter: four times the
    cost at a million rows. Other databases choose by their statistics."""
    if session.get_bind().dialect.name != "sqlite":
        return column
    return UnaryExpression(column, operator=custom_op("+"), type_=column.type)


def _sizes(session, these, those, limit: int) -> tuple[int, int, bool]:
    """How many rows the queries ``these`` and ``those`` select, and whether both counts are exact:
    both counted (one statement a round) up to a cap that grows eightfold until one of them stays
    under it — so the counts read a few times as many entries as the smaller side has — or the cap
    reaches ``limit``. A count that reached the cap means at least that many."""
    cap = min(FIRST_WALK, limit)
    while True:
        mine, theirs = session.execute(select(_count(these, cap), _count(those, cap))).one()
        if mine < cap or theirs < cap or cap >= limit:
            return mine, theirs, mine < cap and theirs < cap
        cap = min(cap * 8, limit)


def _count(entries, cap: int):
    """How many rows ``entries`` selects, counted up to ``cap`` (a scalar subquery)."""
    return select(func.count()).select_from(entries.limit(cap).subquery()).scalar_subquery()


def count_jobs(which: JobFilter, tenant: str | None = None) -> int:
    with session_scope() as session:
        return session.scalar(which.where(select(func.count()).select_from(Job), tenant)) or 0


def _job_key(created_at: Any) -> datetime:
    """The ``created_at`` of a list cursor (TypeError or ValueError if it isn't one)."""
    return datetime.fromisoformat(created_at)


def _job_key_id(job_id: Any) -> str:
    """The job id of a list cursor: text a query can take (PostgreSQL refuses a NUL byte)."""
    if not isinstance(job_id, str) or len(job_id) > 64 or unstorable(job_id):
        raise ValueError("not a job id")
    return job_id


def get_job(job_id: str, tenant: str | None = None) -> JobView:
    with session_scope() as session:
        return _view(_visible(session, job_id, tenant), job_rows.usage_totals(session, job_id))


def cancel_job(
    job_id: str,
    reason: CancellationReason = CancellationReason.USER_REQUESTED,
    message: str | None = None,
    source: CancellationSource = CancellationSource.API,
    actor: str | None = None,
    cascade: bool = True,
    tenant: str | None = None,
) -> CancelResponse:
    check_storable(message, ["body", "message"])
    check_visible(job_id, tenant)
    outcome = request_cancel(job_id, reason, message, source, actor, cascade=cascade)
    note = "Cancellation requested" if outcome.won else f"Cancellation already requested ({outcome.request.reason})"
    return CancelResponse(job_id=job_id, status=outcome.status, message=note)


def cancel_matching(
    status: JobStatus | None = None,
    parent_job_id: str | None = None,
    tag: str | None = None,
    reason: CancellationReason = CancellationReason.USER_REQUESTED,
    message: str | None = None,
    source: CancellationSource = CancellationSource.API,
    actor: str | None = None,
    tenant: str | None = None,
) -> BulkCancelResponse:
    check_storable(message, ["body", "message"])
    check_storable(parent_job_id, ["body", "parent_job_id"])
    if tag is not None:
        check_tags([tag])
    outcome = control.cancel_matching(status, parent_job_id, tag, reason, message, source, actor, tenant=tenant)
    return BulkCancelResponse(matched=outcome.matched, cancelled=outcome.cancelled, cancelling=outcome.cancelling)


def resume_job(job_id: str, force: bool = False, actor: str | None = None,
               tenant: str | None = None) -> ResumeResponse:
    check_visible(job_id, tenant)
    new_id = resume.resume_job(job_id, force=force, actor=actor)
    return ResumeResponse(job_id=new_id, resumed_from=job_id, status=JobStatus.PENDING)


#: Items per page of partial results, by default and at most: a page is one index range scan
#: (``uq_job_items_job_index``) and its answer stays small (≈ 20 KiB of the built-in pipeline's
#: results by default), however many items the job has.
RESULTS_PAGE = 100
MAX_RESULTS_PAGE = 1000


def partial_results(job_id: str, tenant: str | None = None) -> PartialResultView:
    """The first page of a job's partial results (all of them for a job of up to RESULTS_PAGE items)."""
    return page_partial_results(job_id, tenant=tenant)[0]


def page_partial_results(job_id: str, limit: int = RESULTS_PAGE, cursor: str | None = None,
                         tenant: str | None = None) -> tuple[PartialResultView, str | None]:
    """One page of what a job finished, in item order, whatever way it stopped, and what was in
    flight; and the cursor of the next page (None on the last).

    The page holds the items ``limit`` at a time after ``cursor`` (keyset on ``(job_id, index)``:
    one range scan of ``uq_job_items_job_index``); the summary (status, counts,
    ``completion_percent``, ``cancelled_at_item``) is the whole job's on every page, from its row:
    ``completed_items`` is bumped in the transaction that writes each done item (``db.jobs.record_item``,
    ``copy_done_items`` on resume), so it is the count of its done items without reading 100,000 of them.
    """
    after = cursors.decode(cursor, _item_key)[0] if cursor is not None else -1
    with session_scope() as session:
        job = _visible(session, job_id, tenant)
        items = session.scalars(select(JobItem).where(JobItem.job_id == job_id, JobItem.index > after)
                                .order_by(JobItem.index).limit(limit + 1)).all()
    page = items[:limit]
    done_count = job.completed_items
    done = [item for item in page if item.status == ItemStatus.DONE]
    failed = [item for item in page if item.status == ItemStatus.FAILED]
    interrupted = [item for item in page if item.status == ItemStatus.INTERRUPTED]
    if job.status == JobStatus.COMPLETED:
        status = "complete"
    else:
        status = "partial" if done_count else "empty"
    total = job.total_items
    view = PartialResultView(
        job_id=job_id,
        pipeline=job.pipeline,
        status=status,
        job_status=JobStatus(job.status),
        completion_percent=round(100.0 * done_count / total, 1) if total else 0.0,
        total_items=total,
        completed_items=done_count,
        results=[_result_entry(job.pipeline, item) for item in done],
        failed_items=[FailedItem(index=item.index, stage=item.stage, error=item.error, partial=item.result,
                                 retries=item.retries or 0)
                      for item in failed],
        interrupted_items=[InterruptedItem(index=item.index, stage=item.stage, partial=item.result,
                                           retries=item.retries or 0)
                           for item in interrupted],
        cancelled_at_item=job.cancelled_at_item,
    )
    return view, (cursors.encode(page[-1].index) if len(items) > limit else None)


def _item_key(index: Any) -> int:
    """The item index of a partial-results cursor (an ``Integer`` column's range)."""
    if type(index) is not int or not -1 <= index < 2**31:
        raise ValueError("not an item index")
    return index


def _result_entry(pipeline: str, item: JobItem) -> dict[str, Any]:
    """``{"index", "result"}``; the built-in ``documents`` pipeline keeps its fields flat beside
    ``index``, as it always has."""
    entry = ({"index": item.index, **item.result} if pipeline == "documents" and isinstance(item.result, dict)
             else {"index": item.index, "result": item.result})
    if item.retries:
        entry["retries"] = item.retries
    return entry


#: Jobs deleted per transaction by :func:`prune_jobs`: each transaction holds SQLite's write lock
#: (or PostgreSQL's row locks) only that long, so running jobs' item writes go on in between.
PRUNE_BATCH = 1000


def prune_jobs(older_than_s: float, batch: int = PRUNE_BATCH, url: str | None = None) -> int:
    """Delete jobs that ended more than ``older_than_s`` seconds ago, with their items, events, tags
    and parent links, ``batch`` jobs per transaction; returns how many were deleted. Jobs not yet
    terminal are never touched, however old. Across every tenant: only an operator may call it.
    ``url``: another database than the configured one."""
    if not (0 <= older_than_s <= MAX_PRUNE_AGE_S):  # NaN too
        raise InvalidInput([{"loc": ["body", "older_than_s"], "type": "value_error",
                             "msg": f"must be a number of seconds from 0 to {MAX_PRUNE_AGE_S:g}"}])
    before = utcnow() - timedelta(seconds=older_than_s)
    deleted = 0
    while True:
        with session_scope(url) as session:
            ids = job_rows.prunable(session, before, batch)
            deleted += job_rows.delete_jobs(session, ids)
        if len(ids) < batch:
            break
    if deleted:
        metrics.rows_deleted()
    return deleted
