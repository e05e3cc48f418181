"""Control operations on jobs — plain functions every front door calls (API, CLI, revoke, timers).

Like rq's ``send_stop_job_command``: one function to request a cancel, whoever asks.
"""

from __future__ import annotations

import logging
from collections import deque
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass

from redis.exceptions import RedisError
from sqlalchemy import Connection, Row, Select, bindparam, select, update

from db import jobs as job_rows
from db.models import Job
from db.session import get_engine, read_only_connection, retry_transient, session_scope
from db.settings import get_settings
from db.vocabulary import TERMINAL_STATUSES, CancellationReason, CancellationSource, EventKind, JobStatus
from tasks import lifecycle
from tasks.after_stop import act_after_cancel
from tasks.cancellation import CancelRequest
from tasks.cancellation.keys import lost_key, lost_run_key
from tasks.errors import AndonError, InvalidJobId, JobAlreadyTerminal, JobNotFound
from tasks.paths import job_scratch_dir, remove_tree
from tasks.policy import FINAL, NEVER_AUTOMATIC, RESUMABLE, policy_for
from tasks.process import get_store
from tasks.sending import enqueue

__all__ = [
    "MAX_LOSSES", "BulkCancelOutcome", "CancelOutcome", "cancel_children", "cancel_matching", "finalize_stopped", "matching",
    "recover_lost_run", "request_cancel", "settle_children",
]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class CancelOutcome:
    job_id: str
    status: JobStatus  # cancelled (was queued, or already stopped by this cancel) or cancelling (running)
    won: bool  # False: an earlier cancel had already fixed the reason
    request: CancelRequest  # the winning request
    ended: bool = False  # this call ended the job (it was queued): its policy and children are ours to act on


def request_cancel(
    job_id: str,
    reason: CancellationReason | str = CancellationReason.USER_REQUESTED,
    message: str | None = None,
    source: CancellationSource | str = CancellationSource.API,
    actor: str | None = None,
    cascade: bool = True,
) -> CancelOutcome:
    """Ask a job to stop. Sets its token in Redis (first cancel wins) and records the request.

    A queued job is marked ``cancelled`` at once (the worker will skip it); a running one becomes
    ``cancelling`` and stops at its next checkpoint. With ``cascade`` its unfinished child jobs are
    cancelled too (``dependency_failed``); without, they wait: they run if the job completes anyway,
    and are cancelled when it ends any other way. Raises JobNotFound / JobAlreadyTerminal.
    """
    reason, source = CancellationReason(reason), CancellationSource(source)
    requested = CancelRequest(reason, message, source, actor=actor)
    within = get_settings().db_retry_s
    # The token first: Redis decides which request wins (SET NX in one script) and the workers hear
    # the winner in the same round trip, so a cancel is observed without waiting on a database commit.
    # A running job (its heartbeat lives) needs no database read before that; any other is read first,
    # to refuse an unknown or finished job before anything is written, and to tell a queued one.
    # The row follows with the *winner's* request, whoever writes it; the job may observe the token and
    # commit `cancelled` before that (lifecycle.end_cancelled records the winner then, and this call
    # still answers success). Redis away: the row decides alone, as the durable copy workers reconcile.
    winner: CancelRequest | None = None
    first = False
    away: RedisError | None = None
    try:
        applied = get_store().apply_if_running(job_id, requested)
    except RedisError as exc:  # not tried again below: a failed call has spent redis-py's retries already
        applied, away = None, exc
    running = applied is not None  # its heartbeat lives: the row most likely says `running`
    if applied is None:
        seen = retry_transient(lambda: _check_open(job_id), within_s=within, what="cancel request")
        try:
            if away is None:
                applied = get_store().apply(job_id, requested, queued=seen is JobStatus.PENDING)
        except RedisError as exc:
            away = exc
        if away is not None:
            log.warning("cancel of %s recorded in the database only (Redis: %s)", job_id, away)
    if applied is not None:
        first, winner = applied
        winner = requested if first else winner

    def record() -> tuple[JobStatus, CancelRequest, bool]:
        candidate = winner or requested
        # a running job: the row, the winner's event (and this request's as a loser) in one write
        if running and lifecycle.mark_running_requested(job_id, candidate, [] if candidate is requested else [requested]):
            return JobStatus.CANCELLING, candidate, True
        with session_scope(writer=True) as session:
            status, held, moved = lifecycle.mark_requested(session, job_id, candidate)
            if moved:  # the first to write the row puts the winner on record, whoever it is
                lifecycle.add_request_event(session, job_id, candidate, status.value, won=True)
            elif status is JobStatus.CANCELLED:  # the job saw the token first; record it unless it did
                lifecycle.record_winner(session, job_id, candidate, JobStatus.CANCELLING.value)
            if not (candidate is requested and held.same_as(requested)):  # a loser: on record as one
                lifecycle.add_request_event(session, job_id, requested, status.value, won=False)
            # the job saw the token and ended before this write: this cancel took effect, as asked
            return JobStatus.CANCELLING if status is JobStatus.CANCELLED and not moved else status, held, moved

    # a database blip (a lock past the busy timeout, a restart) is waited out: the row and its events
    # are one transaction, retried whole; the token already stops the job meanwhile
    try:
        status, held, ended = retry_transient(record, within_s=within, what="cancel request")
    except (JobAlreadyTerminal, JobNotFound):
        if first:  # the job ended just before the token was set (its heartbeat outlived its row): unset it
            _withdraw_token(job_id, requested)
        raise
    won = (winner or requested) is requested and held.same_as(requested)
    if winner is not None and not held.same_as(winner):
        _correct_token(job_id, held)
    elif winner is None and won:
        try:  # Redis may be back already; if not, workers' reconcile reads the row
            get_store().apply(job_id, requested)
        except RedisError:
            pass
    if cascade:
        cancel_children(job_id, f"parent job {job_id} was cancelled", actor)
    elif status is JobStatus.CANCELLED:
        settle_children(job_id)
    if ended and status is JobStatus.CANCELLED:
        act_after_cancel(job_id)  # a queued job ended at once: its policy may resume it
    return CancelOutcome(job_id, status, won, held, ended=ended and status is JobStatus.CANCELLED)


def _withdraw_token(job_id: str, requested: CancelRequest) -> None:
    try:
        get_store().withdraw(job_id, requested)
    except RedisError:
        pass  # it expires with its TTL; nothing runs the job to see it


def _check_open(job_id: str) -> JobStatus:
    """Refuse before anything is written: an unknown job (404) or one already over (400). A read;
    returns the status seen."""
    with read_only_connection() as conn:
        status = conn.scalar(select(Job.status).where(Job.id == job_id))
    if status is None:
        raise JobNotFound(job_id)
    if JobStatus(status).is_terminal:
        raise JobAlreadyTerminal(job_id, status)
    return JobStatus(status)


def _correct_token(job_id: str, held: CancelRequest) -> None:
    """The row recorded an earlier winner (its request reached only the database): Redis follows."""
    try:
        get_store().correct(job_id, held)
    except RedisError as exc:
        log.warning("token of %s still holds a later request than its row (Redis: %s)", job_id, exc)


def finalize_stopped(
    job_id: str,
    reason: CancellationReason,
    source: CancellationSource,
    message: str | None = None,
    *,
    fail_with: str | None = None,
    actor: str | None = None,
) -> bool:
    """End a job whose process is gone (killed, timed out, lost), from outside that process.

    The job's own checkpoint can't record its end any more, so this does: ``cancelled`` with the
    reason of the first cancel request if there was one (first cancel wins), else the given reason;
    or ``failed`` when ``fail_with`` is given. Its temp dir is removed. Returns True if this call
    ended the job (a concurrent finalizer may have been first).
    """
    first = lifecycle.requested_cancels([job_id]).get(job_id)
    if first is None:
        try:
            first = get_store().read([job_id]).get(job_id)
        except RedisError:
            first = None
    with session_scope() as session:
        job = session.get(Job, job_id)
        if job is None or JobStatus(job.status).is_terminal:
            return False
        finished = job_rows.finished_indexes(session, job_id)
        at_item = next((i for i in range(job.total_items) if i not in finished), None)
        requested_at = job.cancel_requested_at
    # tidy before the terminal row is committed: whoever sees the job ended sees it cleaned up
    remove_tree(job_scratch_dir(job_id))
    won = False
    if fail_with is not None and first is None:
        # only a row still running: a cancel that came in since the read above (status cancelling)
        # wins over the loss, and the job ends cancelled with it
        won = lifecycle.end_failed(job_id, fail_with, only_from=JobStatus.RUNNING)
        if not won:
            first = lifecycle.requested_cancels([job_id]).get(job_id)
    if first is not None or fail_with is None:
        request = first or CancelRequest(reason, message, source)
        # the request it ends the job for goes on record with the end if nothing holds it yet (a
        # revoke whose record a database blip cut, kept by Celery and acted on at discard)
        won = lifecycle.end_cancelled(job_id, request, at_item=at_item, by="finalizer", actor=actor,
                                      requested_at=None if first else requested_at,
                                      observed_source=source, requested=request)
    if won:
        settle_children(job_id)
        act_after_cancel(job_id)
    return won


#: A job whose run is lost this many times is failed instead of requeued (a poison job).
MAX_LOSSES = 2


def recover_lost_run(job_id: str, actor: str | None, *, resend: bool) -> str:
    """The process running ``job_id`` is gone (its child killed, or the whole worker lost).

    If a cancel had been requested (the memory watchdog, a forced terminate...) the job ends
    ``cancelled`` with that reason. Otherwise it goes back to ``pending`` to run again from its first
    unfinished item (``resend``: with a new message, when the broker won't redeliver the old one
    soon) — once; lost a second time, it is ``failed``. Returns what happened.
    """
    try:
        requested = lifecycle.requested_cancels([job_id]) or get_store().read([job_id])
    except RedisError:
        requested = lifecycle.requested_cancels([job_id])
    if requested:
        finalize_stopped(job_id, CancellationReason.USER_REQUESTED, CancellationSource.WORKER_LOST,
                         "worker process lost after a cancel was requested", actor=actor)
        return "cancelled"
    redis = get_store().redis
    with session_scope() as session:
        fence = session.scalar(select(Job.fence).where(Job.id == job_id))
    # one recovery per lost run, however many noticed it (the child's main process, every reaper)
    claim = lost_run_key(job_id, fence)
    if not redis.set(claim, actor or "?", nx=True, ex=7 * 24 * 3600):
        return "ended"
    try:
        return _recover(job_id, actor, resend, redis)
    except Exception:
        # the database or the broker failed us midway: give the claim back, so the next reaper
        # pass (or delivery) recovers this run instead of finding it "already handled"
        redis.delete(claim)
        redis.decr(lost_key(job_id))
        raise


def _recover(job_id: str, actor: str | None, resend: bool, redis) -> str:
    losses = redis.incr(lost_key(job_id))
    redis.expire(lost_key(job_id), 7 * 24 * 3600)
    within = get_settings().db_retry_s
    if losses >= MAX_LOSSES:
        retry_transient(lambda: finalize_stopped(job_id, CancellationReason.USER_REQUESTED,
                                                 CancellationSource.WORKER_LOST,
                                                 fail_with=f"worker process lost {losses} times", actor=actor),
                        within_s=within, what="lost job's end")
        return "failed"
    if not retry_transient(lambda: lifecycle.requeue(job_id, CancellationSource.WORKER_LOST, actor,
                                                     {"losses": losses, "resent": resend}),
                           within_s=within, what="lost job's requeue"):
        return "ended"
    try:  # the dead run's scratch space: the next run makes its own
        remove_tree(job_scratch_dir(job_id))
    except InvalidJobId:
        pass
    if resend:
        with session_scope() as session:
            job = session.get(Job, job_id)
            options, queue = job.options, job.queue
        enqueue(job_id, options, queue)
    return "requeued"


#: Every job's end reads these two (:func:`settle_children`): built once, not per call — building the
#: children filter cost more than running it.
_STATUS_OF = select(Job.status).where(Job.id == bindparam("job_id"))
_UNFINISHED_CHILDREN = select(Job.id, Job.options, Job.queue).where(
    job_rows.children_of(bindparam("job_id")), Job.status.not_in([s.value for s in TERMINAL_STATUSES]))


def _unfinished_children(job_id: str) -> list[Row]:
    """The id, options and queue of each unfinished child: not whole rows (their inputs), which every
    job that ends would otherwise load for the children it usually doesn't have."""
    with read_only_connection() as conn:
        return list(conn.execute(_UNFINISHED_CHILDREN, {"job_id": job_id}))


def cancel_children(job_id: str, message: str, actor: str | None = None) -> None:
    """Cancel every unfinished child of a job with ``dependency_failed`` (and theirs, recursively)."""
    for child in _unfinished_children(job_id):
        try:
            request_cancel(child.id, CancellationReason.DEPENDENCY_FAILED, message, CancellationSource.PARENT,
                           actor=actor or f"parent:{job_id}")
        except AndonError:
            pass  # it ended meanwhile


def settle_children(job_id: str, ended: JobStatus | None = None) -> None:
    """Once a job is terminal: enqueue its waiting children if it completed, else cancel them.

    Children in a Celery chain are not ``deferred`` — Celery sends the next step itself, and only
    after a success — but their rows still need ending when a step doesn't complete.

    ``ended``: the terminal status the caller's own end of the job wrote (a run that ended its job
    knows it): the row is not read again for it. Otherwise the status is read.
    """
    status = ended if ended is not None and ended.is_terminal else None
    if status is None:
        with read_only_connection() as conn:  # the status only: every job pays this read as it ends
            seen = conn.scalar(_STATUS_OF, {"job_id": job_id})
        status = JobStatus(seen) if seen else None
    if status is None or not status.is_terminal:
        return
    if status is not JobStatus.COMPLETED:
        cancel_children(job_id, f"parent job {job_id} {status.value}")
        return
    for child in _unfinished_children(job_id):
        with session_scope() as session:
            claimed = session.execute(
                update(Job).where(Job.id == child.id, Job.deferred.is_(True)).values(deferred=False)
            ).rowcount == 1
        if claimed:  # exactly one caller enqueues each waiting child
            enqueue(child.id, child.options, child.queue)


@dataclass(frozen=True)
class BulkCancelOutcome:
    matched: int  # jobs the filter selected that were not yet terminal
    cancelled: int  # queued jobs ended at once (none of them will start)
    cancelling: int  # running jobs asked to stop at their next checkpoint


#: Bulk-cancel transactions in flight at once on PostgreSQL: its server's work per batch (an index
#: entry per row in each index of ``jobs`` that holds the cancelled row — 7 of 13 for a job without a
#: tenant, parent or supersede key, migration 0014 — and the events' foreign-key checks) is most of
#: the time and runs in the backend, so two connections use two cores. SQLite has one writer: one at
#: a time there.
BULK_TRANSACTIONS_PG = 2


def _bulk_transactions() -> int:
    return BULK_TRANSACTIONS_PG if get_engine().dialect.name == "postgresql" else 1


def _in_order(fn: Callable[[list[str]], list[str]], chunks: list[list[str]], width: int) -> Iterator[list[str]]:
    """``fn`` of each chunk, at most ``width`` at once, the results in the chunks' order. If one
    raises, the chunks not started yet are dropped, those running finish (each its own
    transaction, committed or not, as alone), and the error goes on."""
    if width <= 1:
        yield from map(fn, chunks)
        return
    with ThreadPoolExecutor(max_workers=width, thread_name_prefix="andon-bulk-rows") as pool:
        running: deque[Future[list[str]]] = deque()
        try:
            for chunk in chunks:
                running.append(pool.submit(fn, chunk))
                if len(running) >= width:
                    yield running.popleft().result()
            while running:
                yield running.popleft().result()
        finally:
            for future in running:
                future.cancel()


def matching(conn: Connection, status: JobStatus | None, parent_job_id: str | None, tag: str | None,
             tenant: str | None) -> Select:
    """The unfinished jobs a bulk cancel matches: ``(id, status, pipeline)``. With a parent or a
    tag, those find the candidates (by their ids) and the row's filters only check them
    (:func:`db.jobs.recheck`): planned from statistics taken while few jobs were pending, a status
    filter drove the read and rescanned the whole tag for each pending job."""
    filters = [Job.status.not_in([s.value for s in TERMINAL_STATUSES])]
    if status is not None:
        filters.append(Job.status == status.value)
    if tenant is not None:
        filters.append(Job.tenant == tenant)
    among = []
    if parent_job_id is not None:
        among.append(job_rows.children_of(parent_job_id))
    if tag is not None:
        among.append(job_rows.tagged(tag))
    if among:
        filters = [*among, *job_rows.recheck(conn, *filters)]
    return select(Job.id, Job.status, Job.pipeline).where(*filters)


def cancel_matching(
    status: JobStatus | None = None,
    parent_job_id: str | None = None,
    tag: str | None = None,
    reason: CancellationReason = CancellationReason.USER_REQUESTED,
    message: str | None = None,
    source: CancellationSource = CancellationSource.API,
    actor: str | None = None,
    batch: int = 1000,
    tenant: str | None = None,
) -> BulkCancelOutcome:
    """Cancel every unfinished job matching a filter, in one pass.

    Queued jobs go by the thousand (two thousands at once on PostgreSQL, on two connections): one
    transaction each with one conditional ``UPDATE ... RETURNING`` (only rows still ``pending``
    change, so a job a worker just started is left to the per-job path) and one ``INSERT … SELECT``
    of their events, the thousand ids one parameter in both (:func:`db.jobs.ids_in`); then their
    tokens, in one pipelined round trip per thousand (:meth:`CancellationStore.cancel_many`), written
    by a helper thread while the next thousand's rows are written (each batch's tokens still after
    its rows commit; all of them before this returns).
    Running jobs, usually few, each get :func:`request_cancel`.
    """
    with get_engine().connect() as conn:  # a read, of plain rows: the ORM's row loading cost as much as the SELECT
        rows = conn.execute(matching(conn, status, parent_job_id, tag, tenant)).all()
    pending = JobStatus.PENDING.value
    queued = [job_id for job_id, s, _ in rows if s == pending]
    # the jobs a policy may resume once cancelled: only pipelines whose policy for this reason acts
    # (a bulk `timeout` of 100,000 jobs is not 100,000 policy look-ups, one transaction each)
    pipelines = {pipeline for _, _, pipeline in rows}
    acting = {pipeline for pipeline in pipelines if reason not in NEVER_AUTOMATIC
              and policy_for(pipeline)[reason] not in (FINAL, RESUMABLE)}
    may_resume = {job_id for job_id, _, pipeline in rows if pipeline in acting}
    request = CancelRequest(reason, message, source)
    detail = {"message": message, "bulk": True}
    cancelled: list[str] = []
    tokens: list[Future] = []
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="andon-bulk-tokens") as redis_writer:

        def end_batch(chunk: list[str]) -> list[str]:
            with session_scope() as session:
                job_rows.by_index(session)
                ended = lifecycle.cancel_queued(session, chunk, request, pipelines, actor=actor, detail=detail,
                                                events=(EventKind.CANCEL_REQUESTED, EventKind.CANCELLED))
            if ended:  # after the commit, from whichever thread committed (list.append is atomic)
                tokens.append(redis_writer.submit(get_store().cancel_many, ended, reason, message, source))
            return ended

        chunks = [queued[start:start + batch] for start in range(0, len(queued), batch)]
        for ended in _in_order(end_batch, chunks, _bulk_transactions()):
            cancelled += ended
            for job_id in ended:
                if job_id in may_resume:
                    act_after_cancel(job_id)
    for future in tokens:
        try:
            future.result()
        except RedisError as exc:
            # the rows are committed, and they are the durable copy of each cancel (a worker's
            # reconcile reads them): finish the pass rather than fail the request half-done
            log.warning("bulk cancel of queued jobs recorded in the database only (Redis: %s)", exc)
    cancelling = 0
    ended_in_bulk = set(cancelled)
    for job_id, _, _ in rows:
        if job_id in ended_in_bulk:
            continue
        try:
            outcome = request_cancel(job_id, reason, message, source, actor)
            cancelling += outcome.status is JobStatus.CANCELLING
            if outcome.status is JobStatus.CANCELLED:
                cancelled.append(job_id)
        except AndonError:
            pass
    return BulkCancelOutcome(matched=len(rows), cancelled=len(cancelled), cancelling=cancelling)
