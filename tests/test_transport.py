"""A worker survives its Redis broker restarting while it holds a job's message (celery/kombu#970):
the close Celery's consumer makes of a lost connection raises no ``AttributeError`` on andon's
transport, on a real Redis that dies mid-BRPOP, and a real worker lives through the restart."""

from __future__ import annotations

import os
import signal
import socket
import uuid

import pytest
from celery import Celery
from kombu import Connection, Exchange, Queue
from kombu.transport import redis as kombu_redis

from api.stack import free_port, start_redis, stop_process
from tasks.app import app
from tasks.transport import Channel
from tests.jobs_helpers import docs, job_row, wait_items, wait_terminal
from tests.procs import WorkerProcess, wait_for


@pytest.fixture
def own_redis(tmp_path):
    """A Redis server of this test's own, free to be killed and restarted."""
    port = free_port()
    server = {"port": port, "url": f"redis://127.0.0.1:{port}/0", "data": tmp_path / "redis",
              "log": tmp_path / "redis.log"}
    server["proc"] = start_redis(port, server["data"], server["log"])
    yield server
    stop_process(server["proc"])


def lose_broker_mid_poll(url: str, server: dict, transport) -> Connection:
    """A consumer holding one delivered, unacked message and waiting in BRPOP for the next, when
    Redis dies: what a worker running one job with a free pool slot looks like."""
    queue = Queue(f"q-{uuid.uuid4().hex[:8]}", Exchange("andon-test", type="direct"), routing_key="k")
    # and, like every worker, a fanout auto-delete queue (Celery's remote control: its pidbox)
    control = Queue(f"control-{uuid.uuid4().hex[:8]}", Exchange("andon-test-control", type="fanout"), auto_delete=True)
    conn = Connection(url, transport=transport)
    conn.Producer().publish({"job": 1}, exchange=queue.exchange, routing_key="k", declare=[queue])
    held = []
    conn.Consumer([queue, control], callbacks=[lambda body, message: held.append(message)],
                  accept=["json"]).consume()
    conn.drain_events(timeout=5)
    assert len(held) == 1  # delivered, not acked
    with pytest.raises(socket.timeout):  # the BRPOP for the next message stays in flight
        for _ in range(5):  # (the remote-control subscription's own reply comes first)
            conn.drain_events(timeout=0.2)
    assert len(held) == 1
    os.kill(server["proc"].pid, signal.SIGKILL)
    server["proc"].wait(10)
    return conn


def close_as_celery_does(conn: Connection) -> None:
    """celery.worker.consumer.Consumer.on_connection_error_after_connected: collect, then close
    (``ignore_errors`` lets only connection errors through)."""
    try:
        conn.collect(socket_timeout=0.5)
    except Exception:
        pass
    try:
        conn.close()
    except conn.connection_errors:
        pass


class StockTransport(kombu_redis.Transport):
    Channel = kombu_redis.Channel  # kombu's own channel, as before tasks.transport.install()


def test_closing_a_lost_connection_while_holding_a_message_raises_no_attribute_error(own_redis):
    assert app is not None and kombu_redis.Transport.Channel is Channel  # installed with andon's app
    conn = lose_broker_mid_poll(own_redis["url"], own_redis, "redis")
    close_as_celery_does(conn)  # the worker goes on to reconnect


def test_kombus_own_channel_still_has_the_bug(own_redis):
    """When this fails, kombu has fixed celery/kombu#970 and tasks/transport.py can go."""
    conn = lose_broker_mid_poll(own_redis["url"], own_redis, StockTransport)
    with pytest.raises(AttributeError, match="hostname"):
        close_as_celery_does(conn)


def test_a_worker_running_a_job_lives_through_its_broker_restarting(own_redis, database, tmp_path):
    env = {"ANDON_REDIS_URL": own_redis["url"], "ANDON_BROKER_URL": own_redis["url"]}
    worker = WorkerProcess(f"own-redis-{own_redis['port']}", tmp_path, concurrency=2, env=env).start()
    try:
        job_id = str(uuid.uuid4())  # sent as another service would: the worker makes the row from it
        sender = Celery("sender", broker=own_redis["url"])
        sender.send_task("andon.run_pipeline", task_id=job_id, queue=app.conf.task_default_queue,
                         kwargs={"pipeline": "documents", "items": docs(200), "options": {"stage_delay_s": 0.03}})
        wait_for(lambda: job_row(job_id) is not None, 30, what="the job's row")
        wait_items(job_id, 3)
        for _ in range(3):  # each restart finds the job's message delivered and the free slot in BRPOP
            os.kill(own_redis["proc"].pid, signal.SIGKILL)
            own_redis["proc"].wait(10)
            own_redis["proc"] = start_redis(own_redis["port"], own_redis["data"], own_redis["log"])
            wait_for(lambda: worker.proc.poll() is not None
                     or "Connected to redis" in worker.logs().rsplit("Connection to broker lost", 1)[-1], 60,
                     what="the worker to reconnect (or exit)")
            assert worker.proc.poll() is None, "the worker exited: " + worker.logs()[-2000:]
        assert "Unrecoverable error" not in worker.logs()
        assert wait_terminal(job_id, timeout=120).status == "completed"
    finally:
        worker.stop(timeout=20)
