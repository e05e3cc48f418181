"""Per-reason policies (issue 13 item 1): what happens after a stop depends on why — `final`,
`resumable`, `auto_resume`, `requeue:<queue>` — per pipeline with a global default, bounded, recorded,
visible. Real workers; the pipelines come from tests/fixtures (loaded through ANDON_PIPELINES)."""

from __future__ import annotations

import uuid

import pytest

from api import service
from tasks import Pipeline
from tasks.errors import PipelineError
from tasks.policy import DEFAULT_POLICY, PolicyError, check_policy, policy_for, resumable
from tests.jobs_helpers import events, job_row, submit, wait_items, wait_terminal
from tests.procs import wait_for


def echo(value):
    return value


@pytest.mark.parametrize("raw, message", [
    ({"bored": "final"}, "unknown reason 'bored'"),
    ({"timeout": "retry"}, "unknown action 'retry'"),
    ({"timeout": "requeue:"}, "unknown action"),
    ({"user_requested": "auto_resume"}, "user_requested can't resume by itself"),
    ({"dependency_failed": "requeue:big"}, "dependency_failed can't resume by itself"),
    (["timeout"], "maps reasons to actions"),
])
def test_a_wrong_policy_is_a_clear_error_at_definition(raw, message):
    with pytest.raises(PolicyError, match=message):
        check_policy(raw, "test")
    with pytest.raises(PipelineError, match=message):
        Pipeline("policy-x", [echo], policy=raw, register=False)


def test_the_default_policy_is_todays_behaviour():
    assert policy_for("documents") == DEFAULT_POLICY
    assert resumable("documents", "timeout") and resumable("documents", "system_shutdown")
    assert not resumable("documents", "user_requested") and not resumable("documents", "resource_limit")
    assert policy_for("user-requeue")["resource_limit"] == "requeue:andon-test-big"


def test_a_bad_andon_policy_stops_the_worker_with_one_line(tmp_path):
    from db.settings import get_settings
    from tests.procs import WorkerProcess

    worker = WorkerProcess(f"badpol-{uuid.uuid4().hex[:6]}", get_settings().home_dir / "logs", 1,
                           env={"ANDON_POLICY": '{"user_requested": "auto_resume"}'})
    with pytest.raises(AssertionError, match="exited with code 2"):
        worker.start(timeout=30)
    lines = [line for line in worker.logs().splitlines() if line.startswith("andon worker:")]
    assert lines == ["andon worker: ANDON_POLICY: user_requested can't resume by itself (final or resumable)"]


def test_auto_resume_after_a_timeout_is_bounded_and_visible(worker, api_client):
    first = submit(40, stage_delay_s=0.05, pipeline="user-autoresume", deadline_s=0.6)
    chain = [first]
    for _ in range(3):  # each resumed job times out again: the policy resumes at most twice
        job = wait_terminal(chain[-1], timeout=30)
        assert (job.status, job.cancellation_reason) == ("cancelled", "timeout")
        resumed = wait_for(lambda: job_row(chain[-1]).resumed_by or
                           any(e.detail and e.detail.get("skipped") for e in events(chain[-1])), 20,
                           what="the policy to act")
        if isinstance(resumed, str):
            chain.append(resumed)
    assert len(chain) == 3  # the first job and two policy resumes
    last = job_row(chain[-1])
    assert last.resumed_by is None
    skipped = [e for e in events(chain[-1]) if e.kind == "resumed" and e.detail.get("skipped")]
    assert skipped and "max_resumes 2" in skipped[0].detail["skipped"]
    for old, new in zip(chain, chain[1:]):
        view = api_client.get(f"/api/jobs/{old}").json()
        assert view["resumed_by"] == new
        made = [e for e in events(new) if e.kind == "resumed"][0]
        assert made.actor == "policy:auto_resume" and made.detail["policy"] == "auto_resume"
        assert made.detail["resumed_from"] == old


def test_requeue_resumes_on_the_queue_the_policy_names(start_worker):
    small = start_worker(concurrency=1, ANDON_HEARTBEAT_S="0.3", ANDON_MAX_JOB_RSS_MB="1")
    job_id = submit(60, stage_delay_s=0.03, pipeline="user-requeue", queue=small.queue)
    wait_items(job_id, 1)
    job = wait_terminal(job_id, timeout=30)
    assert (job.status, job.cancellation_reason) == ("cancelled", "resource_limit")
    new_id = wait_for(lambda: job_row(job_id).resumed_by, 20, what="the requeue")
    assert job_row(new_id).queue == "andon-test-big" and job_row(new_id).status == "pending"
    start_worker(concurrency=1, queue="andon-test-big")  # the bigger workers
    resumed = wait_terminal(new_id, timeout=60)
    assert resumed.status == "completed" and resumed.completed_items == resumed.total_items


def test_user_requested_stops_are_never_resumed_by_a_policy(worker):
    job_id = submit(40, stage_delay_s=0.05, pipeline="user-autoresume")
    wait_items(job_id, 1)
    service.cancel_job(job_id)
    job = wait_terminal(job_id)
    assert job.status == "cancelled" and job.resumed_by is None and not job.resumable


def test_a_policy_step_its_cancelling_process_never_took_is_taken_by_the_sweep(worker):
    """The process that cancelled a job died right after the commit (or the broker was away when it
    queued the resume): the reaper's sweep applies the policy later, once."""
    from datetime import UTC, datetime, timedelta

    from db import jobs as job_rows
    from db.session import session_scope
    from db.vocabulary import JobStatus
    from tasks.after_stop import apply_pending_policies

    job_id = str(uuid.uuid4())
    with session_scope() as session:
        job_rows.create_job(session, job_id, [1, 2], {}, pipeline="user-autoresume")
    with session_scope() as session:  # cancelled for a timeout, its policy step never taken
        assert job_rows.transition(session, job_id, JobStatus.CANCELLED, cancellation_reason="timeout",
                                   cancellation_source="deadline", resumable=True,
                                   finished_at=datetime.now(UTC) - timedelta(seconds=10))
    resumed = apply_pending_policies(grace_s=1)
    new_id = job_row(job_id).resumed_by
    assert new_id in resumed and wait_terminal(new_id).status == "completed"
    assert apply_pending_policies(grace_s=1) == []  # once
