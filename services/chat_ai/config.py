from __future__ import annotations

from pydantic import Field

from shared.runtime.settings import MeshSettings

SYSTEM_PROMPT = (
    "You are a helpful assistant with long-term memory. Use the remembered facts about the user when they are "
    "relevant; never invent memories. Be concise."
)


class ChatSettings(MeshSettings):
    enable_ltm: bool = True
    ltm_timeout_ms: int = Field(default=500, ge=50, le=10_000)
    memory_stm_timeout_ms: int = Field(
        default=300, ge=0, le=10_000,
        description="when Redis has no STM for the session, longest chat_ai waits for memory to rebuild it (0: never "
                    "ask)")
    ltm_top_k: int = Field(default=5, ge=1, le=50)
    chat_concurrency: int = Field(default=16, ge=1)
    system_prompt: str = SYSTEM_PROMPT
    reply_dedup_ttl_s: int = 24 * 3600
    llm_max_tokens: int = 512
