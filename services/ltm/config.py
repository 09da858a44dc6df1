from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Literal

from pydantic import Field

from shared.contracts.messages import DEFAULT_MAX_DOCUMENT_BYTES
from shared.runtime.settings import MeshSettings


class LtmSettings(MeshSettings):
    ltm_role: Literal["all", "requests", "ingest"] = Field(default="all", description=(
        "what this process does: `all` serves ltm_requests and ingests memory_updates; `requests` only serves "
        "requests (search, add, documents...); `ingest` only ingests (with the lifecycle job), so that it can run "
        "at a lower OS priority (PROCESS_NICE) than the copies that answer searches (docs/operations.md)"))
    ltm_ingest_processes: int = Field(default=1, ge=0, le=16, description=(
        "with LTM_ROLE=all: ingest runs in this many child processes at PROCESS_NICE LTM_INGEST_NICE, and this "
        "process only serves requests (a search then never waits behind ingest for the GIL or the CPU: search "
        "p95 while ingest runs flat out 1.4x a quiet mesh against 2.5-3.2x in one process); it answers ping once "
        "they are ready, and starts one that exits again. 0 = ingest in this process"))
    ltm_ingest_nice: int = Field(default=10, ge=0, le=19, description=(
        "PROCESS_NICE of the ingest children (LTM_INGEST_PROCESSES): they take the CPU the searches leave"))
    ltm_accept_pubsub: bool = False
    ltm_request_concurrency: int = Field(default=4, ge=1, description=(
        "ltm requests one process serves at once: searches are CPU work on one event loop, so more at once only "
        "queues them inside the process, past the list's newest-first order under overload (4 against 16: chat "
        "turns answered with memory under a 50-session burst 157 of 800 against 43, search throughput unchanged)"))
    ltm_ingest_concurrency: int = 128
    ltm_ingest_batch: int = 64
    ltm_backend: Literal["native", "mem0"] = "native"
    ltm_maintenance_s: float = 5.0
    db_pool_max: int = 8
    # LTM_BACKEND=mem0: mem0's pgvector table, and MEM0_DIR (its config and SQLite history)
    ltm_mem0_collection: str = Field(default="mem0_memories", pattern=r"^[a-z_][a-z0-9_]{0,40}$")
    mem0_dir: str = str(Path(tempfile.gettempdir()) / "mesh-mem0")
    # extraction on ingest (services/ltm/extraction.py): auto = the LLM when one is configured, else the rules
    ltm_extraction: Literal["auto", "rules", "llm", "off"] = "auto"
    ltm_extract_batch: int = Field(default=32, ge=1, le=256)
    ltm_llm_retries: int = Field(default=2, ge=0, le=5)
    # lifecycle (services/ltm/lifecycle.py)
    ltm_decay_half_life_days: float = Field(default=30.0, gt=0)
    ltm_consolidate_similarity: float = Field(default=0.92, gt=0, le=1)
    ltm_consolidate_max: int = Field(default=2000, ge=2)
    ltm_memory_budget: int = Field(default=20_000, ge=1)
    ltm_cleanup_batch: int = Field(default=500, ge=1)
    ltm_optimize_interval_s: float = Field(default=600.0, gt=0)
    ltm_optimize_users_per_run: int = Field(default=20, ge=1)
    ltm_optimize_lock_ms: int = Field(default=120_000, ge=1000)
    ltm_search_deletions_keep_s: float = Field(default=86_400.0, gt=0, description=(
        "deleted memories stay at least this long in the log the ltm processes' search indexes read them from "
        "(migration 012; memory ids only), then go at the user's next optimize (a user who never comes back keeps "
        "them until deleted); an index that did not read the user since loads it again"))
    # retrieval (services/ltm/retrieval.py): hybrid = weights chosen on the LoCoMo dev split; seed = 0.4 semantic,
    # 0.3 recency, 0.2 access, 0.1 confidence after the relevance gate
    ltm_rank_profile: Literal["hybrid", "seed"] = "hybrid"
    ltm_context_turns: int = Field(default=5, ge=0, le=10, description=(
        "neighbouring turns of the same session returned with a result (each side, at most), within the budget"))
    ltm_result_tokens: int = Field(default=1000, ge=50, description=(
        "token budget of one search's results, context turns included (all-MiniLM-L6-v2 WordPiece tokens)"))
    ltm_min_similarity: float = Field(default=0.2, ge=-1.0, le=1.0, description=(
        "relevance gate: a memory with no query term in common needs this cosine to be returned, whatever the boosts"))
    ltm_candidates: int = Field(default=1000, ge=10, description=(
        "memories of the user re-ranked after the first stage (dense + BM25 fusion)"))
    ltm_search_index_rows: int = Field(default=200_000, ge=0, description=(
        "memories held in each ltm process's search index (the users searched lately: embedding, term counts and "
        "row of each memory, about 3 kB); a user with more is searched in SQL; 0 = every search in SQL"))
    ltm_index_load_wait_ms: int = Field(default=0, ge=0, le=10_000, description=(
        "a search of a user this process's index does not hold waits this long for the user's load, then runs in "
        "SQL (the load goes on); 0 = straight to SQL. Off by default: a load reads about 0.2 ms per memory (1,500 "
        "memories: 220-600 ms measured) where the SQL stage takes 100-150 ms, so waiting only pays for small users"))
    ltm_search_index_warm_rows: int = Field(default=200_000, ge=0, description=(
        "at start, the search index is filled in the background with the users active last, up to this many "
        "memories (and LTM_SEARCH_INDEX_ROWS: by default the whole index), so a returning user's first search "
        "after a restart is not a cold one (LongMemEval dev restarted, 10 people asking at once: 50,000 warmed "
        "3 and 28 of 60 turns without memory in two runs, the whole index 0 and 0); after ingest every ltm "
        "process brings the users it was told about into free room; 0 = no warming at start"))
    ltm_query_int8: bool = Field(default=True, description=(
        "search queries are embedded with the int8 copy of the local model (shared/runtime/onnx_export.py: "
        "about twice as fast; vectors at cosine 0.994 on average to the float model's, which embeds everything "
        "stored); "
        "false: the float model. Local ONNX model only"))
    ltm_ingest_int8: bool = Field(default=False, description=(
        "what ingest stores (turns, extracted memories, entity names, document chunks, `add`) is embedded by the "
        "int8 copy too, like the queries: ingest passes about 2.4x faster (LoCoMo dev ingest 52.5 -> 27.4 s) and, "
        "with ingest in the same process (LTM_INGEST_PROCESSES=0), a turn just searched for is stored with its "
        "query's vector, at recall@10 0.916 against 0.921 on LoCoMo dev "
        "(docs/memory.md). With LTM_QUERY_INT8 and LTM_INGEST_MODEL=own only"))
    ltm_query_cache: int = Field(default=4096, ge=0, description=(
        "query embeddings kept per ltm process (the same text searched again is not embedded again)"))
    # ingest (services/ltm/ingest.py)
    ltm_ingest_yield_ms: int = Field(default=250, ge=0, le=10_000, description=(
        "ingest steps aside while searches are in flight, between its small steps, at most this long per step "
        "(requests first; 0 = off); also warming the search index. An ingest child (LTM_INGEST_PROCESSES) waits "
        "the same way for the requests its parent serves (a count in shared memory)"))
    ltm_ingest_step_tokens: int = Field(default=256, ge=16, le=16_384, description=(
        "the most text (about 4 characters a token) one ingest step extracts or embeds in one call: small "
        "embedding passes cost less per token here and keep a search's embedding from waiting long"))
    ltm_extract_step_tokens: int = Field(default=1024, ge=16, le=16_384, description=(
        "LTM_INGEST_STEP_TOKENS of extraction in a process that serves no request (an ingest child, LTM_ROLE="
        "ingest), where a step holds no searcher's GIL or event loop: spaCy costs less per turn in larger "
        "batches (LoCoMo turns: extraction 9.5-10 -> 7.7-8.3 ms per turn side by side)"))
    ltm_ingest_model: Literal["own", "shared"] = Field(default="own", description=(
        "`own`: a search's embedding never waits behind an ingest pass: with LTM_QUERY_INT8 the searches have the "
        "int8 copy and ingest (with `add` and documents) the float model; without it ingest gets a second float "
        "copy (about 90 MB). `shared`: searches and ingest share one model, the float one (LTM_QUERY_INT8 is then "
        "ignored)"))
    # documents beside memory (services/ltm/documents/): doc_add, doc_search, doc_delete
    ltm_doc_max_bytes: int = Field(default=DEFAULT_MAX_DOCUMENT_BYTES, ge=1024, le=64 * 1024 * 1024, description=(
        "largest document text doc_add accepts (UTF-8 bytes; the request may be about twice that, for JSON "
        "escaping); every other text keeps MAX_CONTENT_BYTES"))
    ltm_doc_chunk_tokens: int = Field(default=200, ge=32, le=240, description=(
        "most tokens of one document chunk (all-MiniLM-L6-v2 WordPiece): chunks are whole sentences under one "
        "heading; the embedder reads 256 tokens, heading label included"))
    ltm_doc_chunk_overlap: int = Field(default=30, ge=0, le=120, description=(
        "a chunk repeats the last sentences of the one before it in the same section, up to this many tokens"))
    # salience (services/ltm/salience): a small LSTM over each session's turns, numpy at ingest
    ltm_salience: bool = Field(default=True, description=(
        "score each ingested turn's salience (0-1: how likely it is to be needed later; services/ltm/salience, "
        "numpy, well under 1 ms a turn) and store it on its episodic memory and the knowledge read from it; "
        "the local all-MiniLM-L6-v2 (ONNX) model only, else off"))
    ltm_salience_weight: float = Field(default=1.0, ge=0.0, le=10.0, description=(
        "ranking term: + weight x (salience - 0.5) in z units on an eligible memory's score (NULL = neutral); "
        "0 = off. 1.0: on LoCoMo's held-out conv-43 recall@10 any 0.916 -> 0.944, LongMemEval's held-out "
        "questions unchanged (docs/memory.md#salience)"))
    ltm_salience_cleanup: bool = Field(default=False, description=(
        "budgeted cleanup (LTM_MEMORY_BUDGET) archives the least salient memories first (NULL as 0.5), then by "
        "decay; off: by decay alone"))
    ltm_salience_sessions: int = Field(default=10_000, ge=1, description=(
        "per-session salience state (hidden, cell, previous turn) kept per ltm process (LRU); a session not "
        "held starts from a zero state"))

    @property
    def query_int8(self) -> bool:
        """Whether searches embed their queries with the int8 copy (LTM_QUERY_INT8, the local ONNX model, own
        models)."""
        return (self.ltm_query_int8 and self.embedding_backend == "onnx" and not self.embedding_remote
                and self.ltm_ingest_model == "own")

    @property
    def ingests(self) -> bool:
        """Whether this process ingests memory_updates (LTM_ROLE all or ingest)."""
        return self.ltm_role != "requests"

    @property
    def serves_requests(self) -> bool:
        """Whether this process serves ltm_requests (LTM_ROLE all or requests)."""
        return self.ltm_role != "ingest"

    @property
    def query_model(self) -> bool:
        """Whether this process loads the int8 query model: for searches (and ``add``), and in an ingest-only process
        only with LTM_INGEST_INT8."""
        return self.query_int8 and (self.serves_requests or self.ingest_int8)

    @property
    def ingest_int8(self) -> bool:
        """Whether ingest stores the int8 copy's vectors too (LTM_INGEST_INT8, with :attr:`query_int8`)."""
        return self.ltm_ingest_int8 and self.query_int8
