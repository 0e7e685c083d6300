"""A scripted OpenAI-compatible HTTP server on 127.0.0.1 for offline tests with the real `openai` client.

    def respond(path, body):                      # path "/v1/chat/completions", body = the parsed JSON request
        return 200, {}, chat_response("hello")    # (status, headers, json-able body | str | bytes)

    with FakeOpenAI(respond) as server:
        client = OpenAI(base_url=server.base_url, api_key="test")
        ...
        server.requests                           # every request: {"path", "body", "headers"} in arrival order
                                                  # (header names lower-cased)

`respond` runs on the server's worker threads (one per connection), so it must be thread-safe; it may sleep
to simulate a slow server. `scripted([...])` answers from a fixed list in arrival order, and the
`*_response` helpers build bodies in the shapes the OpenAI API returns.
"""
from __future__ import annotations

import json
import sys
import threading
import time
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

Reply = tuple[int, dict, object]
Respond = Callable[[str, dict], Reply]


def _usage(prompt_tokens: int, completion_tokens: int) -> dict:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def chat_response(text: str, prompt_tokens: int = 10, completion_tokens: int = 5, finish_reason: str = "stop",
                  model: str = "gpt-3.5-turbo") -> dict:
    """A /v1/chat/completions body with one assistant message."""
    return {"id": "chatcmpl-fake", "object": "chat.completion", "created": int(time.time()), "model": model,
            "choices": [{"index": 0, "finish_reason": finish_reason,
                         "message": {"role": "assistant", "content": text}}],
            "usage": _usage(prompt_tokens, completion_tokens)}


def completion_response(text: str, prompt_tokens: int = 10, completion_tokens: int = 5, finish_reason: str = "stop",
                        model: str = "gpt-3.5-turbo-instruct") -> dict:
    """A /v1/completions body with one choice."""
    return {"id": "cmpl-fake", "object": "text_completion", "created": int(time.time()), "model": model,
            "choices": [{"index": 0, "text": text, "finish_reason": finish_reason, "logprobs": None}],
            "usage": _usage(prompt_tokens, completion_tokens)}


def embedding_response(vectors: list[list[float]], prompt_tokens: int = 8,
                       model: str = "text-embedding-3-small") -> dict:
    """A /v1/embeddings body, one vector per input in input order."""
    return {"object": "list", "model": model,
            "data": [{"object": "embedding", "index": i, "embedding": list(v)} for i, v in enumerate(vectors)],
            "usage": {"prompt_tokens": prompt_tokens, "total_tokens": prompt_tokens}}


def error_response(status: int, message: str = "scripted error", retry_after: float | None = None) -> Reply:
    """An OpenAI-style error reply, with a Retry-After header when given (seconds)."""
    headers = {} if retry_after is None else {"Retry-After": str(retry_after)}
    kind = "rate_limit_exceeded" if status == 429 else "server_error"
    return status, headers, {"error": {"message": message, "type": kind, "code": kind}}


def scripted(replies: list[Reply]) -> Respond:
    """A `respond` that returns `replies` one by one in arrival order (thread-safe); fails loudly when exhausted."""
    lock = threading.Lock()
    pending = list(replies)

    def respond(path: str, body: dict) -> Reply:
        with lock:
            if not pending:
                return 599, {}, {"error": {"message": f"fakeopenai: no scripted reply left for {path}"}}
            return pending.pop(0)
    return respond


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive, as the openai client (httpx) expects

    def do_POST(self):  # noqa: N802 (http.server's naming)
        raw = self.rfile.read(int(self.headers.get("Content-Length") or 0))
        try:
            body = json.loads(raw) if raw else {}
        except json.JSONDecodeError:
            body = {"_raw": raw.decode("utf-8", "replace")}
        server: FakeOpenAI = self.server.fake  # type: ignore[attr-defined]
        server._record(self.path, body, {k.lower(): v for k, v in self.headers.items()})
        try:
            status, headers, payload = server.respond(self.path, body)
        except Exception as e:  # a broken test script should show up as a 500 with the reason, not a hang
            status, headers, payload = 500, {}, {"error": {"message": f"fakeopenai respond() raised {e!r}"}}
        if isinstance(payload, bytes):
            data, ctype = payload, "application/octet-stream"
        elif isinstance(payload, str):
            data, ctype = payload.encode(), "text/plain"
        else:
            data, ctype = json.dumps(payload).encode(), "application/json"
        self.send_response(status)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(data)))
        for k, v in headers.items():
            self.send_header(k, str(v))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, format, *args):  # noqa: A002 (keep test output quiet)
        pass


class _Server(ThreadingHTTPServer):
    daemon_threads = True  # a handler still sleeping at shutdown must not keep the test process alive

    def handle_error(self, request, client_address):
        # a client that timed out and hung up is expected in retry tests; anything else is a real error
        if not isinstance(sys.exc_info()[1], (BrokenPipeError, ConnectionResetError)):
            super().handle_error(request, client_address)


class FakeOpenAI:
    """Threaded scripted server; use as a context manager. `requests` records every POST in arrival order."""

    def __init__(self, respond: Respond):
        self.respond = respond
        self.requests: list[dict] = []
        self._lock = threading.Lock()
        self._httpd = _Server(("127.0.0.1", 0), _Handler)
        self._httpd.fake = self  # type: ignore[attr-defined]
        self._thread = threading.Thread(target=self._httpd.serve_forever, daemon=True)

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self._httpd.server_address[1]}/v1"

    def _record(self, path: str, body: dict, headers: dict) -> None:
        with self._lock:
            self.requests.append({"path": path, "body": body, "headers": headers})

    def paths(self) -> list[str]:
        with self._lock:
            return [r["path"] for r in self.requests]

    def start(self) -> FakeOpenAI:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._httpd.shutdown()
        self._httpd.server_close()

    def __enter__(self) -> FakeOpenAI:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
