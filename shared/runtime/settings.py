"""Settings every service shares (each service's config class extends this one)."""

from __future__ import annotations

import os
import socket

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict

from shared.contracts.messages import DEFAULT_MAX_CONTENT_BYTES
from shared.runtime.embedding import EmbeddingSettings


class MeshSettings(EmbeddingSettings, BaseSettings):
    """Contract variables are read without a prefix (``REDIS_URL``, ``LTM_TIMEOUT_MS`` ...)."""

    model_config = SettingsConfigDict(env_prefix="", extra="ignore", case_sensitive=False)

    redis_url: str = "redis://127.0.0.1:6379/0"
    redis_cluster: bool = Field(default=False, description=(
        "REDIS_URL names a node of a Redis Cluster: the services use the cluster client (slots, MOVED/ASK); "
        "docs/operations.md, \"Redis Cluster\""))
    database_url: str = "postgresql://mesh@127.0.0.1:5432/mesh"
    log_level: str = "INFO"
    log_format: str = Field(default="auto", description="auto | json | console")
    log_content: bool = False
    max_content_bytes: int = DEFAULT_MAX_CONTENT_BYTES
    claim_idle_ms: int = 15_000
    max_deliveries: int = 5
    stream_retention_s: float = Field(default=3600.0, ge=0, description=(
        "stream entries older than this that every consumer group has read and acknowledged are trimmed by the "
        "consumers (the streams hold message text: they are a queue, not an archive); 0 = never trim"))
    shutdown_grace_s: float = Field(default=10.0, ge=0, description=(
        "on SIGTERM, in-flight work gets this long to finish; stream entries still being handled are then left "
        "pending for another consumer, requests still running get an `unavailable` reply"))
    request_slow_ms: float = Field(default=250.0, ge=0, description=(
        "a request on a service's request list (ltm_requests, memory_requests, chat_requests) that waited on the "
        "list and was served in this long or longer in all is logged as `requests.slow` with its type, both "
        "times and the requests in flight beside it, and counted (`slow`); 0 = never logged"))
    background_nice: int = Field(default=0, ge=0, le=19, description=(
        "OS priority (nice, per thread) of background work below the rest: ltm's ingest (extraction, embedding, "
        "salience) and memory's embedding of stored messages; 0 = the same priority (default: a low-priority thread "
        "that holds the GIL when the kernel preempts it stalls the event loop too; docs/operations.md)"))
    process_nice: int = Field(default=0, ge=0, le=19, description=(
        "OS priority (nice) of the whole process below the one it started at, and of its own scheduling group when "
        "it leads a session of its own (as every service the stack or the bench starts): for copies that do "
        "background work only, such as ltm with LTM_ROLE=ingest (LTM_INGEST_PROCESSES sets it for its children), "
        "so that the copies serving requests get the CPU first; 0 = unchanged"))
    gil_switch_ms: float = Field(default=1.0, ge=0.1, le=100.0, description=(
        "how long a thread that wants the GIL waits before the holder is asked to let go (Python's switch "
        "interval; Python's default is 5 ms). The event loop gives the GIL up at every I/O wait and wants it back "
        "when the reply comes; while a background thread computes (spaCy, the tokenizer), each return can wait "
        "this long. 1 ms: ltm's search p95 while ingesting 43 against 52 ms at 5 ms, searches/s unchanged"))
    consumer_name: str = Field(default_factory=lambda: f"{socket.gethostname()}-{os.getpid()}")
    metrics_flush_s: float = 2.0
    metrics_port: int = Field(default=0, ge=0, le=65535, description=(
        "serve Prometheus `/metrics` on this port (0: off; the local stack gives each service a free one and "
        "lists them in METRICS_URLS)"))
    metrics_host: str = Field(default="127.0.0.1", description="address `/metrics` listens on (0.0.0.0 in compose)")
    # OpenAI-compatible LLM (OpenAI, vLLM, Ollama); absent = offline
    openai_api_key: str | None = None
    openai_base_url: str | None = None
    llm_model: str = "gpt-4o-mini"
    llm_timeout_s: float = 30.0

    @property
    def llm_configured(self) -> bool:
        return bool(self.openai_api_key or self.openai_base_url)
