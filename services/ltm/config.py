from __future__ import annotations

from typing import Literal

from pydantic import Field

from shared.runtime.settings import MeshSettings


class LtmSettings(MeshSettings):
    ltm_top_k: int = Field(default=5, ge=1, le=100)
    ltm_accept_pubsub: bool = False
    ltm_request_concurrency: int = 16
    ltm_ingest_concurrency: int = 16
    ltm_ingest_batch: int = 64
    ltm_backend: Literal["native", "mem0"] = "native"
    ltm_maintenance_s: float = 5.0
    db_pool_max: int = 8
