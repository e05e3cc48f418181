"""A small OpenAI-compatible server for tests: real HTTP and SSE on 127.0.0.1.

``POST /v1/chat/completions`` with ``stream: true`` sends ``words`` one chunk each, ``delay_s``
apart, in OpenAI's chunk format over chunked HTTP/1.1 (as Ollama and vLLM do); when the request
asks for ``stream_options.include_usage`` a last chunk with no choices carries ``usage``, as OpenAI
sends it. ``POST /v1/embeddings`` answers after ``embed_delay_s`` with :func:`fake_embedding`
vectors of ``dim`` floats, one per input. Each request is recorded (``server.requests``), with how
many tokens were written and whether, and when, the client went away mid-request — which is what a
cancel must cause.

``mode`` simulates a broken endpoint: ``"error500"``, ``"error400"``, ``"hang"`` (never answer,
so the client times out) or ``"truncate"`` (chat: end the body cleanly but with no finish chunk and
no ``[DONE]``, as a cut close-delimited stream looks; embeddings: one vector fewer than inputs);
``"malformed"`` answers embeddings with 200 and a body cut off mid-JSON (chat ignores it).
Bounded: it listens on 127.0.0.1 only and stops when the context exits.
"""

from __future__ import annotations

import hashlib
import json
import select
import socket
import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

MODES = ("stream", "truncate", "error500", "error400", "hang", "malformed")


def fake_embedding(text: str, dim: int) -> list[float]:
    """A deterministic vector for ``text``: ``dim`` floats in [-1, 1) from its SHA-256."""
    digest = b""
    while len(digest) < 2 * dim:
        digest += hashlib.sha256(digest[-32:] + text.encode()).digest()
    return [int.from_bytes(digest[2 * i:2 * i + 2], "big") / 32768 - 1 for i in range(dim)]


def count_words(messages: list[dict[str, Any]]) -> int:
    """The server's "tokenizer": one token per whitespace-separated word of the messages."""
    return sum(len(str(m.get("content") or "").split()) for m in messages)


@dataclass
class RequestRecord:
    body: dict[str, Any]
    path: str = "/v1/chat/completions"
    started_at: float = field(default_factory=time.monotonic)
    tokens_sent: int = 0
    completed: bool = False
    #: The client closed its end (EOF/reset seen while waiting, or a failed write) before [DONE].
    disconnected: bool = False
    disconnected_at: float | None = None
    disconnect_seen_by: str | None = None  # "eof", "reset" or "write"


class _Disconnected(Exception):
    def __init__(self, how: str) -> None:
        self.how = how


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: _Server

    def log_message(self, format: str, *args: Any) -> None:  # keep pytest output clean
        pass

    def do_POST(self) -> None:
        length = int(self.headers.get("Content-Length") or 0)
        body = json.loads(self.rfile.read(length) or b"{}")
        owner = self.server.owner
        path = self.path.rstrip("/")
        record = RequestRecord(body=body, path=path)
        with owner.lock:
            owner.requests.append(record)
        mode = owner.mode
        if path not in ("/v1/chat/completions", "/v1/embeddings"):
            return self._json(404, {"error": {"message": f"no route {self.path}", "type": "not_found"}})
        if mode == "error500":
            return self._json(500, {"error": {"message": "simulated server failure", "type": "server_error"}})
        if mode == "error400":
            return self._json(400, {"error": {"message": "simulated bad request", "type": "invalid_request_error"}})
        if mode == "hang":
            owner.stopping.wait()  # never answer; the client's timeout must fire
            self.close_connection = True
            return None
        try:
            if path == "/v1/embeddings":
                self._embeddings(record, body)
            else:
                self._stream(record, body)
        except _Disconnected as gone:
            record.disconnected, record.disconnected_at = True, time.monotonic()
            record.disconnect_seen_by = gone.how
            self.close_connection = True

    def _json(self, status: int, payload: dict[str, Any]) -> None:
        self._raw(status, json.dumps(payload).encode())

    def _raw(self, status: int, data: bytes) -> None:
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.send_header("Connection", "close")
        self.end_headers()
        self.wfile.write(data)

    def _embeddings(self, record: RequestRecord, body: dict[str, Any]) -> None:
        owner = self.server.owner
        self._wait(owner.embed_delay_s)
        inputs = body.get("input")
        texts = [inputs] if isinstance(inputs, str) else list(inputs or [])
        if owner.mode == "malformed":
            return self._raw(200, b'{"object": "list", "data": [{"embedding": [0.1, ')
        if owner.mode == "truncate":
            texts = texts[:-1]
        data = [{"object": "embedding", "index": i, "embedding": fake_embedding(text, owner.dim)}
                for i, text in enumerate(texts)]
        data.reverse()  # clients must order by "index", not by position
        usage = {"prompt_tokens": sum(len(t.split()) for t in texts), "total_tokens": sum(len(t.split()) for t in texts)}
        self._json(200, {"object": "list", "data": data, "model": body.get("model", "test-model"), "usage": usage})
        record.completed = True

    def _stream(self, record: RequestRecord, body: dict[str, Any]) -> None:
        owner = self.server.owner
        model = body.get("model", "test-model")
        include_usage = bool((body.get("stream_options") or {}).get("include_usage"))
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.send_header("Cache-Control", "no-cache")
        self.send_header("Transfer-Encoding", "chunked")
        self.send_header("Connection", "close")
        self.end_headers()
        created = int(time.time())

        def chunk(delta: dict[str, Any], finish: str | None = None) -> dict[str, Any]:
            return {"id": "chatcmpl-test", "object": "chat.completion.chunk", "created": created, "model": model,
                    "choices": [{"index": 0, "delta": delta, "finish_reason": finish}]}

        self._send_event(chunk({"role": "assistant", "content": ""}))
        for i, word in enumerate(owner.words):
            self._wait(owner.delay_s)
            self._send_event(chunk({"content": word if i == 0 else " " + word}))
            record.tokens_sent += 1
        if owner.mode != "truncate":
            self._send_event(chunk({}, "stop"))
            if include_usage:
                prompt_tokens = count_words(body.get("messages") or [])
                usage = {"prompt_tokens": prompt_tokens, "completion_tokens": record.tokens_sent,
                         "total_tokens": prompt_tokens + record.tokens_sent}
                self._send_event({"id": "chatcmpl-test", "object": "chat.completion.chunk", "created": created,
                                  "model": model, "choices": [], "usage": usage})
            self._send(b"data: [DONE]\n\n")
        self._send(b"")  # the last, empty chunk ends the body
        record.completed = True

    def _send_event(self, payload: dict[str, Any]) -> None:
        self._send(b"data: " + json.dumps(payload).encode() + b"\n\n")

    def _send(self, data: bytes) -> None:
        try:
            self.wfile.write(b"%x\r\n%s\r\n" % (len(data), data))
            self.wfile.flush()
        except (BrokenPipeError, ConnectionResetError) as exc:
            raise _Disconnected("write") from exc

    def _wait(self, delay_s: float) -> None:
        """Sleep between tokens, but notice at once if the client hangs up meanwhile.

        The client sends nothing after its request, so the socket turning readable means EOF or a
        reset: it has gone. Without this, a disconnect shows only on a later write.
        """
        deadline = time.monotonic() + delay_s
        while (left := deadline - time.monotonic()) > 0 and not self.server.owner.stopping.is_set():
            readable, _, _ = select.select([self.connection], [], [], min(left, 0.05))
            if readable:
                try:
                    if self.connection.recv(1, socket.MSG_PEEK) == b"":
                        raise _Disconnected("eof")
                except ConnectionResetError as exc:
                    raise _Disconnected("reset") from exc
                time.sleep(min(left, 0.01))  # unexpected bytes from the client: ignore them


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    owner: LLMServer


class LLMServer:
    """``with LLMServer(words=[...], delay_s=0.05) as server: server.base_url`` → http://127.0.0.1:PORT/v1"""

    def __init__(self, words: list[str] | None = None, delay_s: float = 0.05, mode: str = "stream", *,
                 dim: int = 8, embed_delay_s: float = 0.0) -> None:
        self.words = list(words) if words is not None else "the quick brown fox jumps over the lazy dog".split()
        self.delay_s = delay_s
        self.dim = dim
        self.embed_delay_s = embed_delay_s
        self.mode = mode
        self.requests: list[RequestRecord] = []
        self.lock = threading.Lock()
        self.stopping = threading.Event()
        self._httpd: _Server | None = None
        self._thread: threading.Thread | None = None

    @property
    def port(self) -> int:
        assert self._httpd is not None, "server not started"
        return self._httpd.server_address[1]

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

    def __enter__(self) -> LLMServer:
        assert self.mode in MODES, f"unknown mode {self.mode!r}"
        self._httpd = _Server(("127.0.0.1", 0), _Handler)
        self._httpd.owner = self
        self._thread = threading.Thread(target=self._httpd.serve_forever, kwargs={"poll_interval": 0.05},
                                        name="llm-test-server", daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stopping.set()  # wakes "hang" handlers and token waits
        assert self._httpd is not None and self._thread is not None
        self._httpd.shutdown()
        self._httpd.server_close()
        self._thread.join(timeout=5)

    def wait_for_disconnect(self, timeout: float = 1.0) -> RequestRecord | None:
        """The last request once its client has been seen to disconnect, or None after ``timeout``."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.requests and self.requests[-1].disconnected:
                return self.requests[-1]
            time.sleep(0.01)
        return None
