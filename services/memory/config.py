from __future__ import annotations

from typing import Literal

from pydantic import Field

from shared.runtime.settings import MeshSettings


class MemorySettings(MeshSettings):
    enable_ltm_publish: bool = True
    stm_max_messages: int = Field(default=15, ge=1)
    stm_max_tokens: int = Field(default=500, ge=50)
    stm_ttl_seconds: int = 7 * 24 * 3600
    stm_salience_weight: float = Field(
        default=0.0, ge=0.0, le=100.0,
        description="how much the salience model's score of a turn (0-1) weighs in which sentences the STM summary "
                    "keeps: each is scaled by 1 + weight x salience (0 = off, the default: no gain measured on "
                    "held-out dev data, docs/memory.md); needs MEMORY_EMBED_MESSAGES and the local embedding model")
    stm_salience_sessions: int = Field(default=10_000, ge=1,
                                       description="sessions whose salience state one memory process keeps (LRU)")
    memory_updates_maxlen: int = 1_000_000
    memory_concurrency: int = 8
    memory_request_concurrency: int = Field(default=8, ge=1,
                                            description="memory_requests one memory process serves at once")
    db_pool_max: int = 8
    memory_summary_delay_ms: int = Field(
        default=200, ge=0, le=60_000,
        description="wait after a turn leaves the STM window before folding it into the summary (a burst is "
                    "folded in one pass)")
    memory_cache_ttl_s: int = Field(default=300, ge=0,
                                    description="TTL of the session read cache in Redis; 0 turns the cache off")
    memory_embed_messages: bool = Field(
        default=True, description="embed stored messages, for search_messages (as they are stored with "
                                  "MEMORY_CARRY_VECTORS, else in the background)")
    memory_carry_vectors: bool = Field(default=True, description=(
        "embed each message it publishes as it is stored (one forward pass, on the write path) instead of in the "
        "background, and send the vector with the turn's salience on its MemoryUpdate, so that ltm does not embed it "
        "again (unpublished messages, such as offline replies, are still embedded in the background; one "
        "embedding per message in the mesh; services/memory/carry.py); needs MEMORY_EMBED_MESSAGES"))
    memory_background_model: Literal["own", "shared"] = Field(default="own", description=(
        "`own`: with MEMORY_CARRY_VECTORS, the background embedding of stored messages (offline replies, anything "
        "not published) has a copy of the model of its own (about 90 MB), so a message being stored never waits "
        "behind one of its passes for the model; `shared`: one model for both"))
    memory_embed_interval_s: float = Field(default=1.0, gt=0,
                                           description="how often the background embedder looks for new messages")
    memory_embed_yield_ms: int = Field(
        default=1000, ge=0, le=60_000,
        description="the background embedder steps aside while memory stores messages or serves requests, at most "
                    "this long before each of its small passes (work a user waits for first; 0 = off)")
    memory_cleanup_interval_s: float = Field(default=300.0, gt=0,
                                             description="period of the sweep of expired session context entries")
    memory_encryption_key: str | None = Field(
        default=None,
        description="Fernet key(s), comma-separated (the first encrypts), for sensitive user preferences; unset: a "
                    "dev key is generated into MEMORY_ENCRYPTION_KEY_FILE")
    memory_encryption_key_file: str = Field(
        default=".data/memory-encryption.key",
        description="dev key file used when MEMORY_ENCRYPTION_KEY is unset (created 0600 on first use)")
    memory_import_max_batch: int = Field(
        default=500, ge=1, le=100_000,
        description="most messages one import_messages request may carry (above it: bad_request)")
    memory_import_max_bytes: int = Field(
        default=16 * 1024 * 1024, ge=64 * 1024,
        description="largest memory_requests payload accepted, so an import batch fits (each text is still held "
                    "to MAX_CONTENT_BYTES)")
