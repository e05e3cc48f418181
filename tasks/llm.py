"""Clients for OpenAI-compatible endpoints, and the ``llm`` analyzer built on them.

The ``llm`` analyzer summarises a document by streaming the answer. Streaming is what makes the
stage cancellable mid-answer: a cancel hangs up the connection from the cancelling thread, so the job
stops within milliseconds instead of after the whole answer, and a server that honours disconnects
stops generating. Honest limit: whatever the server generated before it noticed (and the prompt it
already processed) is still paid for; a server that ignores disconnects generates on until its next
write fails.

:func:`stream_chat` is the same for async stages: there the cancel is the asyncio task's
cancellation, and it hangs up the connection before anything else runs. :func:`cancellable_client`
and :func:`endpoint_error` are shared with :mod:`tasks.embeddings`.

Every answer records ``usage`` ``{prompt_tokens, completion_tokens, cut_short, estimated}``: the
server's own count when it sends one (asked for with ``stream_options.include_usage``), else — as
always when the client hung up — completion tokens counted from the stream's content chunks and
prompt tokens estimated as characters / 4, with ``estimated`` true. No tokenizer is downloaded.
"""

from __future__ import annotations

import asyncio
import logging
import math
import os
import socket
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from typing import Any, TypeVar

from db.settings import get_settings
from tasks.cancellation import CancellationToken
from tasks.errors import AndonError, CancellationError, LLMError
from tasks.stages import analyze_local

log = logging.getLogger(__name__)
E = TypeVar("E", bound=AndonError)

CANCELLED_MARKER = "\n\n[Response cancelled]"
SYSTEM_PROMPT = "Summarise the document the user sends in two or three sentences. Reply with the summary only."


class StreamCancelled(CancellationError):
    """The token was cancelled mid-answer. ``partial`` keeps what arrived, marked as cut off."""

    def __init__(self, job_id, reason, message=None, source=None, cancelled_at=None, partial=None) -> None:
        super().__init__(job_id, reason, message, source, cancelled_at)
        self.partial: dict[str, Any] = partial or {}

    def __reduce__(self):  # keep ``partial`` when pickled between pool processes
        return (type(self), (self.job_id, self.reason, self.message, self.source, self.cancelled_at, self.partial))


class _Hangup:
    """Hangs up one request's connection from any thread.

    It uses ``shutdown()``, not ``close()``: closing a socket's descriptor does not wake a read
    blocked on it in another thread (it waits for the next chunk), shutting it down does, at once.
    httpcore's ``trace`` hook hands over the socket as soon as it connects (so a slow *first* token
    is cancellable too) and says when the response is about to close, when the socket is dropped
    under the lock, so a late cancel never touches a closed (or reused) descriptor and is a no-op.
    ``attach`` is the hook for a sync client, ``attach_async`` for an async one (httpx awaits the
    hooks of an async client, and httpcore its ``trace``).
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._sock: socket.socket | None = None
        self._fired = False

    def attach(self, request: Any) -> None:  # httpx "request" event hook
        request.extensions["trace"] = self._trace

    async def attach_async(self, request: Any) -> None:
        request.extensions["trace"] = self._atrace

    async def _atrace(self, event: str, info: dict[str, Any]) -> None:
        self._trace(event, info)

    def _trace(self, event: str, info: dict[str, Any]) -> None:
        if event == "connection.connect_tcp.complete":
            with self._lock:
                self._sock = info["return_value"].get_extra_info("socket")
                if self._fired:  # cancelled while connecting
                    self._shutdown()
        elif event == "http11.response_closed.started":
            self.forget()

    def fire(self, _token: CancellationToken | None = None) -> None:  # the token callback
        with self._lock:
            self._fired = True
            self._shutdown()

    def forget(self) -> None:
        with self._lock:
            self._sock = None

    def _shutdown(self) -> None:
        if self._sock is not None:
            try:
                self._sock.shutdown(socket.SHUT_RDWR)
            except OSError:  # already gone
                pass


@contextmanager
def cancellable_client(
    token: CancellationToken | None, *, base_url: str, api_key: str, timeout_s: float
) -> Iterator[Any]:
    """An ``openai.OpenAI`` client whose request a cancel of ``token`` hangs up, from any thread.

    Raises the token's error at once if it is already cancelled (nothing is sent). After the hang-up
    the request fails with a connection error; the caller checks ``token.is_cancelled`` to tell the
    two apart. No retries: a retry would silently double the time and the bill. ``timeout_s``
    bounds each wait for data, not the whole request.
    """
    import openai  # about a second to import; only jobs calling an endpoint pay for it

    hangup = _Hangup()
    if token is not None:
        token.register_callback(hangup.fire)  # the token can't unregister; after forget() it's a no-op
        if token.is_cancelled:
            raise token.error()
    client = openai.OpenAI(
        base_url=base_url,
        api_key=api_key,
        max_retries=0,
        timeout=timeout_s,
        http_client=openai.DefaultHttpxClient(event_hooks={"request": [hangup.attach]}),
    )
    try:
        yield client
    finally:
        hangup.forget()
        client.close()


@dataclass
class ChatReply:
    """One streamed chat answer: whole, or as far as it got (``cut_short``) when cancelled."""

    text: str
    finish_reason: str | None
    cut_short: bool
    usage: dict[str, Any]

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


class _Answer:
    """A streamed answer as it arrives: its content chunks, finish reason and the server's usage."""

    def __init__(self, messages: list[dict[str, Any]]) -> None:
        self.messages = messages
        self.parts: list[str] = []
        self.finish_reason: str | None = None
        self.server_usage: Any = None

    def feed(self, chunk: Any) -> None:
        for choice in chunk.choices or ():
            if choice.delta is not None and choice.delta.content:
                self.parts.append(choice.delta.content)
            if choice.finish_reason is not None:
                self.finish_reason = choice.finish_reason
        if getattr(chunk, "usage", None) is not None:  # the last chunk, when asked for and not hung up
            self.server_usage = chunk.usage

    @property
    def text(self) -> str:
        return "".join(self.parts)

    def usage(self, *, cut_short: bool) -> dict[str, Any]:
        server = self.server_usage
        if server is not None and server.prompt_tokens is not None and server.completion_tokens is not None:
            return {"prompt_tokens": server.prompt_tokens, "completion_tokens": server.completion_tokens,
                    "cut_short": cut_short, "estimated": False}
        return {"prompt_tokens": estimate_prompt_tokens(self.messages), "completion_tokens": len(self.parts),
                "cut_short": cut_short, "estimated": True}

    def reply(self, *, cut_short: bool) -> ChatReply:
        return ChatReply(self.text, self.finish_reason, cut_short, self.usage(cut_short=cut_short))

    def check_finished(self, base_url: str) -> None:
        if self.finish_reason is None:
            raise LLMError(f"LLM endpoint {base_url} ended the stream before the answer was finished")


def estimate_prompt_tokens(messages: list[dict[str, Any]]) -> int:
    """About one token per four characters of the messages' text (no tokenizer: andon runs offline)."""
    chars = 0
    for message in messages:
        content = message.get("content")
        if isinstance(content, str):
            chars += len(content)
        elif isinstance(content, list):  # content parts: count the text ones
            chars += sum(len(part.get("text") or "") for part in content if isinstance(part, dict))
    return math.ceil(chars / 4)


def analyze_llm(
    embedded: dict[str, Any],
    token: CancellationToken,
    *,
    base_url: str,
    model: str,
    api_key: str,
    timeout_s: float = 60.0,
) -> dict[str, Any]:
    """Summarise ``embedded["text"]`` with the model, token by token, until done or cancelled.

    Raises the token's :class:`CancellationError` if cancelled before the request (nothing is sent),
    :class:`StreamCancelled` (with the partial answer and its estimated ``usage``) if cancelled
    after, :class:`LLMError` if the endpoint fails. No retries. ``timeout_s`` bounds each wait for
    data, not the whole answer (the job's own time limit does that).
    """
    import openai

    started = time.monotonic()
    messages = [{"role": "system", "content": SYSTEM_PROMPT}, {"role": "user", "content": embedded["text"]}]
    answer = _Answer(messages)

    def result(cut_short: bool) -> dict[str, Any]:
        elapsed = round(time.monotonic() - started, 3)
        return {"summary": answer.text, "tokens_received": len(answer.parts), "elapsed_s": elapsed, "model": model,
                "usage": answer.usage(cut_short=cut_short)}

    with cancellable_client(token, base_url=base_url, api_key=api_key, timeout_s=timeout_s) as client:
        try:
            with client.chat.completions.create(model=model, messages=messages, stream=True,
                                                stream_options={"include_usage": True}) as stream:
                for chunk in stream:
                    answer.feed(chunk)
        except Exception as exc:
            if token.is_cancelled:  # the hang-up surfaces as a read/connection error
                raise _cancelled(token, result(cut_short=True)) from exc
            if isinstance(exc, openai.OpenAIError):
                raise _llm_error(exc, base_url, timeout_s) from exc
            raise
    if token.is_cancelled:  # e.g. a close-delimited stream just ends when hung up
        raise _cancelled(token, result(cut_short=True))
    answer.check_finished(base_url)
    return {**result(cut_short=False), "keywords": analyze_local(embedded)["keywords"], "cancelled": False}


async def stream_chat(
    messages: list[dict[str, Any]],
    *,
    base_url: str | None = None,
    model: str | None = None,
    api_key: str | None = None,
    timeout_s: float | None = None,
    on_cancel: Callable[[ChatReply], Any] | None = None,
    **create_kwargs: Any,
) -> ChatReply:
    """Stream a chat answer from an OpenAI-compatible endpoint, for any async stage.

    Unset arguments come from the ``ANDON_LLM_*`` settings; ``create_kwargs`` go to
    ``chat.completions.create`` (``temperature``, ``max_tokens``, ...). Cancelling the asyncio task
    (how andon stops an async stage) shuts the connection down before anything else runs, so the
    server sees the disconnect at once; then ``on_cancel(reply)`` gets the answer so far
    (``cut_short`` true, ``usage`` estimated) and ``CancelledError`` goes on up. ``on_cancel`` is a
    plain function; an exception from it is logged, never raised in place of the cancellation.
    An endpoint failure raises :class:`LLMError`. No retries; ``timeout_s`` bounds each wait for data.
    Honest limit: a second ``cancel()`` while the client closes can leave its pool to the garbage
    collector (the socket itself is already shut down).
    """
    import openai

    settings = get_settings()
    base_url = base_url or settings.llm_base_url
    model = model or settings.llm_model
    api_key = api_key or settings.llm_api_key
    timeout_s = settings.llm_timeout_s if timeout_s is None else timeout_s
    stream_options = {"include_usage": True, **(create_kwargs.pop("stream_options", None) or {})}
    hangup = _Hangup()
    client = openai.AsyncOpenAI(
        base_url=base_url,
        api_key=api_key,
        max_retries=0,
        timeout=timeout_s,
        http_client=openai.DefaultAsyncHttpxClient(event_hooks={"request": [hangup.attach_async]}),
    )
    answer = _Answer(messages)
    ended = False
    try:
        try:
            stream = await client.chat.completions.create(
                model=model, messages=messages, stream=True, stream_options=stream_options, **create_kwargs)
            async for chunk in stream:
                answer.feed(chunk)
            ended = True
        except asyncio.CancelledError:
            hangup.fire()  # first, with no await before it: the server sees the disconnect now
            raise
        except (openai.OpenAIError, ValueError) as exc:
            raise _llm_error(exc, base_url, timeout_s) from exc
        finally:
            hangup.forget()
            await client.close()
    except asyncio.CancelledError:  # also a cancel landing while the client closes
        if on_cancel is not None:
            try:
                on_cancel(answer.reply(cut_short=not ended))
            except Exception:  # the cancellation must win
                log.exception("stream_chat on_cancel callback failed")
        raise
    answer.check_finished(base_url)
    return answer.reply(cut_short=False)


def _cancelled(token: CancellationToken, partial: dict[str, Any]) -> StreamCancelled:
    first = token.first_request
    assert first is not None
    partial = {**partial, "summary": partial["summary"] + CANCELLED_MARKER, "cancelled": True}
    return StreamCancelled(token.job_id, first.reason, first.message, first.source, first.at, partial)


def endpoint_error(exc: Exception, error: type[E], label: str, base_url: str, timeout_s: float) -> E:
    """One line naming the endpoint and what went wrong, as ``error`` ("<label> endpoint <url> ...")."""
    import openai

    where = f"{label} endpoint {base_url}"
    if isinstance(exc, openai.APIStatusError):
        body = exc.body
        detail = body.get("message") if isinstance(body, dict) and body.get("message") else exc.message
        return error(f"{where} answered HTTP {exc.status_code}: {detail}")
    if isinstance(exc, openai.APITimeoutError):
        return error(f"{where} timed out (no data for {timeout_s:g}s)")
    if isinstance(exc, openai.APIConnectionError):
        return error(f"{where} connection failed: {_root_cause(exc)}")
    if isinstance(exc, ValueError):  # a body that is not JSON, or not the JSON promised
        return error(f"{where} answered malformed data: {exc}")
    return error(f"{where} failed: {exc}")


def _root_cause(exc: BaseException) -> str:
    """The innermost cause, readably: the async client wraps "Connection refused" three levels deep."""
    for _ in range(10):
        inner = exc.__cause__ or exc.__context__
        if inner is None:
            break
        exc = inner
    if isinstance(exc, OSError) and exc.errno and exc.errno > 0:  # not gaierror's negative codes
        return f"{os.strerror(exc.errno)} (errno {exc.errno})"
    return str(exc) or type(exc).__name__


def _llm_error(exc: Exception, base_url: str, timeout_s: float) -> LLMError:
    return endpoint_error(exc, LLMError, "LLM", base_url, timeout_s)
