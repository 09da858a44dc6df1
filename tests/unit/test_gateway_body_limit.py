"""GATEWAY_MAX_BODY_BYTES holds for a chunked body (no Content-Length) too: the app in process, over httpx's ASGI
transport, which hands a generator body to the app chunk by chunk, as uvicorn does a chunked request's."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from types import SimpleNamespace

import httpx

from services.gateway.app import create_app
from services.gateway.config import GatewaySettings
from shared.contracts import Names

ADMIN = "admin-key-0123"
LIMIT = 4096
KEY = {"X-API-Key": ADMIN, "Content-Type": "application/json"}
JSON = {"Content-Type": "application/json"}


def client() -> httpx.AsyncClient:
    app = create_app(GatewaySettings(gateway_api_keys=f"{ADMIN}=admin", gateway_max_body_bytes=LIMIT,
                                     max_content_bytes=2048), Names())
    app.state.bus = SimpleNamespace()  # no bus: what is asked here is answered before one is needed
    return httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://gateway")


def chunked(body: bytes, size: int = 1000) -> AsyncIterator[bytes]:
    async def chunks() -> AsyncIterator[bytes]:
        for i in range(0, len(body), size):
            yield body[i:i + size]
    return chunks()


def chat(content: str) -> bytes:
    return json.dumps({"user_id": "u", "content": content}, ensure_ascii=False).encode()


def error(resp: httpx.Response) -> tuple[int, str, str]:
    body = resp.json()["error"]
    return resp.status_code, body["code"], body["message"]


async def test_a_chunked_body_over_the_limit_is_a_413_before_anything_else() -> None:
    async with client() as c:
        over = chat("x" * 10_000)
        for headers in (KEY, JSON):  # with a key or without: the body is refused
            resp = await c.post("/v1/chat", content=chunked(over), headers=headers)
            assert resp.request.headers.get("transfer-encoding") == "chunked"
            assert "content-length" not in resp.request.headers
            assert error(resp) == (413, "bad_request", f"request body over {LIMIT} bytes")
        # as with a Content-Length over the limit
        sized = await c.post("/v1/chat", content=over, headers=KEY)
        assert error(sized) == (413, "bad_request", f"request body over {LIMIT} bytes")


async def test_a_chunked_body_under_the_limit_is_read_as_before() -> None:
    async with client() as c:
        # read whole and parsed: the turn's own check sees its content (over MAX_CONTENT_BYTES, under the body limit)
        resp = await c.post("/v1/chat", content=chunked(chat("é" * 1500)), headers=KEY)
        assert resp.request.headers.get("transfer-encoding") == "chunked"
        assert error(resp) == (413, "bad_request", "content is 3000 bytes, over the limit of 2048")
        assert error(await c.post("/v1/chat", content=chunked(chat("hi")), headers=JSON))[:2] == (401, "unauthorized")
        missing = await c.post("/v1/chat", content=chunked(b'{"user_id": "u"}'), headers=KEY)
        assert error(missing)[:2] == (422, "bad_request") and "content" in error(missing)[2]
