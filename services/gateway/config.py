from __future__ import annotations

from pydantic import Field

from shared.runtime.settings import MeshSettings


class GatewaySettings(MeshSettings):
    gateway_host: str = Field(default="127.0.0.1", description="address the HTTP gateway listens on")
    gateway_port: int = Field(default=8080, ge=0, le=65535, description="port of the HTTP gateway")
    gateway_api_keys: str = Field(default="", description=(
        "API keys, `;`-separated, each `KEY=admin` or `KEY=USER|USER|PREFIX*` (the user ids it may act for); "
        "unset: every request is refused (401)"))
    gateway_timeout_s: float = Field(default=30.0, gt=0, le=600, description=(
        "longest a request waits for the mesh (a chat reply, a search); then 504"))
    gateway_max_body_bytes: int = Field(default=1_048_576, ge=1024, description=(
        "largest request body accepted (413 above it)"))
