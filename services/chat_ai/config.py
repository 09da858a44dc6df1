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
    ltm_top_k: int = Field(default=10, ge=1, le=50, description=(
        "most results asked of ltm per turn; the token budget (LTM_PROMPT_TOKENS) usually binds first"))
    ltm_prompt_tokens: int = Field(default=1500, ge=100, le=32_000, description=(
        "token budget of the prompt's memory block, labels included (all-MiniLM-L6-v2 WordPiece tokens)"))
    ltm_turn_tokens: int = Field(default=200, ge=20, le=32_000, description=(
        "longest a single remembered turn may be in the memory block; longer turns are cut at a word boundary"))
    chat_concurrency: int = Field(default=64, ge=1)
    system_prompt: str = SYSTEM_PROMPT
    reply_dedup_ttl_s: int = 24 * 3600
    ai_responses_maxlen: int = Field(default=1_000_000, ge=1000, description=(
        "bound of the ai_responses stream (approximate MAXLEN on every reply; consumers also trim by age)"))
    llm_max_tokens: int = 512
