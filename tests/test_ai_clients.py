"""The AI endpoint clients against a real local OpenAI-compatible server, through the real ``openai``
client: ``stream_chat`` (async stages), the ``usage`` of LLM answers, and ``embed_texts``.

No Redis, no worker: only tokens, asyncio tasks and :class:`tests.llm_server.LLMServer`.
"""

from __future__ import annotations

import asyncio
import math
import threading
import time

import pytest

from api.stack import free_port
from db.settings import get_settings
from db.vocabulary import CancellationReason, CancellationSource
from tasks.cancellation import CancellationToken
from tasks.embeddings import EmbeddingError, embed_texts
from tasks.errors import CancellationError
from tasks.llm import ChatReply, LLMError, StreamCancelled, analyze_llm, stream_chat
from tasks.stages import embed, parse
from tests.llm_server import LLMServer, count_words, fake_embedding

WORDS = [f"word{i}" for i in range(50)]
MESSAGES = [{"role": "system", "content": "Answer briefly."}, {"role": "user", "content": "Why cancel streams?"}]


def chat(server_or_url: LLMServer | str, **kwargs) -> ChatReply:
    url = server_or_url if isinstance(server_or_url, str) else server_or_url.base_url
    kwargs.setdefault("timeout_s", 10.0)
    return asyncio.run(stream_chat(MESSAGES, base_url=url, model="test-model", api_key="test-key", **kwargs))


async def wait_until(condition, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "condition never held"
        await asyncio.sleep(0.005)


def cancel_mid_stream(server: LLMServer, when, on_cancel, then_s: float = 0.0) -> tuple[float, float]:
    """Run stream_chat as a task, ``task.cancel()`` it ``then_s`` after ``when()`` holds; return
    (cancelled_at, raised_at)."""

    async def main() -> tuple[float, float]:
        task = asyncio.create_task(stream_chat(MESSAGES, base_url=server.base_url, model="test-model",
                                               api_key="test-key", timeout_s=30, on_cancel=on_cancel))
        await wait_until(when)
        await asyncio.sleep(then_s)
        cancelled_at = time.monotonic()
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        return cancelled_at, time.monotonic()

    return asyncio.run(main())


# --- stream_chat: the async streaming helper for any stage ------------------------------------------


def test_stream_chat_returns_the_whole_answer_with_the_servers_usage():
    with LLMServer(words=WORDS[:20], delay_s=0.005) as server:
        reply = chat(server, temperature=0.2)
    assert reply.text == " ".join(WORDS[:20])
    assert (reply.finish_reason, reply.cut_short) == ("stop", False)
    assert reply.usage == {"prompt_tokens": count_words(MESSAGES), "completion_tokens": 20,
                           "cut_short": False, "estimated": False}
    assert reply.as_dict() == {"text": reply.text, "finish_reason": "stop", "cut_short": False, "usage": reply.usage}
    [record] = server.requests
    assert record.completed and not record.disconnected
    assert record.body["stream"] is True and record.body["stream_options"] == {"include_usage": True}
    assert record.body["temperature"] == 0.2 and record.body["messages"] == MESSAGES


def test_cancelling_the_task_mid_stream_hangs_up_at_once_and_keeps_the_partial_answer():
    got: list[ChatReply] = []
    with LLMServer(words=WORDS, delay_s=0.1) as server:
        # the server has sent three words when the condition holds, the client may not have read the
        # third yet (it failed so once, on a busy box): half a word's delay later it has, and the
        # fourth is not sent yet
        cancelled_at, raised_at = cancel_mid_stream(
            server, lambda: server.requests and server.requests[0].tokens_sent >= 3, got.append, then_s=0.05)
        record = server.wait_for_disconnect(timeout=1.0)

    assert raised_at - cancelled_at < 0.1, f"CancelledError {raised_at - cancelled_at:.3f}s after cancel()"
    assert record is not None, "server never saw the client disconnect"
    assert record.disconnected_at - cancelled_at < 0.1, "server saw the disconnect late"
    assert not record.completed and record.tokens_sent < len(WORDS)
    [reply] = got
    received = reply.usage["completion_tokens"]
    assert 3 <= received <= record.tokens_sent
    assert reply.text == " ".join(WORDS[:received])
    assert (reply.cut_short, reply.finish_reason) == (True, None)
    prompt_chars = sum(len(m["content"]) for m in MESSAGES)
    assert reply.usage == {"prompt_tokens": math.ceil(prompt_chars / 4), "completion_tokens": received,
                           "cut_short": True, "estimated": True}


def test_cancelling_while_waiting_for_the_first_byte_does_not_wait_for_it():
    got: list[ChatReply] = []
    with LLMServer(mode="hang") as server:
        cancelled_at, raised_at = cancel_mid_stream(server, lambda: bool(server.requests), got.append)
    assert raised_at - cancelled_at < 0.1
    [reply] = got
    assert reply.text == "" and reply.cut_short and reply.usage["completion_tokens"] == 0


def test_a_failing_on_cancel_never_replaces_the_cancellation():
    def broken(reply: ChatReply) -> None:
        raise RuntimeError("boom")

    with LLMServer(words=WORDS, delay_s=0.05) as server:
        cancel_mid_stream(server, lambda: server.requests and server.requests[0].tokens_sent >= 1, broken)


@pytest.mark.parametrize(("mode", "match"), [
    ("error500", "answered HTTP 500: simulated server failure"),
    ("error400", "answered HTTP 400: simulated bad request"),
    ("truncate", "ended the stream before the answer was finished"),
])
def test_stream_chat_endpoint_failures_are_llm_errors(mode, match):
    with LLMServer(mode=mode, delay_s=0.0) as server:
        with pytest.raises(LLMError, match=match) as caught:
            chat(server)
        assert len(server.requests) == 1  # no retries
    assert str(caught.value).startswith(f"LLM endpoint {server.base_url} ") and "\n" not in str(caught.value)


def test_stream_chat_silent_endpoint_times_out():
    with LLMServer(mode="hang") as server:
        started = time.monotonic()
        with pytest.raises(LLMError, match=r"timed out \(no data for 0.5s\)"):
            chat(server, timeout_s=0.5)
        assert time.monotonic() - started < 3


def test_stream_chat_connection_refused_is_an_llm_error():
    with pytest.raises(LLMError, match="connection failed: .*[Cc]onnection refused"):
        chat(f"http://127.0.0.1:{free_port()}/v1")


def test_stream_chat_defaults_come_from_the_llm_settings(monkeypatch):
    with LLMServer(words=["hi"], delay_s=0.0) as server:
        monkeypatch.setenv("ANDON_LLM_BASE_URL", server.base_url)
        monkeypatch.setenv("ANDON_LLM_MODEL", "settings-model")
        get_settings.cache_clear()
        try:
            reply = asyncio.run(stream_chat([{"role": "user", "content": "hello"}]))
        finally:
            get_settings.cache_clear()
    assert reply.text == "hi"
    assert server.requests[0].body["model"] == "settings-model"


# --- the sync llm analyzer records usage too -----------------------------------------------------


DOC = embed(parse("Cancellation tokens stop pipelines. Pipelines stream tokens from models. Models cost money."))


def test_analyze_llm_records_the_servers_usage():
    with LLMServer(words=WORDS[:5], delay_s=0.0) as server:
        result = analyze_llm(DOC, CancellationToken("job-usage"), base_url=server.base_url, model="m",
                             api_key="k", timeout_s=10)
    prompt = count_words(server.requests[0].body["messages"])
    assert result["usage"] == {"prompt_tokens": prompt, "completion_tokens": 5, "cut_short": False,
                               "estimated": False}
    assert result["summary"] == " ".join(WORDS[:5]) and result["tokens_received"] == 5


def test_analyze_llm_cancelled_mid_stream_estimates_usage_from_the_chunks():
    token = CancellationToken("job-usage-cut")
    with LLMServer(words=WORDS, delay_s=0.05) as server:
        threading.Thread(target=cancel_when, args=(token, lambda: server.requests
                                                   and server.requests[0].tokens_sent >= 3), daemon=True).start()
        with pytest.raises(StreamCancelled) as caught:
            analyze_llm(DOC, token, base_url=server.base_url, model="m", api_key="k", timeout_s=10)
    usage = caught.value.partial["usage"]
    assert usage["cut_short"] is True and usage["estimated"] is True
    assert usage["completion_tokens"] == caught.value.partial["tokens_received"] >= 3
    assert usage["prompt_tokens"] > 0


def cancel_when(token: CancellationToken, condition, timeout: float = 10.0) -> float:
    deadline = time.monotonic() + timeout
    while not condition() and time.monotonic() < deadline:
        time.sleep(0.005)
    at = time.monotonic()
    token.cancel(CancellationReason.USER_REQUESTED, "stop please", CancellationSource.API)
    return at


# --- embed_texts ------------------------------------------------------------------------------------


def embed(server_or_url: LLMServer | str, texts: list[str], **kwargs) -> list[list[float]]:
    url = server_or_url if isinstance(server_or_url, str) else server_or_url.base_url
    kwargs.setdefault("timeout_s", 10.0)
    return embed_texts(texts, base_url=url, model="embed-model", api_key="test-key", **kwargs)


def test_embeddings_come_back_in_input_order_with_the_servers_dimension():
    texts = ["alpha", "beta gamma", "delta", "", "alpha"]
    with LLMServer(dim=16) as server:  # the server lists vectors in reverse: order comes from "index"
        vectors = embed(server, texts)
    assert vectors == [fake_embedding(text, 16) for text in texts]
    assert all(len(vector) == 16 for vector in vectors) and vectors[0] == vectors[4] != vectors[2]
    [record] = server.requests
    assert record.path == "/v1/embeddings" and record.completed
    assert record.body == {"model": "embed-model", "input": texts, "encoding_format": "float"}


def test_a_batch_is_one_request():
    texts = [f"document number {i}" for i in range(300)]
    with LLMServer(dim=4) as server:
        vectors = embed(server, texts, token=CancellationToken("job-batch"))
    assert vectors == [fake_embedding(text, 4) for text in texts]
    assert len(server.requests) == 1


def test_no_texts_sends_nothing():
    with LLMServer() as server:
        assert embed(server, []) == []
        assert server.requests == []


def test_embeddings_defaults_come_from_the_embeddings_settings(monkeypatch):
    with LLMServer(dim=3) as server:
        monkeypatch.setenv("ANDON_EMBEDDINGS_BASE_URL", server.base_url)
        monkeypatch.setenv("ANDON_EMBEDDINGS_MODEL", "settings-embedder")
        get_settings.cache_clear()
        try:
            assert embed_texts(["x"]) == [fake_embedding("x", 3)]
        finally:
            get_settings.cache_clear()
    assert server.requests[0].body["model"] == "settings-embedder"


@pytest.mark.parametrize(("mode", "match"), [
    ("error500", "answered HTTP 500: simulated server failure"),
    ("error400", "answered HTTP 400: simulated bad request"),
    ("malformed", "answered malformed data: "),
    ("truncate", "answered 2 vectors for 3 inputs"),
])
def test_embeddings_endpoint_failures_are_one_line_embedding_errors(mode, match):
    with LLMServer(mode=mode) as server:
        with pytest.raises(EmbeddingError, match=match) as caught:
            embed(server, ["a", "b", "c"])
        assert len(server.requests) == 1  # no retries
    message = str(caught.value)
    assert message.startswith(f"embeddings endpoint {server.base_url} ") and "\n" not in message


def test_silent_embeddings_endpoint_times_out():
    with LLMServer(mode="hang") as server:
        started = time.monotonic()
        with pytest.raises(EmbeddingError, match=r"timed out \(no data for 0.5s\)"):
            embed(server, ["a"], timeout_s=0.5)
        assert time.monotonic() - started < 3


def test_embeddings_connection_refused_is_an_embedding_error():
    url = f"http://127.0.0.1:{free_port()}/v1"
    with pytest.raises(EmbeddingError, match=f"embeddings endpoint {url} connection failed: Connection refused"):
        embed(url, ["a"])


def test_a_cancel_mid_request_hangs_up_and_raises_the_tokens_error():
    token = CancellationToken("job-embed")
    fired: dict = {}
    with LLMServer(embed_delay_s=5.0) as server:  # a slow batch: the answer is 5 s away
        thread = threading.Thread(target=lambda: fired.update(at=cancel_when(token, lambda: bool(server.requests))),
                                  daemon=True)
        thread.start()
        with pytest.raises(CancellationError) as caught:
            embed(server, ["a", "b"], token=token)
        raised_at = time.monotonic()
        record = server.wait_for_disconnect(timeout=1.0)
    thread.join(timeout=5)
    assert raised_at - fired["at"] < 0.2, f"raised {raised_at - fired['at']:.3f}s after cancel"
    assert (caught.value.job_id, caught.value.reason) == ("job-embed", CancellationReason.USER_REQUESTED)
    assert caught.value.message == "stop please" and caught.value.source is CancellationSource.API
    assert record is not None and not record.completed, "server never saw the client disconnect"
    assert record.disconnected_at - fired["at"] < 0.2
    assert not token.callback_errors


def test_an_already_cancelled_token_sends_nothing():
    token = CancellationToken("job-embed-pre")
    token.cancel(CancellationReason.TIMEOUT, source=CancellationSource.DEADLINE)
    with LLMServer() as server:
        with pytest.raises(CancellationError) as caught:
            embed(server, ["a"], token=token)
        assert server.requests == []
    assert caught.value.reason is CancellationReason.TIMEOUT
