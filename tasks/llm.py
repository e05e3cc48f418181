"""The ``llm`` analyzer: summarise a document by streaming from an OpenAI-compatible endpoint.

Streaming is what makes the stage cancellable mid-answer: a cancel hangs up the connection from the
cancelling thread, so the job stops within milliseconds instead of after the whole answer, and a
server that honours disconnects stops generating. Honest limit: whatever the server generated
before it noticed (and the prompt it already processed) is still paid for; a server that ignores
disconnects generates on until its next write fails.
"""

from __future__ import annotations

import socket
import threading
import time
from typing import Any

from tasks.cancellation import CancellationToken
from tasks.errors import AndonError, CancellationError
from tasks.stages import analyze_local

CANCELLED_MARKER = "\n\n[Response cancelled]"
SYSTEM_PROMPT = "Summarise the document the user sends in two or three sentences. Reply with the summary only."


class LLMError(AndonError):
    """The endpoint failed (unreachable, HTTP error status, timeout): this item fails, the job goes on."""


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
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._sock: socket.socket | None = None
        self._fired = False

    def attach(self, request: Any) -> None:  # httpx "request" event hook
        request.extensions["trace"] = self._trace

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
    :class:`StreamCancelled` (with the partial answer) if cancelled after, :class:`LLMError` if the
    endpoint fails. No retries: a retry would silently double the time and the bill. ``timeout_s``
    bounds each wait for data, not the whole answer (the job's own time limit does that).
    """
    import openai  # about a second to import; only jobs using this analyzer pay for it

    hangup = _Hangup()
    token.register_callback(hangup.fire)  # the token can't unregister; after forget() it's a no-op
    if token.is_cancelled:
        raise token.error()
    started = time.monotonic()
    client = openai.OpenAI(
        base_url=base_url,
        api_key=api_key,
        max_retries=0,
        timeout=timeout_s,
        http_client=openai.DefaultHttpxClient(event_hooks={"request": [hangup.attach]}),
    )
    parts: list[str] = []
    finished = False

    def result() -> dict[str, Any]:
        elapsed = round(time.monotonic() - started, 3)
        return {"summary": "".join(parts), "tokens_received": len(parts), "elapsed_s": elapsed, "model": model}

    try:
        messages = [{"role": "system", "content": SYSTEM_PROMPT}, {"role": "user", "content": embedded["text"]}]
        with client.chat.completions.create(model=model, messages=messages, stream=True) as stream:
            for chunk in stream:
                for choice in chunk.choices:
                    if choice.delta.content:
                        parts.append(choice.delta.content)
                    finished = finished or choice.finish_reason is not None
    except Exception as exc:
        if token.is_cancelled:  # the hang-up surfaces as a read/connection error
            raise _cancelled(token, result()) from exc
        if isinstance(exc, openai.OpenAIError):
            raise _llm_error(exc, base_url, timeout_s) from exc
        raise
    finally:
        hangup.forget()
        client.close()
    if token.is_cancelled:  # e.g. a close-delimited stream just ends when hung up
        raise _cancelled(token, result())
    if not finished:
        raise LLMError(f"LLM endpoint {base_url} ended the stream before the answer was finished")
    return {**result(), "keywords": analyze_local(embedded)["keywords"], "cancelled": False}


def _cancelled(token: CancellationToken, partial: dict[str, Any]) -> StreamCancelled:
    first = token.first_request
    assert first is not None
    partial = {**partial, "summary": partial["summary"] + CANCELLED_MARKER, "cancelled": True}
    return StreamCancelled(token.job_id, first.reason, first.message, first.source, first.at, partial)


def _llm_error(exc: Exception, base_url: str, timeout_s: float) -> LLMError:
    import openai

    if isinstance(exc, openai.APIStatusError):
        body = exc.body
        detail = body.get("message") if isinstance(body, dict) and body.get("message") else exc.message
        return LLMError(f"LLM endpoint {base_url} answered HTTP {exc.status_code}: {detail}")
    if isinstance(exc, openai.APITimeoutError):
        return LLMError(f"LLM endpoint {base_url} timed out (no data for {timeout_s:g}s)")
    if isinstance(exc, openai.APIConnectionError):
        return LLMError(f"LLM endpoint {base_url} connection failed: {exc.__cause__ or exc}")
    return LLMError(f"LLM endpoint {base_url} failed: {exc}")
