"""An OpenAI-compatible chat-completions server that records every prompt it is sent.

Evaluations point chat_ai at it (``OPENAI_BASE_URL``) to capture the exact prompt the model gets. Without an
upstream it answers every request with a fixed short text; with one (an OpenAI-compatible base URL and key) it
forwards the request unchanged, returns the model's reply and records both. Only ``POST .../chat/completions``
is served. The server runs in a thread of its own (stdlib ``http.server``), so it never competes with the
caller's event loop.
"""

from __future__ import annotations

import json
import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from types import TracebackType
from typing import Any

FIXED_REPLY = "[recording server]"


@dataclass(slots=True)
class Record:
    """One chat-completions request and what was answered."""

    request: dict[str, Any]
    reply: str
    status: int
    received_at: float
    upstream: bool
    error: str | None = None
    latency_ms: float = 0.0

    @property
    def messages(self) -> list[dict[str, Any]]:
        value = self.request.get("messages")
        return [m for m in value if isinstance(m, dict)] if isinstance(value, list) else []

    @property
    def last_user(self) -> str | None:
        """The content of the last user message (what the prompt asks)."""
        for m in reversed(self.messages):
            if m.get("role") == "user":
                content = m.get("content")
                return content if isinstance(content, str) else json.dumps(content)
        return None


@dataclass
class RecordingServer:
    """``with RecordingServer() as rec: ... rec.url`` (a base URL ending in ``/v1``)."""

    upstream_url: str | None = None  # forward to this OpenAI-compatible base URL (…/v1); None: answer FIXED_REPLY
    upstream_key: str | None = None
    timeout_s: float = 120.0
    fixed_reply: str = FIXED_REPLY
    records: list[Record] = field(default_factory=list)

    def __post_init__(self) -> None:
        self._lock = threading.Lock()
        self._server: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None
        self._client: Any = None

    @property
    def url(self) -> str:
        assert self._server is not None, "the server is not started"
        return f"http://127.0.0.1:{self._server.server_address[1]}/v1"

    @property
    def proxying(self) -> bool:
        return self.upstream_url is not None

    def start(self) -> RecordingServer:
        if self.upstream_url:
            import httpx

            self._client = httpx.Client(timeout=self.timeout_s)
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), _handler(self))
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, name="recorder", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None
        if self._client is not None:
            self._client.close()
            self._client = None

    def __enter__(self) -> RecordingServer:
        return self.start()

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.stop()

    def count(self) -> int:
        with self._lock:
            return len(self.records)

    def find(self, last_user: str, since: int = 0) -> Record | None:
        """The latest record from index ``since`` on whose last user message is ``last_user``."""
        with self._lock:
            candidates = self.records[since:]
        return next((r for r in reversed(candidates) if r.last_user == last_user), None)

    # ------------------------------------------------------------------ serving
    def answer(self, body: dict[str, Any]) -> tuple[int, dict[str, Any], Record]:
        started = time.perf_counter()
        if self._client is None:
            payload = completion(body, self.fixed_reply)
            record = Record(body, self.fixed_reply, 200, time.time(), upstream=False)
        else:
            status, payload, error = self._forward(body)
            record = Record(body, reply_text(payload), status, time.time(), upstream=True, error=error)
        record.latency_ms = round((time.perf_counter() - started) * 1000, 2)
        with self._lock:
            self.records.append(record)
        return record.status, payload, record

    def _forward(self, body: dict[str, Any]) -> tuple[int, dict[str, Any], str | None]:
        headers = {"Authorization": f"Bearer {self.upstream_key}"} if self.upstream_key else {}
        try:
            resp = self._client.post(f"{str(self.upstream_url).rstrip('/')}/chat/completions", json=body,
                                     headers=headers)
        except Exception as exc:  # noqa: BLE001 - any transport failure becomes a 502 for chat_ai
            return 502, {"error": {"message": f"upstream unreachable: {type(exc).__name__}",
                                   "type": "upstream_error"}}, f"{type(exc).__name__}: {exc}"
        try:
            payload = resp.json()
        except ValueError:
            payload = {"error": {"message": resp.text[:500], "type": "upstream_error"}}
        if not isinstance(payload, dict):
            payload = {"error": {"message": "upstream sent no JSON object", "type": "upstream_error"}}
        error = None if resp.status_code == 200 else json.dumps(payload.get("error", payload))[:500]
        return resp.status_code, payload, error


def completion(request: dict[str, Any], text: str) -> dict[str, Any]:
    """A minimal ``chat.completion`` object answering ``text``."""
    return {
        "id": "cmpl-recorder", "object": "chat.completion", "created": int(time.time()),
        "model": str(request.get("model") or "recorder"),
        "choices": [{"index": 0, "finish_reason": "stop", "message": {"role": "assistant", "content": text}}],
        "usage": {"prompt_tokens": 0, "completion_tokens": 0, "total_tokens": 0},
    }


def reply_text(payload: dict[str, Any]) -> str:
    try:
        return str(payload["choices"][0]["message"]["content"] or "")
    except (KeyError, IndexError, TypeError):
        return ""


def _handler(server: RecordingServer) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def do_POST(self) -> None:
            if not self.path.rstrip("/").endswith("/chat/completions"):
                self._send(404, {"error": {"message": f"no route {self.path}", "type": "not_found"}})
                return
            try:
                body = json.loads(self.rfile.read(int(self.headers.get("Content-Length") or 0)) or b"{}")
                if not isinstance(body, dict):
                    raise ValueError("not an object")
            except ValueError as exc:
                self._send(400, {"error": {"message": f"bad request body: {exc}", "type": "invalid_request"}})
                return
            status, payload, _ = server.answer(body)
            self._send(status, payload)

        def _send(self, status: int, payload: dict[str, Any]) -> None:
            data = json.dumps(payload).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def log_message(self, *args: Any) -> None:
            return None  # prompts hold user text: never logged

    return Handler
