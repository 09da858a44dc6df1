"""What a service answers to ``ping``: the one readiness probe of the mesh.

Every service serves ``{"type": "ping", "request_id": ...}`` on its request list (``ltm_requests``,
``memory_requests``, ``chat_requests``) and starts doing so only once it is really ready (models
loaded, consumers and reply subscriptions up). The reply's ``data`` is a :class:`PingInfo`;
``mesh up`` waits for one from every service and ``mesh status`` prints them. Several copies of a
service may serve one list: a ping reaches one of them.
"""

from __future__ import annotations

import time
from typing import Annotated, Any, Literal

from pydantic import Field, TypeAdapter

from shared.contracts.errors import ErrorInfo
from shared.contracts.messages import Message, PingRequest

MESH_VERSION = "0.1.0"
"""The mesh's version (pyproject.toml's ``version``; a test keeps the two equal)."""

ServiceName = Literal["memory", "ltm", "chat_ai"]


class PingInfo(Message):
    """``data`` of a ping reply."""

    pong: Literal[True] = True
    service: ServiceName
    version: str = MESH_VERSION
    instance: str  # the consumer name (CONSUMER_NAME) of the process that answered
    backend: str  # ltm: native | mem0; memory: its summariser (extractive | llm:<model>); chat_ai: model | offline
    started_at: float
    uptime_s: float
    flags: dict[str, bool | int | str] = Field(default_factory=dict)  # the switches that shape its behaviour

    @classmethod
    def now(cls, service: ServiceName, instance: str, backend: str, started_at: float,
            **flags: bool | int | str) -> PingInfo:
        return cls(service=service, instance=instance, backend=backend, started_at=started_at,
                   uptime_s=round(max(0.0, time.time() - started_at), 3), flags=flags)


class PingResponse(Message):
    """A ping reply as any requester reads it: ltm's and memory's responses have this shape too."""

    request_id: str
    user_id: str | None = None
    success: bool = True
    data: dict[str, Any] | None = None
    error: ErrorInfo | None = None

    @classmethod
    def failure(cls, request_id: str, error: ErrorInfo, user_id: str | None = None) -> PingResponse:
        return cls(request_id=request_id, user_id=user_id, success=False, error=error)

    def info(self) -> PingInfo | None:
        """The :class:`PingInfo` of a successful reply, else None."""
        return PingInfo.model_validate(self.data) if self.success and self.data else None


# chat_requests carries only ping today; a tagged union so that another type is ``unknown_type``
ChatRequest = Annotated[PingRequest, Field(discriminator="type")]

CHAT_REQUEST: TypeAdapter[ChatRequest] = TypeAdapter(ChatRequest)
PING_RESPONSE: TypeAdapter[PingResponse] = TypeAdapter(PingResponse)

__all__ = ["CHAT_REQUEST", "MESH_VERSION", "PING_RESPONSE", "ChatRequest", "PingInfo", "PingResponse", "ServiceName"]
