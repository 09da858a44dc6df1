"""Tiny OpenAI-compatible servers on a free localhost port, for tests: chat completions and embeddings."""

from __future__ import annotations

import json
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from mesh.recorder import completion

Responder = Callable[[dict[str, Any]], str]
Reply = Callable[[str, dict[str, Any]], tuple[int, dict[str, Any]]]  # (path, request json) -> (status, json)


@contextmanager
def _serve(reply: Reply) -> Iterator[tuple[str, list[dict[str, Any]]]]:
    """Yields (base_url, requests seen); each POST is answered by ``reply``."""
    seen: list[dict[str, Any]] = []

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
            seen.append(body)
            status, payload = reply(self.path, body)
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


BOOM = {"error": {"message": "boom", "type": "server_error"}}


@contextmanager
def fake_llm(respond: Responder, status: int = 200) -> Iterator[tuple[str, list[dict[str, Any]]]]:
    """Yields (base_url, requests seen). ``respond(request_json)`` returns the completion text."""
    def reply(_path: str, body: dict[str, Any]) -> tuple[int, dict[str, Any]]:
        # the recording server's own reply shape
        return (status, BOOM) if status != 200 else (200, completion(body, respond(body)))

    with _serve(reply) as served:
        yield served


@contextmanager
def fake_embeddings(encode: Callable[[list[str]], Any],
                    status: int = 200) -> Iterator[tuple[str, list[dict[str, Any]]]]:
    """An OpenAI-compatible ``/v1/embeddings`` server: yields (base_url, requests seen); ``encode(texts)`` gives the
    vectors (rows of floats)."""
    def reply(path: str, body: dict[str, Any]) -> tuple[int, dict[str, Any]]:
        if status != 200 or not path.endswith("/embeddings"):
            return (status if status != 200 else 404), BOOM
        texts = body["input"] if isinstance(body["input"], list) else [body["input"]]
        rows = [[float(x) for x in v] for v in encode(texts)]
        return 200, {"object": "list", "model": body["model"], "usage": {"prompt_tokens": 0, "total_tokens": 0},
                     "data": [{"object": "embedding", "index": i, "embedding": v} for i, v in enumerate(rows)]}

    with _serve(reply) as served:
        yield served
