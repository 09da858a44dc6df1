"""The configuration table of the README, generated from the settings classes.

``python -m mesh config`` prints it; ``--write`` replaces the block between the README's
``<!-- config-table -->`` markers; a test fails when the README's table is stale or a
setting has no description, so the documentation cannot drift from the code.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from pydantic.fields import FieldInfo

from shared.contracts.names import Names

README = Path(__file__).resolve().parent.parent / "README.md"
MARK = "<!-- config-table -->"

# Descriptions of settings whose Field has none (kept here so one file explains them all).
DESCRIPTIONS: dict[str, str] = {
    "REDIS_URL": "Redis the services talk over",
    "DATABASE_URL": "PostgreSQL (with pgvector) of the conversation store and long-term memory",
    "LOG_LEVEL": "DEBUG, INFO, WARNING, ERROR",
    "LOG_FORMAT": "`auto` (console on a terminal, JSON otherwise), `json` or `console`",
    "LOG_CONTENT": "log message content (off: logs carry sizes, never text)",
    "MAX_CONTENT_BYTES": "largest text field accepted, in UTF-8 bytes; larger messages are dead-lettered",
    "CLAIM_IDLE_MS": "a pending stream entry idle this long is claimed by another consumer",
    "MAX_DELIVERIES": "deliveries of a failing stream entry before it is dead-lettered",
    "CONSUMER_NAME": "this process's consumer name in the groups (default host-pid)",
    "METRICS_FLUSH_S": "how often counters are added to the `metrics:<service>` hash",
    "OPENAI_API_KEY": "key of an OpenAI-compatible LLM; with it or OPENAI_BASE_URL set the LLM is used",
    "OPENAI_BASE_URL": "base URL of an OpenAI-compatible server (vLLM, Ollama, ...)",
    "LLM_MODEL": "chat model name for replies, extraction and summaries",
    "LLM_TIMEOUT_S": "timeout of one LLM call",
    "ENABLE_LTM_PUBLISH": "memory emits a MemoryUpdate per stored message",
    "STM_MAX_MESSAGES": "recent turns kept in a session's short-term memory",
    "STM_MAX_TOKENS": "token budget of the rolling summary of older turns",
    "STM_TTL_SECONDS": "short-term memory keys expire this long after a session's last write",
    "MEMORY_UPDATES_MAXLEN": "approximate cap of the memory_updates stream",
    "MEMORY_CONCURRENCY": "messages one memory process handles at once",
    "DB_POOL_MAX": "PostgreSQL connections per process",
    "LTM_TOP_K": "memories asked for / returned by default",
    "LTM_ACCEPT_PUBSUB": "ltm also ingests updates sent only on the memory_updates channel",
    "LTM_REQUEST_CONCURRENCY": "ltm requests one process serves at once",
    "LTM_INGEST_CONCURRENCY": "updates one ltm process ingests at once",
    "LTM_INGEST_BATCH": "stream entries read per batch by the ingest loop",
    "LTM_BACKEND": "`native` (PostgreSQL + pgvector) or `mem0` (mem0ai)",
    "LTM_MAINTENANCE_S": "period of ltm's background work (access statistics, lifecycle jobs)",
    "ENABLE_LTM": "chat_ai asks long-term memory before replying",
    "LTM_TIMEOUT_MS": "longest chat_ai waits for long-term memory (sensible 300-800)",
    "CHAT_CONCURRENCY": "user inputs one chat_ai process answers at once",
    "SYSTEM_PROMPT": "the assistant's system prompt",
    "REPLY_DEDUP_TTL_S": "how long chat_ai remembers that an input was answered (redelivery guard)",
    "LLM_MAX_TOKENS": "longest reply asked of the LLM",
    "MESH_KEY_PREFIX": "prefix of every Redis name (several meshes or test runs on one Redis)",
    "LTM_MEM0_COLLECTION": "with LTM_BACKEND=mem0: mem0's pgvector table",
    "MEM0_DIR": "with LTM_BACKEND=mem0: mem0's config and SQLite history",
    "LTM_EXTRACTION": "`auto` (the LLM when configured, else rules), `rules`, `llm` or `off` (episodic only)",
    "LTM_EXTRACT_BATCH": "turns extracted together (one spaCy pipe or one LLM call)",
    "LTM_LLM_RETRIES": "retries of an invalid LLM extraction before the rules take over",
    "LTM_DECAY_HALF_LIFE_DAYS": "half-life of a memory's value without use (lifecycle)",
    "LTM_CONSOLIDATE_SIMILARITY": "cosine at which two memories of one kind and subject are merged",
    "LTM_CONSOLIDATE_MAX": "newest memories per user considered for consolidation in one pass",
    "LTM_MEMORY_BUDGET": "memories a user keeps before the lowest-value ones are archived",
    "LTM_CLEANUP_BATCH": "memories archived at most per optimize pass",
    "LTM_OPTIMIZE_INTERVAL_S": "least time between two periodic optimize passes for one user",
    "LTM_OPTIMIZE_USERS_PER_RUN": "active users optimised per periodic round",
    "LTM_OPTIMIZE_LOCK_MS": "lease of the per-user optimize lock (kept alive while a pass runs)",
    "LTM_RANK_PROFILE": "`hybrid` (weights measured on the LoCoMo dev split) or `seed` (0.4/0.3/0.2/0.1)",
    "LTM_CONTEXT_TURNS": "neighbouring turns returned with a result, within the token budget",
    "LTM_RESULT_TOKENS": "token budget of one search's results, context included",
    "LTM_MIN_SIMILARITY": "relevance gate: below this cosine nothing is returned, whatever the boosts",
    "LTM_CANDIDATES": "candidates per retriever before fusion",
}


def _services() -> dict[str, Any]:
    from services.chat_ai.config import ChatSettings
    from services.gateway.config import GatewaySettings
    from services.ltm.config import LtmSettings
    from services.memory.config import MemorySettings

    return {"memory": MemorySettings, "ltm": LtmSettings, "chat_ai": ChatSettings, "gateway": GatewaySettings}


def _default(field: FieldInfo) -> str:
    if field.default_factory is not None:
        return "(computed)"
    value = field.default
    if value is None:
        return "unset"
    text = str(value).lower() if isinstance(value, bool) else str(value)
    return f"`{text}`" if len(text) < 60 else "(see code)"


def rows() -> list[tuple[str, str, str, str]]:
    """(variable, default, services, description) for every setting, grouped by first use."""
    seen: dict[str, tuple[str, list[str], str]] = {}
    for service, cls in _services().items():
        for name, field in cls.model_fields.items():
            var = name.upper()
            desc = field.description or DESCRIPTIONS.get(var, "")
            if var in seen:
                seen[var][1].append(service)
            else:
                seen[var] = (_default(field), [service], desc)
    every = len(_services())
    out = [(var, d, ", ".join(s) if len(s) < every else "all", desc) for var, (d, s, desc) in seen.items()]
    for var, field in Names.ENV.items():
        out.append((var, f"`{getattr(Names(), field)}`", "all", "Redis name (docs/contract.md)"))
    out.append(("MESH_KEY_PREFIX", "empty", "all", DESCRIPTIONS["MESH_KEY_PREFIX"]))
    return out


def table() -> str:
    lines = ["| variable | default | read by | meaning |", "|---|---|---|---|"]
    lines += [f"| `{v}` | {d} | {s} | {desc} |" for v, d, s, desc in rows()]
    return "\n".join(lines)


def render(readme: str) -> str:
    head, sep, rest = readme.partition(MARK)
    if not sep:
        raise ValueError(f"README has no {MARK} marker")
    _old, end, tail = rest.partition(MARK)
    return f"{head}{MARK}\n{table()}\n{MARK}{tail if end else chr(10)}"


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--write", action="store_true", help="update the table in README.md")


def run(args: argparse.Namespace) -> int:
    if args.write:
        README.write_text(render(README.read_text(encoding="utf-8")), encoding="utf-8")
    else:
        print(table())
    return 0
