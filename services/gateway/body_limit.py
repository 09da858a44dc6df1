"""GATEWAY_MAX_BODY_BYTES on the body as it is read, for requests without a Content-Length.

The gateway's ``limit_body`` middleware refuses a request whose Content-Length is over the limit before anything
is read; a chunked request (``Transfer-Encoding: chunked``) has no Content-Length, and FastAPI reads a route's
whole body before its dependencies (the API key) run. :class:`BodyLimit` wraps ``receive``: once the bytes read
pass the limit it stops the read (an exception to whoever reads) and the client gets ``too_large`` (the same 413
JSON) instead of whatever the app answers to a body it could not read.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from starlette.responses import Response
from starlette.types import ASGIApp, Message, Receive, Scope, Send


class BodyTooLarge(Exception):
    """Raised to the reader of a body over the limit."""


class BodyLimit:
    def __init__(self, app: ASGIApp, max_bytes: int, too_large: Callable[[], Response]) -> None:
        self.app, self.max_bytes, self.too_large = app, max_bytes, too_large

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        read = 0
        over = False
        started = False

        async def limited() -> Message:
            nonlocal read, over
            message = await receive()
            if message["type"] == "http.request":
                read += len(message.get("body", b""))
                if read > self.max_bytes:
                    over = True
                    raise BodyTooLarge(f"request body over {self.max_bytes} bytes")
            return message

        async def guarded(message: Message) -> None:
            nonlocal started
            if over:
                return  # the app's answer to a body it could not read (FastAPI makes it a 400): ours goes instead
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, limited, guarded)
        except Exception:  # whatever the interrupted read became on its way out
            if not over:
                raise
        if over and not started:
            response: Any = self.too_large()
            await response(scope, receive, send)
