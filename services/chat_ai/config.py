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
    enable_rag: bool = Field(default=False, description=(
        "chat_ai also searches the user's documents (ltm doc_search, at the same time as the memory search and "
        "within the same LTM_TIMEOUT_MS) and puts the passages in the prompt after the memories"))
    rag_top_k: int = Field(default=5, ge=1, le=50, description="most document passages asked of ltm per turn")
    rag_prompt_tokens: int = Field(default=500, ge=0, le=32_000, description=(
        "of LTM_PROMPT_TOKENS, what document passages keep when some were found: memories fill the block first up "
        "to LTM_PROMPT_TOKENS minus this, passages get the rest"))
    chat_concurrency: int = Field(default=64, ge=1, description="turns one chat_ai process answers at once")
    chat_recall_concurrency: int = Field(default=16, ge=1, description=(
        "of those, how many may be waiting for ltm at once, at most: from 4, raised on fast replies while that many "
        "wait, cut on replies slower than half LTM_TIMEOUT_MS; further input waits in user_input_queue, where its "
        "LTM_TIMEOUT_MS has not started, so a burst is answered later but with memory rather than at the timeout "
        "without it (docs/operations.md). Lifted while ltm is silent (this many failed searches in a row and no "
        "reply at all for LTM_TIMEOUT_MS), so a down ltm costs a turn LTM_TIMEOUT_MS and no queueing"))
    system_prompt: str = SYSTEM_PROMPT
    reply_dedup_ttl_s: int = 24 * 3600
    ai_responses_maxlen: int = Field(default=1_000_000, ge=1000, description=(
        "bound of the ai_responses stream (approximate MAXLEN on every reply; consumers also trim by age)"))
    llm_max_tokens: int = 512
