"""Push delivery stays correct when messages are lost: reconnects, and Redis restarting mid-job."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import uuid
from pathlib import Path

import pytest
import redis

from api.stack import free_port, start_redis, stop_process
from api.supervisor import api_service
from db.vocabulary import CancellationReason
from tasks.cancellation import CancellationStore, TokenWatcher
from tests.jobs_helpers import (
    assert_one_terminal,
    items,
    wait_items,
    wait_terminal,
)
from tests.procs import WorkerProcess, wait_for

ANDON = str(Path(sys.executable).parent / "andon")


@pytest.fixture
def own_redis(tmp_path):
    """A Redis server of this test's own, free to be killed and restarted."""
    port = free_port()
    data = tmp_path / "redis"
    server = {"port": port, "url": f"redis://127.0.0.1:{port}/0", "data": data,
              "proc": start_redis(port, data, tmp_path / "redis.log")}
    yield server
    stop_process(server["proc"])


def test_a_cancel_published_while_the_listener_is_disconnected_is_observed_after_reconnect(own_redis):
    client = redis.Redis.from_url(own_redis["url"])
    store = CancellationStore(client)
    watcher = TokenWatcher(CancellationStore(redis.Redis.from_url(own_redis["url"])), reconcile_s=60)
    try:
        job = str(uuid.uuid4())
        token = watcher.watch(job)
        wait_for(watcher.connected.is_set, 5, what="watcher subscribed")
        # in one transaction: drop the listener's connection, then cancel (the publish reaches nobody)
        # one MULTI: drop the listener's connection, then cancel; nothing can interleave, so the
        # publish reaches nobody
        request = json.dumps({"job_id": job, "reason": "timeout", "message": "while away", "source": "deadline",
                              "at": "2026-01-01T00:00:00+00:00"})
        with client.pipeline(transaction=True) as pipe:
            pipe.client_kill_filter(_type="pubsub")
            store._cancel(keys=[f"andon:cancel:{job}", f"andon:cancel:{job}:requests", store.queued_key],
                          args=[request, 3600, store.channel, "", 0, store.queued_channel], client=pipe)
            pipe.execute()
        # periodic reconcile is 60 s away: only the reconcile on reconnect can deliver it this fast
        assert token.wait(5) is True
        assert token.reason is CancellationReason.TIMEOUT
    finally:
        watcher.stop()


def test_a_redis_restart_mid_job_does_not_lose_a_cancel(own_redis, database, tmp_path):
    env = {"ANDON_REDIS_URL": own_redis["url"], "ANDON_BROKER_URL": own_redis["url"]}
    worker = WorkerProcess(f"own-redis-{own_redis['port']}", tmp_path, concurrency=1, env=env).start()
    api_port = free_port()  # the CLI speaks HTTP: an API on this Redis too
    api = api_service(api_port, tmp_path / "api.log", env=env).start()
    cli_env = {**os.environ, **env, "ANDON_API_URL": f"http://127.0.0.1:{api_port}"}
    try:
        submitted = subprocess.run([ANDON, "submit", "--json", "--stage-delay", "0.05",
                                    *[f"Doc {i}. Text here." for i in range(100)]],
                                   capture_output=True, text=True, env=cli_env, timeout=60)
        job_id = json.loads(submitted.stdout)["job_id"]
        wait_items(job_id, 3)
        # Redis dies and loses everything it had
        os.kill(own_redis["proc"].pid, signal.SIGKILL)
        own_redis["proc"].wait(10)
        shutil.rmtree(own_redis["data"])
        cancelled = subprocess.run([ANDON, "cancel", job_id], capture_output=True, text=True, env=cli_env,
                                   timeout=60)
        assert cancelled.returncode == 0, cancelled.stderr
        assert f"{job_id}: cancelling" in cancelled.stdout
        # ...and comes back empty; the cancel lives on in the job row
        own_redis["proc"] = start_redis(own_redis["port"], own_redis["data"], tmp_path / "redis.log")
        job = wait_terminal(job_id, timeout=60)
        assert (job.status, job.cancellation_reason, job.cancellation_source) == (
            "cancelled", "user_requested", "cli")
        assert 3 <= job.completed_items < 100
        assert all(r.finished_at <= job.cancel_observed_at for r in items(job_id))
        assert_one_terminal(job_id)
    finally:
        api.stop(timeout=15)
        worker.stop(timeout=20)
