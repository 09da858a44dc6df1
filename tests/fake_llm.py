"""A tiny OpenAI-compatible chat-completions server on a free localhost port, for tests."""

from __future__ import annotations

import json
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from mesh.recorder import completion

Responder = Callable[[dict[str, Any]], str]


@contextmanager
def fake_llm(respond: Responder, status: int = 200) -> Iterator[tuple[str, list[dict[str, Any]]]]:
    """Yields (base_url, requests seen). ``respond(request_json)`` returns the completion text."""
    seen: list[dict[str, Any]] = []

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
            seen.append(body)
            if status != 200:
                payload: dict[str, Any] = {"error": {"message": "boom", "type": "server_error"}}
            else:
                payload = completion(body, respond(body))  # the recording server's own reply shape
            data = json.dumps(payload).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def log_message(self, *args: Any) -> None:
            return None

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/v1", seen
    finally:
        server.shutdown()
        server.server_close()


@contextmanager
def fake_embeddings(encode: Callable[[list[str]], Any],
                    status: int = 200) -> Iterator[tuple[str, list[dict[str, Any]]]]:
    """An OpenAI-compatible ``/v1/embeddings`` server: yields (base_url, requests seen); ``encode(texts)`` gives the
    vectors (rows of floats)."""
    seen: list[dict[str, Any]] = []

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
            seen.append(body)
            if status != 200 or not self.path.endswith("/embeddings"):
                code, payload = (status if status != 200 else 404), {"error": {"message": "boom", "type": "error"}}
            else:
                texts = body["input"] if isinstance(body["input"], list) else [body["input"]]
                rows = [[float(x) for x in v] for v in encode(texts)]
                code, payload = 200, {"object": "list", "model": body["model"],
                                      "usage": {"prompt_tokens": 0, "total_tokens": 0},
                                      "data": [{"object": "embedding", "index": i, "embedding": v}
                                               for i, v in enumerate(rows)]}
            data = json.dumps(payload).encode()
            self.send_response(code)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def log_message(self, *args: Any) -> None:
            return None

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/v1", seen
    finally:
        server.shutdown()
        server.server_close()
