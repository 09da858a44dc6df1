from __future__ import annotations

from pydantic import Field

from shared.runtime.settings import MeshSettings


class MemorySettings(MeshSettings):
    enable_ltm_publish: bool = True
    stm_max_messages: int = Field(default=15, ge=1)
    stm_max_tokens: int = Field(default=500, ge=50)
    stm_ttl_seconds: int = 7 * 24 * 3600
    memory_updates_maxlen: int = 1_000_000
    memory_concurrency: int = 8
    db_pool_max: int = 8
