"""The LLM analyze stage against a real streaming HTTP server, through the real ``openai`` client.

No Redis, no worker: only a token, the stage and :class:`tests.llm_server.LLMServer`.
"""

from __future__ import annotations

import pickle
import threading
import time

import pytest

from api.stack import free_port
from db.vocabulary import CancellationReason, CancellationSource
from tasks.cancellation import CancellationToken
from tasks.errors import CancellationError
from tasks.llm import CANCELLED_MARKER, LLMError, StreamCancelled, analyze_llm
from tasks.stages import embed, parse
from tests.llm_server import LLMServer

DOC = embed(parse("Cancellation tokens stop pipelines. Pipelines stream tokens from models. Models cost money."))
WORDS = [f"word{i}" for i in range(50)]


def run(server: LLMServer, token: CancellationToken, timeout_s: float = 10.0) -> dict:
    return analyze_llm(DOC, token, base_url=server.base_url, model="test-model", api_key="test-key",
                       timeout_s=timeout_s)


def cancel_later(server: LLMServer, token: CancellationToken, after_s: float) -> tuple[threading.Thread, dict]:
    """Cancel ``token`` from another thread ``after_s`` after the server got the request.

    Timed from the request, not from the call: the first call in a process spends a good part of a
    second importing and building the client. ``fired["at"]`` is when cancel() began.
    """
    fired: dict = {}

    def fire() -> None:
        deadline = time.monotonic() + 10
        while not server.requests and time.monotonic() < deadline:
            time.sleep(0.005)
        time.sleep(after_s)
        fired["at"] = time.monotonic()
        token.cancel(CancellationReason.USER_REQUESTED, "stop please", CancellationSource.API)

    thread = threading.Thread(target=fire, daemon=True)
    thread.start()
    return thread, fired


def run_until_cancelled(server: LLMServer, after_s: float, timeout_s: float = 10.0) -> tuple[StreamCancelled, float]:
    """Run the stage, cancel it ``after_s`` into the request; return the error and cancel→raised latency."""
    token = CancellationToken("job-llm")
    thread, fired = cancel_later(server, token, after_s)
    with pytest.raises(StreamCancelled) as caught:
        run(server, token, timeout_s)
    raised_at = time.monotonic()
    thread.join(timeout=5)
    assert not token.callback_errors
    return caught.value, raised_at - fired["at"]


def test_full_stream_returns_whole_text_and_token_count():
    with LLMServer(words=WORDS[:20], delay_s=0.01) as server:
        result = run(server, CancellationToken("job-full"))
    assert result["summary"] == " ".join(WORDS[:20])
    assert result["tokens_received"] == 20
    assert result["cancelled"] is False
    assert result["model"] == "test-model"
    assert result["elapsed_s"] > 0
    assert result["keywords"] and all(isinstance(k, str) for k in result["keywords"])
    [record] = server.requests
    assert record.completed and not record.disconnected and record.tokens_sent == 20
    assert record.body["stream"] is True and record.body["model"] == "test-model"
    assert record.body["messages"][-1]["content"] == DOC["text"]


def test_cancel_mid_stream_keeps_partial_text_and_hangs_up():
    with LLMServer(words=WORDS, delay_s=0.1) as server:
        error, latency = run_until_cancelled(server, after_s=0.3)
        record = server.wait_for_disconnect(timeout=1.0)

    assert latency < 0.2, f"stream closed {latency:.3f}s after cancel"
    assert error.reason is CancellationReason.USER_REQUESTED
    assert error.message == "stop please" and error.source is CancellationSource.API
    partial = error.partial
    assert partial["cancelled"] is True and partial["model"] == "test-model"
    assert partial["summary"].endswith(CANCELLED_MARKER)
    received = partial["tokens_received"]
    assert 0 < received < len(WORDS)
    assert partial["summary"] == " ".join(WORDS[:received]) + CANCELLED_MARKER
    assert 0.3 <= partial["elapsed_s"] < 2.0

    assert record is not None, "server never saw the client disconnect"
    assert not record.completed and received <= record.tokens_sent < len(WORDS)
    assert pickle.loads(pickle.dumps(error)).partial == partial  # survives the pool's pickling


def test_cancel_does_not_wait_for_the_next_slow_token():
    """One token per second, cancel half-way between two: waiting for the next chunk would take 0.5 s."""
    with LLMServer(words=WORDS[:5], delay_s=1.0) as server:
        error, latency = run_until_cancelled(server, after_s=1.5)
        record = server.wait_for_disconnect(timeout=1.0)
    assert latency < 0.2, f"stream closed {latency:.3f}s after cancel"
    assert error.partial["tokens_received"] == 1
    assert error.partial["summary"] == WORDS[0] + CANCELLED_MARKER
    assert record is not None and record.tokens_sent == 1


def test_cancel_while_waiting_for_the_first_byte():
    """A long prompt can keep the server silent for a while; a cancel must not wait for it."""
    with LLMServer(mode="hang") as server:
        error, latency = run_until_cancelled(server, after_s=0.3, timeout_s=30)
    assert latency < 0.2, f"request abandoned {latency:.3f}s after cancel"
    assert error.partial["tokens_received"] == 0
    assert error.partial["summary"] == CANCELLED_MARKER


def test_already_cancelled_token_sends_nothing():
    token = CancellationToken("job-pre")
    token.cancel(CancellationReason.TIMEOUT, source=CancellationSource.DEADLINE)
    with LLMServer() as server:
        with pytest.raises(CancellationError) as caught:
            run(server, token)
        assert not isinstance(caught.value, StreamCancelled)
        assert caught.value.reason is CancellationReason.TIMEOUT
        assert server.requests == []


@pytest.mark.parametrize(("mode", "status", "detail"), [
    ("error500", 500, "simulated server failure"),
    ("error400", 400, "simulated bad request"),
])
def test_http_error_status_is_an_llm_error(mode, status, detail):
    with LLMServer(mode=mode) as server:
        with pytest.raises(LLMError, match=f"answered HTTP {status}: {detail}") as caught:
            run(server, CancellationToken("job-err"))
        assert len(server.requests) == 1  # no retries
    assert server.base_url in str(caught.value)


def test_connection_refused_is_an_llm_error():
    url = f"http://127.0.0.1:{free_port()}/v1"  # nothing listens there any more
    with pytest.raises(LLMError, match="connection failed: .*[Cc]onnection refused"):
        analyze_llm(DOC, CancellationToken("job-refused"), base_url=url, model="m", api_key="k", timeout_s=5)


def test_silent_endpoint_times_out():
    with LLMServer(mode="hang") as server:
        started = time.monotonic()
        with pytest.raises(LLMError, match=r"timed out \(no data for 0.5s\)"):
            run(server, CancellationToken("job-hang"), timeout_s=0.5)
        assert time.monotonic() - started < 3


def test_stream_cut_before_the_end_is_an_llm_error():
    with LLMServer(words=WORDS[:3], delay_s=0.01, mode="truncate") as server:
        with pytest.raises(LLMError, match="ended the stream before the answer was finished"):
            run(server, CancellationToken("job-cut"))


# --- the stage inside a real job, on a real prefork worker ------------------------------------------


def test_a_job_cancelled_mid_stream_keeps_the_partial_answer(start_worker):
    from api import service
    from tests.jobs_helpers import submit, wait_terminal
    from tests.procs import wait_for

    with LLMServer(words=[f"w{i}" for i in range(200)], delay_s=0.05) as server:
        w = start_worker(concurrency=1, ANDON_LLM_BASE_URL=server.base_url, ANDON_LLM_MODEL="test-model")
        job_id = submit(3, queue=w.queue, options={"analyzer": "llm"})
        wait_for(lambda: server.requests and server.requests[0].tokens_sent >= 10, 30, what="tokens streaming")
        service.cancel_job(job_id, message="enough tokens")
        job = wait_terminal(job_id)
        assert (job.status, job.cancellation_reason) == ("cancelled", "user_requested")
        assert server.wait_for_disconnect(timeout=2.0) is not None
        partial = service.partial_results(job_id)
        assert partial.completed_items == 0 and partial.failed_items == [] and len(partial.interrupted_items) == 1
        cut = partial.interrupted_items[0]  # in flight when cancelled: not failed, resumable, answer kept
        assert cut.stage == "analyze" and cut.partial["summary"].endswith("[Response cancelled]")
        assert cut.partial["usage"]["cut_short"] is True
        usage = service.get_job(job_id).usage  # the job's totals count the cut answer, estimated
        assert usage.cut_short_items == 1 and usage.estimated and usage.completion_tokens == cut.partial["tokens_received"]
        assert 10 <= cut.partial["tokens_received"] < 200 and cut.partial["elapsed_s"] > 0


def test_endpoint_errors_fail_their_items_with_the_cause(start_worker):
    from api import service
    from tests.jobs_helpers import docs, submit, wait_terminal

    with LLMServer(words=["fine", "answer"], delay_s=0.0) as server:
        w = start_worker(concurrency=1, ANDON_LLM_BASE_URL=server.base_url)
        documents = docs(2) + ["   "]
        job_id = submit(documents=documents, queue=w.queue, options={"analyzer": "llm"})
        assert wait_terminal(job_id).status == "completed"
        server.mode = "error500"
        failing = submit(documents=docs(3), queue=w.queue, options={"analyzer": "llm"})
        job = wait_terminal(failing)
        assert job.status == "failed" and job.failed_items == 3  # every item failed, each with the cause
        errors = [f.error for f in service.partial_results(failing).failed_items]
        assert all("HTTP 500" in e for e in errors)
