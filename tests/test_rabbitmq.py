"""andon on RabbitMQ: ``ANDON_BROKER_URL=amqp://...`` with Redis still holding tokens, results and
pub/sub. Every stop path, queued cancel and bulk cancel works as on Redis.

Real parts only: a private RabbitMQ node (tests/rabbitserver.py), the API as a uvicorn process and
prefork workers, all three with the amqp broker URL (the Celery app reads it at import, so the
session's in-process app, on Redis, sends nothing here). Jobs go to andon's default queue on this
broker, which only this module's workers consume, one worker at a time.
"""

from __future__ import annotations

import os
import signal
import time

import httpx
import pytest
from celery import Celery
from celery.result import AsyncResult

from api.supervisor import api_service, free_port
from db.settings import get_settings
from tasks.app import app as redis_app  # for Celery's result backend (Redis) only
from tests.jobs_helpers import assert_one_terminal, docs, events, items, job_row, wait_items, wait_terminal
from tests.procs import wait_for

pytestmark = pytest.mark.rabbitmq

QUEUE = "andon"  # task_default_queue


@pytest.fixture(scope="module")
def rabbit_env(rabbitmq_server) -> dict[str, str]:
    return {"ANDON_BROKER_URL": rabbitmq_server.url}


@pytest.fixture(scope="module")
def api(rabbit_env, database, home):
    """The API on RabbitMQ, as a real uvicorn process; yields an httpx client for it."""
    port = free_port()
    service = api_service(port, home / "logs" / "api-rabbitmq.log", env=rabbit_env).start()
    with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=30) as client:
        yield client
    service.stop(timeout=15)


@pytest.fixture
def rabbit_worker(start_worker, rabbit_env):
    """Start a prefork worker on RabbitMQ serving the default queue (stopped after the test)."""
    def start(concurrency: int = 1, **env: str):
        worker = start_worker(concurrency=concurrency, queue=QUEUE, **rabbit_env, **env)
        assert "amqp://guest:**@127.0.0.1" in worker.logs(), worker.logs()[-2000:]
        return worker

    return start


@pytest.fixture
def control(rabbitmq_server):
    """Celery's remote control over AMQP, as an operator's ``app.control`` would send it."""
    celery = Celery("andon-operator", broker=rabbitmq_server.url)
    yield celery.control
    celery.close()


def submit(api: httpx.Client, n: int, stage_delay_s: float = 0.0, **body) -> str:
    answer = api.post("/api/jobs", json={"documents": docs(n), "options": {"stage_delay_s": stage_delay_s},
                                          **body})
    assert answer.status_code == 202, answer.text
    return answer.json()["job_id"]


def queue_ready(rabbit) -> int:
    """Messages waiting in the default queue (not counting those delivered and unacked)."""
    import amqp

    with amqp.Connection(f"127.0.0.1:{rabbit.port}", userid="guest", password="guest", connect_timeout=5) as conn:
        return conn.channel().queue_declare(QUEUE, passive=True).message_count


def assert_drained(rabbit) -> None:
    """Nothing left in the queue, nothing delivered and unacked: no message of an ended job will be
    redelivered (acks_late)."""
    wait_for(lambda: queue_ready(rabbit) == 0, 20, interval=0.1, what="the queue to drain")

    def settled():
        out = rabbit.ctl("list_queues", "-q", "--no-table-headers", "name", "messages_ready",
                         "messages_unacknowledged").stdout
        return any(line.split() == [QUEUE, "0", "0"] for line in out.splitlines())

    wait_for(settled, 20, interval=0.5, what="no unacked message in the queue")


def celery_state(job_id: str) -> str:
    return AsyncResult(job_id, app=redis_app).state


def assert_stopped(job_id: str, reason: str, source: str, min_items: int = 0, timeout: float = 30):
    job = wait_terminal(job_id, timeout)
    assert (job.status, job.cancellation_reason, job.cancellation_source) == ("cancelled", reason, source), (
        job.status, job.cancellation_reason, job.cancellation_source, job.error)
    assert_one_terminal(job_id)
    done = [r for r in items(job_id) if r.status == "done"]
    assert min_items <= job.completed_items < job.total_items and len(done) == job.completed_items
    assert not (get_settings().jobs_tmp_dir / job_id).exists()
    return job


def never_ran(job_id: str) -> bool:
    job = job_row(job_id)
    return (job.status == "cancelled" and job.started_at is None and items(job_id) == []
            and "started" not in [e.kind for e in events(job_id)])


def test_a_job_runs_to_completion(api, rabbit_worker, rabbitmq_server):
    ready = api.get("/readyz").json()
    assert ready["status"] == "ready" and ready["checks"]["broker"] == "ok", ready  # an AMQP handshake
    rabbit_worker()
    job_id = submit(api, 4)
    job = wait_terminal(job_id)
    assert (job.status, job.completed_items) == ("completed", 4), job.error
    partial = api.get(f"/api/jobs/{job_id}/partial-results").json()
    assert partial["status"] == "complete" and [r["index"] for r in partial["results"]] == [0, 1, 2, 3]
    wait_for(lambda: celery_state(job_id) == "SUCCESS", 10, what="Celery's SUCCESS in the Redis backend")
    assert_drained(rabbitmq_server)


def test_a_batch_submit_goes_through_kombus_path_and_every_job_completes(api, rabbit_worker, rabbitmq_server):
    """The pipelined put is Redis's only: on AMQP, a batch's messages go through kombu, one publish
    each, and each job runs."""
    from kombu import Connection

    from tasks.sending import _redis_templates, _Templates

    with Connection(rabbitmq_server.url) as conn, conn.Producer() as producer:
        assert _redis_templates(producer, [("x", {}, None)], _Templates()) is None
    rabbit_worker()
    answer = api.post("/api/jobs/batch", json={"jobs": [{"documents": docs(2)} for _ in range(6)]})
    assert answer.status_code == 202, answer.text
    for job_id in answer.json()["job_ids"]:
        job = wait_terminal(job_id, timeout=60)
        assert (job.status, job.completed_items) == ("completed", 2), job.error
    assert_drained(rabbitmq_server)


def test_a_running_job_cancelled_through_the_api_keeps_its_partial_results(api, rabbit_worker, rabbitmq_server):
    rabbit_worker()
    job_id = submit(api, 30, stage_delay_s=0.03)
    wait_items(job_id, 3)
    answer = api.post(f"/api/jobs/{job_id}/cancel", json={"message": "enough"})
    assert answer.status_code == 202 and answer.json()["status"] == "cancelling", answer.text
    job = assert_stopped(job_id, "user_requested", "api", min_items=3)
    partial = api.get(f"/api/jobs/{job_id}/partial-results").json()
    assert partial["status"] == "partial" and len(partial["results"]) == job.completed_items
    assert partial["cancelled_at_item"] == job.completed_items
    wait_for(lambda: celery_state(job_id) == "REVOKED", 10, what="Celery's REVOKED in the Redis backend")
    assert_drained(rabbitmq_server)  # acked once it stopped: RabbitMQ won't redeliver it


def test_a_queued_job_cancelled_never_runs(api, rabbit_worker, rabbitmq_server):
    queued = submit(api, 3)  # no worker yet: its message waits in RabbitMQ
    answer = api.post(f"/api/jobs/{queued}/cancel", json={})
    assert answer.status_code == 202 and answer.json()["status"] == "cancelled", answer.text
    assert queue_ready(rabbitmq_server) == 1
    rabbit_worker()
    after = submit(api, 1)  # queued behind it: once this ran, the worker has seen the cancelled one
    assert wait_terminal(after).status == "completed"
    assert never_ran(queued)
    assert_drained(rabbitmq_server)


def test_a_bulk_cancel_of_queued_jobs_leaves_none_to_start(api, rabbit_worker, rabbitmq_server):
    body = {"documents": docs(2), "tags": ["rabbit-bulk"]}
    answer = api.post("/api/jobs/batch", json={"jobs": [body] * 40})  # one producer, kombu's publish batch
    assert answer.status_code == 202, answer.text
    queued = answer.json()["job_ids"]
    assert queue_ready(rabbitmq_server) == 40
    answer = api.post("/api/jobs/cancel", json={"tag": "rabbit-bulk", "reason": "timeout"})
    assert answer.status_code == 202 and answer.json()["cancelled"] == 40, answer.text
    rabbit_worker()
    after = submit(api, 1)
    assert wait_terminal(after).status == "completed"
    assert all(never_ran(job_id) for job_id in queued)
    assert {job_row(job_id).cancellation_reason for job_id in queued} == {"timeout"}
    assert_drained(rabbitmq_server)


def test_control_revoke_and_terminate_over_amqp_stop_running_jobs(api, rabbit_worker, rabbitmq_server, control):
    rabbit_worker()
    job_id = submit(api, 30, stage_delay_s=0.03)
    wait_items(job_id, 2)
    control.revoke(job_id, reason="resource_limit", message="GPU quota exhausted")
    job = assert_stopped(job_id, "resource_limit", "revoke", min_items=2)
    assert job.cancellation_message == "GPU quota exhausted"
    requested = [e for e in events(job_id) if e.kind == "cancel_requested"]
    assert len(requested) == 1 and requested[0].source == "revoke"

    forced = submit(api, 30, stage_delay_s=0.03)  # Flower's Terminate: cooperative first, then a signal
    wait_items(forced, 2)
    control.revoke(forced, terminate=True, signal="SIGKILL")
    assert_stopped(forced, "user_requested", "revoke", min_items=2)
    wait_for(lambda: celery_state(forced) == "REVOKED", 10, what="Celery's REVOKED in the Redis backend")
    assert_drained(rabbitmq_server)


def test_a_warm_shutdown_ends_a_running_job_resumably(api, rabbit_worker, rabbitmq_server):
    worker = rabbit_worker()
    job_id = submit(api, 30, stage_delay_s=0.03)
    wait_items(job_id, 3)
    started = time.monotonic()
    worker.send_signal(signal.SIGTERM)
    worker.proc.wait(timeout=20)
    assert time.monotonic() - started < 10
    job = assert_stopped(job_id, "system_shutdown", "worker_shutdown", min_items=3)
    assert job.resumable is True
    assert queue_ready(rabbitmq_server) == 0  # acked, not handed back to RabbitMQ for a second run

    answer = api.post(f"/api/jobs/{job_id}/resume")
    assert answer.status_code == 202, answer.text
    resumed = answer.json()["job_id"]
    rabbit_worker()
    job = wait_terminal(resumed)
    assert (job.status, job.resumed_from, job.completed_items) == ("completed", job_id, 30)
    assert job_row(job_id).status == "cancelled"
    assert_drained(rabbitmq_server)


def test_a_sigkilled_child_is_redelivered_once_and_resumes_where_it_stopped(api, rabbit_worker, rabbitmq_server):
    """RabbitMQ takes a rejected message back at once (task_reject_on_worker_lost), not after a
    visibility timeout as on Redis: the job is requeued once and its finished items kept."""
    worker = rabbit_worker()
    job_id = submit(api, 20, stage_delay_s=0.03)
    wait_items(job_id, 3)
    os.kill(worker.child_pids()[0], signal.SIGKILL)
    job = wait_terminal(job_id, timeout=60)
    assert job.status == "completed" and job.completed_items == job.total_items
    assert sorted(r.index for r in items(job_id)) == list(range(job.total_items))  # no item ran twice
    kinds = [e.kind for e in events(job_id)]
    assert kinds.count("requeued") == 1 and kinds.count("started") == 2
    assert_one_terminal(job_id)
    assert_drained(rabbitmq_server)


def test_the_broker_sweep_resends_by_age_on_rabbitmq_and_the_duplicate_is_harmless(
        api, rabbit_worker, rabbitmq_server, monkeypatch):
    """tasks/broker.py can read kombu's Redis queues, not RabbitMQ's: on amqp the lost-message sweep
    re-sends a job queued too long (by age only) and never touches a parked message; the job then has
    two messages, and runs once."""
    from datetime import UTC, datetime, timedelta

    from db.models import Job
    from db.session import session_scope
    from tasks import broker
    from tasks.celery_app import RUN_PIPELINE

    job_id = submit(api, 2)  # no worker yet: its message waits in RabbitMQ
    with session_scope() as session:  # queued for two hours (and nothing else in this session is)
        session.get(Job, job_id).created_at = datetime.now(UTC) - timedelta(hours=2)
    rabbit_settings = get_settings().model_copy(update={"broker_url": rabbitmq_server.url})
    sender = Celery("andon-sender", broker=rabbitmq_server.url)
    sent = []

    def send(job, options=None, queue=None):  # what tasks.sending.enqueue does, on this broker
        sender.send_task(RUN_PIPELINE, args=[job], task_id=job, queue=queue or QUEUE)
        sent.append(job)

    monkeypatch.setattr(broker, "get_settings", lambda: rabbit_settings)
    monkeypatch.setattr(broker, "enqueue", send)
    try:
        assert broker.release_parked(0) == []  # RabbitMQ redelivers unacked messages itself
        assert job_id not in broker.resend_lost(120, 3 * 3600)  # not queued that long yet
        assert job_id in broker.resend_lost(120, 3600) and sent == [job_id]
        assert job_id not in broker.resend_lost(120, 3600)  # once per interval, not every sweep
    finally:
        sender.close()
    resent = [e for e in events(job_id) if e.kind == "resent"]
    assert len(resent) == 1 and resent[0].detail == {"why": "queued too long"}
    assert queue_ready(rabbitmq_server) == 2

    rabbit_worker()
    job = wait_terminal(job_id)
    assert job.status == "completed" and [e.kind for e in events(job_id)].count("started") == 1
    assert_drained(rabbitmq_server)  # the second message was delivered, found the job done, and acked


def test_a_cancelled_queued_job_is_skipped_in_the_main_process(api, rabbit_worker, rabbitmq_server):
    """The main process answers the message itself (tasks/strategy.py), on AMQP as on Redis."""
    rabbit_worker(concurrency=1)
    blocker = submit(api, 500, stage_delay_s=0.05)
    wait_for(lambda: job_row(blocker).status == "running", 30, what="the blocker to run")
    queued = [submit(api, 1) for _ in range(10)]
    for job_id in queued:
        assert api.post(f"/api/jobs/{job_id}/cancel", json={}).json()["status"] == "cancelled"
    api.post(f"/api/jobs/{blocker}/cancel", json={})
    wait_terminal(blocker)

    def skipped(job_id: str) -> bool:
        result = AsyncResult(job_id, app=redis_app)
        return result.state == "REVOKED" and "cancelled while queued" in str(result.result)

    wait_for(lambda: all(skipped(j) for j in queued), 60, interval=0.2,
             what="the main process to answer every cancelled message REVOKED")
    assert not any("started" in [e.kind for e in events(j)] for j in queued)
    wait_for(lambda: queue_ready(rabbitmq_server) == 0, 20, what="the queue to drain")

