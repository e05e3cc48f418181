"""Event streams don't stall the API: many open streams hold no threads, a closed one releases
everything at once, news arrives by push (not by polling), and each tenant/client has a cap.

Runs against its own uvicorn process (its own environment: a stream cap of 201 and a safety poll so
slow that only a notification can deliver an event in time), on the session's Redis, database and
worker.
"""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import time

import httpx
import psutil
import pytest

from api import service
from api.stack import free_port, stop_process, wait_until
from api.watch import parse_sse
from tests.conftest import HOME
from tests.jobs_helpers import submit, wait_items, wait_status, wait_terminal

STREAMS = 200
CAP = STREAMS + 1
SLOW_POLL_S = 30.0


@pytest.fixture(scope="module")
def stream_api(worker):
    """(base URL, psutil.Process) of a uvicorn API with ANDON_MAX_STREAMS=201 and a 30 s safety poll."""
    port = free_port()
    log = HOME / "logs" / "api-streams.log"
    env = {**os.environ, "ANDON_MAX_STREAMS": str(CAP), "ANDON_STREAM_POLL_S": str(SLOW_POLL_S)}
    proc = subprocess.Popen(
        [sys.executable, "-m", "uvicorn", "api.app:app", "--host", "127.0.0.1", "--port", str(port)],
        stdout=log.open("a"), stderr=subprocess.STDOUT, start_new_session=True, env=env,
    )
    url = f"http://127.0.0.1:{port}"
    wait_until(lambda: httpx.get(f"{url}/healthz", timeout=1).status_code == 200, 30, "api", proc, log)
    yield url, psutil.Process(proc.pid)
    stop_process(proc)


def _open_connections(process: psutil.Process, port: int) -> list:
    return [c for c in process.net_connections(kind="tcp")
            if c.laddr and c.laddr.port == port and c.status != psutil.CONN_LISTEN]


def _first_event(url: str, job_id: str) -> str:
    with httpx.stream("GET", f"{url}/api/jobs/{job_id}/events", timeout=10) as response:
        assert response.status_code == 200
        return next(parse_sse(response.iter_lines()))[0]


async def _hold_streams(url: str, job_id: str, count: int, opened: asyncio.Event, close: asyncio.Event,
                        client: httpx.AsyncClient) -> list[int]:
    """Open ``count`` streams, each read up to its first event; hold them until ``close``."""
    statuses: list[int] = []

    async def one() -> None:
        async with client.stream("GET", f"{url}/api/jobs/{job_id}/events") as response:
            statuses.append(response.status_code)
            lines = response.aiter_lines()  # held: a dropped line iterator closes the response
            async for line in lines:
                if line.startswith("event:"):
                    break
            if len(statuses) == count:
                opened.set()
            await close.wait()

    tasks = [asyncio.create_task(one()) for _ in range(count)]
    await opened.wait()
    await close.wait()
    await asyncio.gather(*tasks)
    return statuses


def test_two_hundred_open_streams_hold_no_threads_and_the_api_keeps_answering(stream_api):
    url, process = stream_api
    port = int(url.rsplit(":", 1)[1])
    job_id = submit(400, stage_delay_s=0.2)  # runs for minutes: items keep notifying the streams
    wait_status(job_id, "running")
    assert _first_event(url, job_id) == "submitted"  # warm up: the reader pool and the subscriber exist
    httpx.get(f"{url}/api/jobs/{job_id}", timeout=5).raise_for_status()
    wait_until(lambda: not _open_connections(process, port), 10, "warm-up connections to close")
    baseline = process.num_threads()

    async def scenario() -> dict:
        opened, close = asyncio.Event(), asyncio.Event()
        limits = httpx.Limits(max_connections=STREAMS + 10, max_keepalive_connections=0)
        async with httpx.AsyncClient(timeout=httpx.Timeout(30, read=None), limits=limits) as streams, \
                httpx.AsyncClient(timeout=10) as other:
            holder = asyncio.create_task(_hold_streams(url, job_id, STREAMS, opened, close, streams))
            await asyncio.wait_for(opened.wait(), 60)
            seen: dict = {"threads_while_open": process.num_threads(),
                          "connections_while_open": len(_open_connections(process, port))}
            latencies = []
            for _ in range(10):
                started = time.monotonic()
                answer = await other.get(f"{url}/api/jobs/{job_id}")
                latencies.append(time.monotonic() - started)
                assert answer.status_code == 200 and answer.json()["job_id"] == job_id
                await asyncio.sleep(0.1)
            seen["latencies"] = latencies
            # the cap: one more fits (201), the next is refused with a clear reason
            async with streams.stream("GET", f"{url}/api/jobs/{job_id}/events") as last:
                seen["last_status"] = last.status_code
                async with other.stream("GET", f"{url}/api/jobs/{job_id}/events") as refused:
                    seen["refused"] = (refused.status_code, (await refused.aread()).decode()
                                       if refused.status_code != 200 else "")
            close.set()
            seen["statuses"] = await holder
        return seen

    seen = asyncio.run(scenario())
    assert seen["statuses"] == [200] * STREAMS
    assert seen["connections_while_open"] >= STREAMS
    assert seen["threads_while_open"] <= baseline + 12, (baseline, seen["threads_while_open"])
    assert max(seen["latencies"]) < 3.0, seen["latencies"]  # promptly, on a busy 2-core box: no thread is held
    assert seen["last_status"] == 200
    code, body = seen["refused"]
    assert code == 429 and "ANDON_MAX_STREAMS" in json.loads(body)["detail"] and str(CAP) in body

    # closed clients: no connection left to the port, no thread left behind
    wait_until(lambda: not _open_connections(process, port), 15, "stream connections to close")
    wait_until(lambda: process.num_threads() <= baseline + 4, 20,
               f"API threads back near the baseline ({baseline})")
    # ... and every slot came back: the cap admits a full set again
    assert _first_event(url, job_id) == "submitted"
    service.cancel_job(job_id)
    wait_terminal(job_id)


def test_events_arrive_by_push_not_by_the_safety_poll(stream_api):
    url, _ = stream_api
    job_id = submit(200, stage_delay_s=0.1)
    wait_items(job_id, 1)
    arrived: dict[str, float] = {}
    with httpx.stream("GET", f"{url}/api/jobs/{job_id}/events", timeout=httpx.Timeout(10, read=20)) as response:
        lines = response.iter_lines()
        for event, _ in parse_sse(lines):
            if event == "item":
                break  # the stream is past its first read: what follows came by notification
        requested = time.monotonic()
        service.cancel_job(job_id, message="by push")
        for event, data in parse_sse(lines):
            arrived.setdefault(event, time.monotonic() - requested)
            if event == "end":
                assert data["message"] == "by push"
                break
    # the poll is 30 s here: anything within a couple of seconds was pushed
    assert arrived["cancel_requested"] < 2.0 and arrived["end"] < 5.0, arrived


def test_a_submit_wakes_the_streams_with_its_own_notification(stream_api, monkeypatch):
    """A submit's ``submitted`` event reaches an open ``/api/events`` stream by the notification
    the submit sends with its job's message; the commit hook hands the publisher thread none for it."""
    import uuid

    from tasks import notify
    from tasks.process import get_redis

    url, _ = stream_api
    notify.install()  # as in the API and the CLI
    handed: list[str] = []
    real = notify.notify_soon
    monkeypatch.setattr(notify, "notify_soon", lambda job_id, kind: (handed.append(job_id), real(job_id, kind)))
    queue = f"q-streams-{uuid.uuid4().hex[:8]}"  # no worker serves it: the submit is the job's only news
    submitted: dict[str, float] = {}
    with httpx.stream("GET", f"{url}/api/events", timeout=httpx.Timeout(10, read=20)) as response:
        lines = response.iter_lines()
        assert next(parse_sse(lines))[0] == "open"
        time.sleep(0.5)  # past the stream's first read: what follows came by notification (the poll is 30 s)
        requested = time.monotonic()
        job_id = service.submit_job(["One."], queue=queue).job_id
        for event, data in parse_sse(lines):
            if event == "submitted" and data["job_id"] == job_id:
                submitted[job_id] = time.monotonic() - requested
                break
    get_redis().delete(queue)
    assert submitted[job_id] < 2.0, submitted
    assert job_id not in handed


def test_the_stream_cap_answers_429_per_client_with_a_clear_detail(worker, monkeypatch):
    """In-process: the cap counts per client and gives the slot back when the stream ends."""
    from fastapi.testclient import TestClient

    from api import progress
    from api.app import app
    from db.settings import get_settings

    job_id = submit(1)
    wait_terminal(job_id)
    monkeypatch.setenv("ANDON_MAX_STREAMS", "1")
    get_settings.cache_clear()
    try:
        with TestClient(app) as client:
            release = progress.slots.take("testclient", 1)  # TestClient's client address
            assert release is not None
            refused = client.get(f"/api/jobs/{job_id}/events")
            assert refused.status_code == 429
            assert "too many open event streams" in refused.json()["detail"]
            release()
            done = client.get(f"/api/jobs/{job_id}/events")  # a finished job: the stream ends at once
            assert done.status_code == 200 and "event: end" in done.text
            assert json.loads(done.text.split("data: ")[-1])["status"] == "completed"
            assert progress.slots.open["testclient"] == 0
    finally:
        get_settings.cache_clear()


def test_notify_never_raises_and_goes_quiet_while_redis_is_away(monkeypatch):
    import redis

    from tasks import notify

    dead = redis.Redis(port=free_port(), socket_connect_timeout=0.5)
    monkeypatch.setattr(notify, "get_redis", lambda: dead)
    monkeypatch.setattr(notify, "_quiet_until", 0.0)
    notify.notify("some-job", "item")  # logged and swallowed
    started = time.monotonic()
    for _ in range(100):
        notify.notify("some-job", "item")  # quiet: no connect timeout per row while Redis is away
    assert time.monotonic() - started < 0.2
