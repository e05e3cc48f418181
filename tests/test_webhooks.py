"""Signed webhooks, against a real HTTP receiver on 127.0.0.1 that each test starts, and a real worker
delivering them (its own queue, with the webhook secret and host list in its environment)."""

from __future__ import annotations

import hashlib
import hmac
import json
import threading
import time
import uuid
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
from sqlalchemy import select

from api import service
from api.supervisor import free_port
from db.models import Job, JobEvent
from db.session import session_scope
from db.settings import Settings, get_settings
from tasks.errors import InvalidInput
from tasks.webhooks import backoff_s, check_callback_url, sign
from tests.jobs_helpers import submit, wait_items, wait_terminal
from tests.procs import wait_for

SECRET = "whsec-test"


class Receiver:
    """An HTTP server that records every POST and answers from a script of statuses (the last one
    repeats); ``hang_s`` delays each answer; ``redirect_to`` answers 302 there."""

    def __init__(self, statuses=(200,), hang_s: float = 0.0, redirect_to: str | None = None) -> None:
        self.statuses, self.hang_s, self.redirect_to = list(statuses), hang_s, redirect_to
        self.requests: list[dict] = []
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):  # noqa: N802 (http.server's name)
                body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
                receiver.requests.append({"path": self.path, "headers": dict(self.headers), "body": body,
                                          "at": time.time()})
                time.sleep(receiver.hang_s)
                status = receiver.statuses[min(len(receiver.requests), len(receiver.statuses)) - 1]
                self.send_response(302 if receiver.redirect_to else status)
                if receiver.redirect_to:
                    self.send_header("Location", receiver.redirect_to)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.port = self.server.server_address[1]
        self.url = f"http://127.0.0.1:{self.port}/hooks/andon"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture(scope="module")
def hooks_worker(database, stopping_workers):
    """A worker that delivers webhooks: secret and hosts set, short backoff, at most 4 attempts."""
    from tests.conftest import HOME
    from tests.procs import WorkerProcess

    queue = f"q-hooks-{uuid.uuid4().hex[:6]}"
    env = {"ANDON_WEBHOOK_SECRET": SECRET, "ANDON_WEBHOOK_HOSTS": "127.0.0.1", "ANDON_WEBHOOK_QUEUE": queue,
           "ANDON_WEBHOOK_BACKOFF_S": "0.3", "ANDON_WEBHOOK_MAX_ATTEMPTS": "4", "ANDON_WEBHOOK_TIMEOUT_S": "1.5"}
    worker = WorkerProcess(queue, HOME / "logs", concurrency=2, env=env, extra_args=["-Q", queue]).start()
    worker.queue, worker.env = queue, env
    yield worker
    # its last deliveries may still be retrying (to receivers already closed): it stops in the
    # background, as a test's own worker does (tests/conftest.py stopping_workers)
    stopping_workers.append(threading.Thread(target=worker.stop, kwargs={"timeout": 20}, daemon=True))
    stopping_workers[-1].start()


@pytest.fixture
def webhooks_on(hooks_worker, monkeypatch):
    """This process (the API in-process, and the test's own cancels) with the same webhook settings."""
    for key, value in hooks_worker.env.items():
        monkeypatch.setenv(key, value)
    get_settings.cache_clear()
    yield hooks_worker
    for key in hooks_worker.env:
        monkeypatch.delenv(key)
    get_settings.cache_clear()


@pytest.fixture
def receiver():
    made: list[Receiver] = []

    def make(*args, **kwargs) -> Receiver:
        made.append(Receiver(*args, **kwargs))
        return made[-1]

    yield make
    for r in made:
        r.close()


def attempts(job_id: str) -> list[dict]:
    with session_scope() as session:
        return [e.detail for e in session.scalars(select(JobEvent).where(
            JobEvent.job_id == job_id, JobEvent.kind == "webhook_attempt").order_by(JobEvent.id))]


def verify(request: dict, secret: str = SECRET) -> dict:
    """What a receiver does: check the signature over the raw body, then trust the JSON."""
    timestamp = request["headers"]["X-Andon-Timestamp"]
    expected = "sha256=" + hmac.new(secret.encode(), f"{timestamp}.".encode() + request["body"],
                                    hashlib.sha256).hexdigest()
    assert hmac.compare_digest(request["headers"]["X-Andon-Signature"], expected)
    assert abs(time.time() - int(timestamp)) < 60  # fresh: a receiver rejects old ones (replays)
    return json.loads(request["body"])


def test_a_completed_job_posts_its_job_object_signed(webhooks_on, receiver, api_client):
    r = receiver()
    job_id = submit(2, queue=webhooks_on.queue, callback_url=r.url)
    job = wait_terminal(job_id)
    wait_for(lambda: r.requests, 20, what="the webhook")
    request = r.requests[0]
    headers = request["headers"]
    assert headers["X-Andon-Event"] == "job.completed" and headers["Content-Type"] == "application/json"
    uuid.UUID(headers["X-Andon-Delivery"])
    body = verify(request)
    # the body is exactly the job object GET /api/jobs/{id} returns
    assert body == api_client.get(f"/api/jobs/{job_id}").json()
    assert body["status"] == "completed" and request["path"] == "/hooks/andon"
    wait_for(lambda: attempts(job_id), 10, what="the attempt event")
    [attempt] = attempts(job_id)
    assert (attempt["attempt"], attempt["status"], attempt["error"], attempt["event"]) == (1, 200, None,
                                                                                           "job.completed")
    # sent after the terminal row was committed, never before
    assert request["at"] >= job.finished_at.timestamp() - 0.05


def test_a_receiver_answering_500_is_retried_with_backoff_until_it_succeeds(webhooks_on, receiver):
    r = receiver(statuses=[500, 503, 200])
    job_id = submit(200, stage_delay_s=0.02, queue=webhooks_on.queue, callback_url=r.url)
    wait_items(job_id, 2)
    service.cancel_job(job_id, message="enough")
    wait_terminal(job_id)
    wait_for(lambda: len(attempts(job_id)) == 3, 30, what="three attempts")
    assert [a["status"] for a in attempts(job_id)] == [500, 503, 200]
    assert [a["error"] for a in attempts(job_id)] == ["HTTP 500", "HTTP 503", None]
    assert all(a["retry_in_s"] > 0 for a in attempts(job_id)[:2]) and "retry_in_s" not in attempts(job_id)[2]
    assert len({req["headers"]["X-Andon-Delivery"] for req in r.requests}) == 1  # one delivery, three tries
    assert {req["headers"]["X-Andon-Event"] for req in r.requests} == {"job.cancelled"}
    gaps = [b["at"] - a["at"] for a, b in zip(r.requests, r.requests[1:])]
    assert gaps[0] >= 0.3 * 0.5 and gaps[1] >= 0.6 * 0.5, gaps  # the wait doubles (±50 % jitter)
    for request in r.requests:
        assert verify(request)["cancellation_message"] == "enough"
    time.sleep(1.5)
    assert len(r.requests) == 3  # a 2xx ends it


def test_retries_are_bounded(webhooks_on, receiver):
    r = receiver(statuses=[500])
    job_id = submit(1, queue=webhooks_on.queue, callback_url=r.url)
    wait_terminal(job_id)
    wait_for(lambda: len(attempts(job_id)) == 4, 30, what="four attempts")
    time.sleep(0.3 * 2 ** 4 * 1.5 + 0.5)  # longer than a fifth attempt's wait
    assert len(r.requests) == 4 and len(attempts(job_id)) == 4
    assert "retry_in_s" not in attempts(job_id)[-1]


def test_a_dead_or_hanging_receiver_never_delays_the_job(webhooks_on, receiver):
    hanging = receiver(hang_s=10)
    dead_url = f"http://127.0.0.1:{free_port()}/nobody"
    plain = submit(3, queue=webhooks_on.queue)
    baseline = wait_terminal(plain)
    started = time.monotonic()
    hung = submit(3, queue=webhooks_on.queue, callback_url=hanging.url)
    dead = submit(3, queue=webhooks_on.queue, callback_url=dead_url)
    for job_id in (hung, dead):
        assert wait_terminal(job_id).status == "completed"
    assert time.monotonic() - started < 5  # neither waited for its receiver
    run = lambda job: (job.finished_at - job.started_at).total_seconds()  # noqa: E731
    assert run(wait_terminal(hung)) < run(baseline) + 1.0
    # the hanging delivery gives up at its timeout (1.5 s) and is retried; the dead one at once
    wait_for(lambda: attempts(hung) and attempts(dead), 15, what="first attempts")
    assert "Timeout" in attempts(hung)[0]["error"] and attempts(hung)[0]["elapsed_ms"] < 4000
    assert "ConnectError" in attempts(dead)[0]["error"]
    # and jobs submitted meanwhile still run at once
    after = submit(2, queue=webhooks_on.queue)
    assert wait_terminal(after, timeout=10).status == "completed"


def test_queued_jobs_cancelled_one_by_one_or_in_bulk_send_their_webhooks(webhooks_on, receiver):
    r = receiver()
    nobody = f"q-nobody-{uuid.uuid4().hex[:6]}"  # no worker serves it: the jobs stay queued
    one = submit(1, queue=nobody, callback_url=r.url)
    tag = f"hooks-{uuid.uuid4().hex[:6]}"
    bulk = [submit(1, queue=nobody, callback_url=r.url, tags=[tag]) for _ in range(3)]
    silent = submit(1, queue=nobody, tags=[tag])  # no callback_url: nothing is sent
    assert service.cancel_job(one).status.value == "cancelled"
    assert service.cancel_matching(tag=tag).cancelled == 4
    wait_for(lambda: len(r.requests) == 4, 60, what="four webhooks")
    seen = {verify(req)["job_id"]: req["headers"]["X-Andon-Event"] for req in r.requests}
    assert seen == {job_id: "job.cancelled" for job_id in [one, *bulk]}
    time.sleep(0.5)
    assert len(r.requests) == 4 and not attempts(silent)


def test_redirects_are_not_followed(webhooks_on, receiver):
    target = receiver()
    r = receiver(statuses=[200], redirect_to=target.url)
    job_id = submit(1, queue=webhooks_on.queue, callback_url=r.url)
    wait_terminal(job_id)
    wait_for(lambda: attempts(job_id), 15, what="an attempt")
    assert attempts(job_id)[0]["status"] == 302 and "not followed" in attempts(job_id)[0]["error"]
    assert target.requests == []


def test_callback_url_is_a_422_unless_the_secret_and_the_host_allow_it(api_client, monkeypatch):
    def post(url):
        return api_client.post("/api/jobs", json={"documents": ["x"], "callback_url": url})

    off = post("http://127.0.0.1:9/hook")  # no secret, no hosts: webhooks are off
    assert off.status_code == 422 and off.json()["detail"][0]["loc"] == ["body", "callback_url"]
    assert "ANDON_WEBHOOK_SECRET" in off.text
    monkeypatch.setenv("ANDON_WEBHOOK_SECRET", SECRET)
    monkeypatch.setenv("ANDON_WEBHOOK_HOSTS", "hooks.example.com,127.0.0.1:9")
    get_settings.cache_clear()
    try:
        for url, needle in [("http://169.254.169.254/latest/meta-data", "not in ANDON_WEBHOOK_HOSTS"),
                            ("http://127.0.0.1:10/hook", "not in ANDON_WEBHOOK_HOSTS"),
                            ("file:///etc/passwd", "only http and https"),
                            ("gopher://hooks.example.com/", "only http and https"),
                            ("http://user:pw@hooks.example.com/", "credentials"),
                            ("http://hooks.example.com.evil.net/", "not in ANDON_WEBHOOK_HOSTS"),
                            ("http://hooks.example.com:notaport/", "not a URL")]:
            refused = post(url)
            assert refused.status_code == 422 and needle in refused.text, (url, refused.text)
            assert refused.json()["detail"][0]["loc"] == ["body", "callback_url"]
        for url in ("https://hooks.example.com/andon", "http://HOOKS.example.com:8080/x", "http://127.0.0.1:9/hook"):
            check_callback_url(url)
    finally:
        monkeypatch.delenv("ANDON_WEBHOOK_SECRET")
        monkeypatch.delenv("ANDON_WEBHOOK_HOSTS")
        get_settings.cache_clear()


def test_the_url_is_checked_again_at_delivery_time():
    """Hosts removed from the list (or the secret unset) after submit: the attempt is refused."""
    allowed = Settings(webhook_secret=SECRET, webhook_hosts="hooks.example.com")
    check_callback_url("https://hooks.example.com/x", allowed)
    for later in (Settings(webhook_secret=SECRET, webhook_hosts="other.example.com"),
                  Settings(webhook_secret=None, webhook_hosts="hooks.example.com")):
        with pytest.raises(InvalidInput):
            check_callback_url("https://hooks.example.com/x", later)


def test_the_readme_receiver_snippet_verifies_a_real_delivery(webhooks_on, receiver):
    from tests.test_client import readme_block

    namespace: dict = {}
    exec(compile(readme_block("import hashlib, hmac, time"), "README.md", "exec"), namespace)
    r = receiver()
    wait_terminal(submit(1, queue=webhooks_on.queue, callback_url=r.url))
    wait_for(lambda: r.requests, 15, what="the webhook")
    request = r.requests[0]
    assert namespace["verify"](SECRET, request["headers"], request["body"]) is True
    assert namespace["verify"]("another-secret", request["headers"], request["body"]) is False
    assert namespace["verify"](SECRET, request["headers"], request["body"] + b" ") is False


def test_signature_and_backoff_are_as_documented():
    body = b'{"job_id":"x"}'
    assert sign("k", "1700000000", body) == "sha256=" + hmac.new(
        b"k", b"1700000000." + body, hashlib.sha256).hexdigest()
    settings = Settings(webhook_backoff_s=5)
    waits = [backoff_s(n, settings) for n in range(1, 8)]
    assert all(5 * 2 ** (n - 1) * 0.5 <= w <= 5 * 2 ** (n - 1) * 1.5 for n, w in zip(range(1, 8), waits))


def test_a_batch_takes_callback_urls_checked_as_a_single_submit_checks_them(webhooks_on, receiver, api_client):
    r = receiver()
    tag = f"hooks-batch-{uuid.uuid4().hex[:6]}"
    bad = api_client.post("/api/jobs/batch", json={"jobs": [{"documents": ["One."]},
                                                            {"documents": ["One."], "callback_url": "ftp://x/"}]})
    assert bad.status_code == 422 and bad.json()["detail"][0]["loc"] == ["body", "jobs", 1, "callback_url"]
    answer = api_client.post("/api/jobs/batch", json={"jobs": [
        {"documents": ["One."], "tags": [tag], "callback_url": r.url}, {"documents": ["One."], "tags": [tag]}]})
    assert answer.status_code == 202
    hooked, silent = answer.json()["job_ids"]
    # the rows hold what a single submit stores (both are made by db.jobs.create_jobs); delivery is the
    # terminal transition's, tested above — here the jobs may end on the suite's default worker, which
    # has no webhook settings, so the test doesn't wait for one
    with session_scope() as session:
        assert session.get(Job, hooked).callback_url == r.url and session.get(Job, silent).callback_url is None
    service.cancel_matching(tag=tag)
