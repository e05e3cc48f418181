"""The cancel path's order: the token first (Redis decides the winner, workers hear it at once), the
row after — and whichever of the request and the job writes the row first, the first cancel wins,
durably, and the row agrees with Redis."""

from __future__ import annotations

import threading
import uuid
from datetime import UTC, datetime

import pytest
import redis

from db import jobs as job_rows
from db.jobs import ItemRow
from db.session import session_scope
from db.vocabulary import CancellationReason, CancellationSource, ItemStatus, JobStatus
from tasks import control, lifecycle
from tasks.cancellation import CancellationStore, CancelRequest
from tasks.cancellation.keys import heartbeat_key
from tasks.errors import JobAlreadyTerminal, JobNotFound
from tasks.process import get_store
from tests.jobs_helpers import events, items, job_row, submit, wait_items, wait_terminal
from tests.test_hardening import hold_write_lock


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def rows(request, database):
    """The session's SQLite database, or a fresh PostgreSQL one: there a running job's request is one
    statement in autocommit and the job's end reads its row under a row lock — other SQL, same rules."""
    return database if request.param == "sqlite" else request.getfixturevalue("postgres_database")


def _running_job() -> str:
    """A job row that is `running`, owned by nobody real: no worker touches it."""
    job_id = str(uuid.uuid4())
    with session_scope() as session:
        job_rows.create_job(session, job_id, ["a", "b"], {}, actor="test")
    assert lifecycle.start(job_id, "test-owner") is not None
    return job_id


def _requests(job_id: str) -> list:
    return [e for e in events(job_id) if e.kind == "cancel_requested"]


def test_a_cancel_sets_the_token_before_the_row_and_both_hold_the_same_request(rows):
    job_id = _running_job()
    outcome = control.request_cancel(job_id, CancellationReason.TIMEOUT, "late", CancellationSource.API, actor="t")
    assert (outcome.status, outcome.won) == (JobStatus.CANCELLING, True)
    token = get_store().read([job_id])[job_id]
    job = job_row(job_id)
    assert (job.status, job.cancellation_reason, job.cancellation_message, job.cancellation_source) == (
        "cancelling", "timeout", "late", "api")
    assert (token.reason, token.message, token.source, token.actor) == (
        CancellationReason.TIMEOUT, "late", CancellationSource.API, "t")
    [request] = _requests(job_id)
    assert (request.reason, request.actor, request.detail["won"]) == ("timeout", "t", True)


def test_unknown_and_finished_jobs_are_refused_before_any_token_is_set(rows):
    unknown = str(uuid.uuid4())
    with pytest.raises(JobNotFound):
        control.request_cancel(unknown)
    job_id = _running_job()
    assert lifecycle.finish_ran_through(job_id).status.is_terminal
    with pytest.raises(JobAlreadyTerminal):
        control.request_cancel(job_id)
    assert get_store().read([unknown, job_id]) == {}


def _beating(job_id: str) -> None:
    """The heartbeat a worker running the job keeps alive (tasks.monitor.JobMonitor.beat)."""
    get_store().redis.set(heartbeat_key(job_id), "{}", px=5000)


def test_a_running_job_is_cancelled_without_a_row_read_before_its_token(rows, monkeypatch):
    job_id = _running_job()
    _beating(job_id)

    def no_read(_job_id):
        raise AssertionError("a running job's cancel read its row before setting the token")

    monkeypatch.setattr(control, "_check_open", no_read)
    outcome = control.request_cancel(job_id, CancellationReason.TIMEOUT, "fast", actor="t")
    assert (outcome.status, outcome.won) == (JobStatus.CANCELLING, True)
    assert get_store().read([job_id])[job_id].message == "fast"
    assert (job_row(job_id).status, [r.actor for r in _requests(job_id)]) == ("cancelling", ["t"])


def test_without_a_heartbeat_nothing_is_set_by_the_running_only_cancel(database):
    job_id = _running_job()
    assert get_store().apply_if_running(job_id, CancelRequest(CancellationReason.TIMEOUT)) is None
    assert get_store().read([job_id]) == {}


def test_a_heartbeat_that_outlives_its_finished_job_leaves_no_token_behind(rows):
    """The monitor deletes the heartbeat just after the terminal row commits: a cancel in between
    sets the token, then finds the row over, answers 400 and takes its token back."""
    job_id = _running_job()
    assert lifecycle.finish_ran_through(job_id).status.is_terminal
    _beating(job_id)
    with pytest.raises(JobAlreadyTerminal):
        control.request_cancel(job_id)
    assert get_store().read([job_id]) == {}
    assert _requests(job_id) == []


@pytest.mark.parametrize("heartbeat", [False, True], ids=["read-first", "running"])
def test_a_job_that_commits_cancelled_before_the_request_writes_the_row_still_answers_success(
        rows, monkeypatch, heartbeat):
    """The token is set; the job observes it and commits `cancelled` (recording the request itself)
    before the request's own row write runs: the request answers success, not 400, and the winner
    is on record once, before the job's end. ``running``: the token is set by the running-job call
    (no row read first), whose one-statement row write then finds the job over."""
    job_id = _running_job()
    if heartbeat:
        _beating(job_id)
    store = get_store()

    class JobEndsRightAfterTheToken:
        """The real store; the moment the token is set, the job observes it and ends."""

        def apply(self, jid, request, **kwargs):
            won, winner = store.apply(jid, request, **kwargs)
            assert lifecycle.end_cancelled(jid, winner, at_item=1, requested=winner)  # what the job does
            return won, winner

        def apply_if_running(self, jid, request):
            applied = store.apply_if_running(jid, request)
            if applied is not None:
                assert lifecycle.end_cancelled(jid, applied[1], at_item=1, requested=applied[1])
            return applied

        def __getattr__(self, name):
            return getattr(store, name)

    monkeypatch.setattr(control, "get_store", JobEndsRightAfterTheToken)
    outcome = control.request_cancel(job_id, CancellationReason.USER_REQUESTED, "now", actor="alice")
    assert (outcome.status, outcome.won, outcome.ended) == (JobStatus.CANCELLING, True, False)
    job = job_row(job_id)
    assert (job.status, job.cancellation_reason, job.cancellation_message) == ("cancelled", "user_requested", "now")
    assert job.cancel_requested_at is not None and job.cancel_observed_at >= job.cancel_requested_at
    kinds = [(e.kind, e.actor) for e in events(job_id) if e.kind.startswith("cancel")]
    assert kinds == [("cancel_requested", "alice"), ("cancel_observed", None), ("cancelled", None)]


def test_a_running_job_observes_a_cancel_whose_request_died_before_writing_the_row(worker):
    """Only the token was set (the requesting process died after Redis): the job's own terminal
    write carries the reason from the token and puts the request on record."""
    job_id = submit(30, stage_delay_s=0.03)
    wait_items(job_id, 2)
    get_store().apply(job_id, CancelRequest(CancellationReason.RESOURCE_LIMIT, "only in Redis",
                                            CancellationSource.API, actor="gone"))
    job = wait_terminal(job_id)
    assert (job.status, job.cancellation_reason, job.cancellation_message) == (
        "cancelled", "resource_limit", "only in Redis")
    assert job.cancel_requested_at is not None
    [request] = _requests(job_id)
    assert (request.reason, request.actor, request.detail["won"]) == ("resource_limit", "gone", True)


def test_with_redis_away_the_row_decides_and_a_later_token_follows_the_row(rows, monkeypatch):
    job_id = _running_job()
    get_store().redis.set(heartbeat_key(job_id), "{}", px=120_000)  # "alive": no reaper of the suite takes it
    dead = CancellationStore(redis.Redis(port=1, socket_connect_timeout=0.2, socket_timeout=0.2))
    monkeypatch.setattr(control, "get_store", lambda: dead)
    outcome = control.request_cancel(job_id, CancellationReason.TIMEOUT, "first", actor="a")
    assert (outcome.status, outcome.won) == (JobStatus.CANCELLING, True)
    assert get_store().read([job_id]) == {}
    monkeypatch.undo()
    # Redis is back: a second request wins there, but the row came first and Redis is corrected
    later = control.request_cancel(job_id, CancellationReason.USER_REQUESTED, "second", actor="b")
    assert (later.won, later.request.reason) == (False, CancellationReason.TIMEOUT)
    assert get_store().read([job_id])[job_id].reason is CancellationReason.TIMEOUT
    assert job_row(job_id).cancellation_reason == "timeout"
    assert [(e.reason, e.detail["won"]) for e in _requests(job_id)] == [("timeout", True), ("user_requested", False)]


@pytest.mark.parametrize("heartbeat", [False, True], ids=["read-first", "running"])
def test_racing_cancels_with_different_reasons_leave_the_redis_winner_first_on_record(rows, heartbeat):
    reasons = list(CancellationReason)
    for _ in range(10):
        job_id = _running_job()
        if heartbeat:
            _beating(job_id)
        barrier = threading.Barrier(len(reasons))
        outcomes = []

        def cancel(reason):
            barrier.wait()
            outcomes.append(control.request_cancel(job_id, reason, f"by {reason.value}", actor=reason.value))

        threads = [threading.Thread(target=cancel, args=(r,)) for r in reasons]
        [t.start() for t in threads]
        [t.join(30) for t in threads]
        winner = get_store().read([job_id])[job_id]
        assert sum(o.won for o in outcomes) == 1
        assert {o.request.reason for o in outcomes} == {winner.reason}
        assert job_row(job_id).cancellation_reason == winner.reason.value
        requests = _requests(job_id)
        assert len(requests) == len(reasons)
        assert (requests[0].reason, requests[0].actor, requests[0].detail["won"]) == (
            winner.reason.value, winner.actor, True)
        assert [r.detail["won"] for r in requests[1:]] == [False] * (len(reasons) - 1)


@pytest.mark.usefixtures("database")
def test_a_cancel_is_observed_while_the_database_is_locked_and_recorded_once_it_is_back(start_worker):
    w = start_worker(concurrency=1, ANDON_SQLITE_BUSY_TIMEOUT_MS="200", ANDON_DB_RETRY_S="30")
    job_id = submit(40, stage_delay_s=0.05, pipeline="user-sync", queue=w.queue)
    wait_items(job_id, 2)
    holder = hold_write_lock(1.5)
    asked = datetime.now(UTC)
    outcome = control.request_cancel(job_id, CancellationReason.TIMEOUT, "while locked", actor="t")
    assert outcome.won
    holder.join(30)
    job = wait_terminal(job_id)
    assert (job.status, job.cancellation_reason, job.cancellation_message) == ("cancelled", "timeout", "while locked")
    # the job stopped at its checkpoint long before the lock was released (its end waited for it)
    assert (job.cancel_observed_at - asked).total_seconds() < 1.0
    assert [(e.reason, e.detail["won"]) for e in _requests(job_id)] == [("timeout", True)]


STARTED, FINISHED = datetime(2026, 1, 2, 3, 4, 5, 123456, tzinfo=UTC), datetime(2026, 1, 2, 3, 4, 6, 7, tzinfo=UTC)


def test_a_request_racing_the_jobs_end_puts_the_winner_on_record_once(rows):
    """The request's row write and the job's end (it observed the token) in two threads, either one
    first: one terminal row with the request's reason, its request on record once and first."""
    store = get_store()
    for _ in range(15):
        job_id = _running_job()
        _beating(job_id)
        outcomes = []

        def end(jid=job_id):
            while (winner := store.read([jid]).get(jid)) is None:
                pass
            # its last items go with its end (NULLs of every column type among them, and times)
            last = [ItemRow(0, "parse", ItemStatus.DONE, result={"n": 0}, started_at=STARTED, finished_at=FINISHED),
                    ItemRow(1, "embed", ItemStatus.INTERRUPTED, usage={"prompt_tokens": 3, "completion_tokens": 0, "cut_short": True})]
            assert lifecycle.end_cancelled(jid, winner, at_item=1, requested=winner, items=last, fence=1)

        job = threading.Thread(target=end)
        job.start()
        outcomes.append(control.request_cancel(job_id, CancellationReason.TIMEOUT, "race", actor="alice"))
        job.join(30)
        assert (outcomes[0].status, outcomes[0].won) == (JobStatus.CANCELLING, True)
        row = job_row(job_id)
        assert (row.status, row.cancellation_reason, row.cancellation_message) == ("cancelled", "timeout", "race")
        assert row.cancel_requested_at is not None and row.completed_items == 1
        assert [(i.index, i.status, i.result, i.prompt_tokens, i.usage_cut_short) for i in items(job_id)] == [
            (0, "done", {"n": 0}, None, None), (1, "interrupted", None, 3, True)]
        assert (items(job_id)[0].started_at, items(job_id)[0].finished_at) == (STARTED, FINISHED)
        kinds = [(e.kind, e.actor) for e in events(job_id) if e.kind.startswith("cancel")]
        assert kinds == [("cancel_requested", "alice"), ("cancel_observed", None), ("cancelled", None)]
