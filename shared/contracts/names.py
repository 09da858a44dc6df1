"""Every Redis name the mesh uses: streams, groups, lists, channels and keys.

This is the one module that spells them. Each default can be replaced by the
environment variable the contract gives (``USER_INPUT_STREAM`` and so on), and
``MESH_KEY_PREFIX`` prefixes every name at once, which is how tests and several
meshes share one Redis without seeing each other.

Short-term memory (STM) layout, written only by the memory service:

``stm:{session_id}:turns`` (the braces are literal: a hash tag, so a session's keys share a Redis Cluster slot)
    sorted set of recent turns; member = compact JSON of the turn, score = the
    turn's timestamp. Trimmed to ``STM_MAX_MESSAGES`` members.
``stm:{session_id}:summary``
    hash with the rolling summary of older turns (``text``, ``tokens``,
    ``turns``, ``updated_at``, ``kind`` = ``extractive`` or ``llm:<model>``,
    ``covered_until`` = timestamp of the newest turn folded in, ``state`` =
    the summariser's JSON state). Kept under ``STM_MAX_TOKENS`` tokens.
``stm:{session_id}:meta``
    hash with ``user_id`` and ``rehydrated_at``. Its absence means "rebuild
    from PostgreSQL" (services/memory/stm.py): turns or a summary found
    without it are never read (their owner is unknown), and a summary is
    written only while it exists (or by the rebuild itself). Only a rebuild
    writes it: a turn added to a session with no meta waits, unread, for the
    rebuild that follows.
``lock:stm:{session_id}``
    the memory service's lock around summary folds and rebuilds of a session.

All STM keys expire ``STM_TTL_SECONDS`` after the session's last write; the
conversation store in PostgreSQL is the source of truth they are rebuilt from.
A reader that finds no STM asks the memory service (``get_stm`` on
``memory_requests``), which rebuilds it.

Session read cache of the memory service (services/memory/cache.py):
``cache:memory:gen:{session_id}`` and ``cache:memory:ugen:{user_id}`` hold
generation tokens replaced on every write; entries live under
``cache:memory:{kind}:{user_id}:{id}:{token}`` with ``MEMORY_CACHE_TTL_S``.

``memory_requests`` (list) / ``memory_responses`` (channel) carry the memory
service's request/response API (shared/contracts/memory_api.py,
docs/contract-memory.md), the same way as ``ltm_requests``/``ltm_responses``.

``chat_requests`` (list) / ``chat_responses`` (channel) reach chat_ai the same way; it serves only
``ping`` (shared/contracts/ping.py), which is how ``mesh up`` and ``mesh status`` know it is ready.

``ltm_index_warm`` (channel) is ltm's own: after ingest, a process publishes the ids of the users it stored
memories for (a JSON list, ``LtmWarm``), and every ltm process brings those users into its search index
before their next search (services/ltm/search_index.py). Only a hint: a lost message costs one slower search.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, replace
from typing import ClassVar

DEAD_LETTER_SUFFIX = ":dead"


@dataclass(frozen=True, slots=True)
class Names:
    """Resolved bus names. Build with :meth:`from_env` or :meth:`with_prefix`."""

    user_input_stream: str = "user_input_queue"
    ai_responses_stream: str = "ai_responses"
    memory_updates_stream: str = "memory_updates"
    memory_updates_channel: str = "memory_updates"
    ltm_requests_queue: str = "ltm_requests"
    ltm_responses_channel: str = "ltm_responses"
    memory_requests_queue: str = "memory_requests"
    memory_responses_channel: str = "memory_responses"
    chat_requests_queue: str = "chat_requests"
    chat_responses_channel: str = "chat_responses"
    ltm_warm_channel: str = "ltm_index_warm"
    memory_forget_channel: str = "memory_forget"
    # consumer groups
    memory_group: str = "memory"
    chat_group: str = "chat-ai"
    ltm_group: str = "ltm"
    # key spaces
    stm_prefix: str = "stm"
    cache_prefix: str = "cache"
    lock_prefix: str = "lock"
    metrics_prefix: str = "metrics"
    dedup_prefix: str = "dedup"
    prefix: str = ""

    # env var -> field; the contract's names
    ENV: ClassVar[dict[str, str]] = {
        "USER_INPUT_STREAM": "user_input_stream",
        "AI_RESPONSES_STREAM": "ai_responses_stream",
        "MEMORY_UPDATES_STREAM": "memory_updates_stream",
        "MEMORY_UPDATES_CHANNEL": "memory_updates_channel",
        "LTM_REQUESTS_QUEUE": "ltm_requests_queue",
        "LTM_RESPONSES_CHANNEL": "ltm_responses_channel",
        "MEMORY_REQUESTS_QUEUE": "memory_requests_queue",
        "MEMORY_RESPONSES_CHANNEL": "memory_responses_channel",
        "CHAT_REQUESTS_QUEUE": "chat_requests_queue",
        "CHAT_RESPONSES_CHANNEL": "chat_responses_channel",
        "LTM_WARM_CHANNEL": "ltm_warm_channel",
        "MEMORY_FORGET_CHANNEL": "memory_forget_channel",
        "MEMORY_GROUP": "memory_group",
        "CHAT_AI_GROUP": "chat_group",
        "LTM_GROUP": "ltm_group",
    }

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> Names:
        env = os.environ if environ is None else environ
        values = {field: env[var] for var, field in cls.ENV.items() if env.get(var)}
        return cls(prefix=env.get("MESH_KEY_PREFIX", ""), **values)

    def with_prefix(self, prefix: str) -> Names:
        return replace(self, prefix=prefix)

    def _p(self, name: str) -> str:
        return f"{self.prefix}{name}"

    # ---- bus names (prefixed) -------------------------------------------
    @property
    def user_input(self) -> str:
        return self._p(self.user_input_stream)

    @property
    def ai_responses(self) -> str:
        return self._p(self.ai_responses_stream)

    @property
    def memory_updates(self) -> str:
        return self._p(self.memory_updates_stream)

    @property
    def memory_updates_pubsub(self) -> str:
        return self._p(self.memory_updates_channel)

    @property
    def ltm_warm(self) -> str:
        return self._p(self.ltm_warm_channel)

    @property
    def memory_forget(self) -> str:
        return self._p(self.memory_forget_channel)

    @property
    def ltm_requests(self) -> str:
        return self._p(self.ltm_requests_queue)

    @property
    def ltm_responses(self) -> str:
        return self._p(self.ltm_responses_channel)

    @property
    def memory_requests(self) -> str:
        return self._p(self.memory_requests_queue)

    @property
    def memory_responses(self) -> str:
        return self._p(self.memory_responses_channel)

    @property
    def chat_requests(self) -> str:
        return self._p(self.chat_requests_queue)

    @property
    def chat_responses(self) -> str:
        return self._p(self.chat_responses_channel)

    @staticmethod
    def dead(name: str) -> str:
        """Dead-letter stream of a stream, list or channel name."""
        return f"{name}{DEAD_LETTER_SUFFIX}"

    def reply_channel(self, base: str, instance: str) -> str:
        """A requester's private reply channel (used as ``reply_to``)."""
        return f"{base}:{instance}"

    # ---- keys ---------------------------------------------------------------
    # A session's STM keys carry the session id as a hash tag (``{...}``): on a Redis Cluster they share one
    # slot, so the MULTI that writes them stays atomic there (on one Redis the braces are just characters).
    def stm_turns(self, session_id: str) -> str:
        return self._p(f"{self.stm_prefix}:{{{session_id}}}:turns")

    def stm_summary(self, session_id: str) -> str:
        return self._p(f"{self.stm_prefix}:{{{session_id}}}:summary")

    def stm_meta(self, session_id: str) -> str:
        return self._p(f"{self.stm_prefix}:{{{session_id}}}:meta")

    def cache(self, *parts: str) -> str:
        return self._p(":".join((self.cache_prefix, *parts)))

    def lock(self, *parts: str) -> str:
        return self._p(":".join((self.lock_prefix, *parts)))

    def metrics(self, service: str) -> str:
        return self._p(f"{self.metrics_prefix}:{service}")

    def dedup(self, *parts: str) -> str:
        return self._p(":".join((self.dedup_prefix, *parts)))

    def reply_dedup(self, user_id: str, *parts: str) -> str:
        """chat_ai's keys of one input (``done``: its reply's id; ``answering``: who is answering it), hash-tagged
        with the ``ai_responses`` stream's name: on a Redis Cluster they live in that stream's slot, so the reply's
        XADD and its ``done`` key are one MULTI there too. The user id goes in with its length in front (ids may
        hold ``:``: user ``a`` with message ``b:c`` is not user ``a:b`` with message ``c``), so
        ``reply_dedup(user_id) + ":*"`` matches one user's keys and no other's."""
        return self._p(":".join((self.dedup_prefix, f"{{{self.ai_responses}}}", "chat", str(len(user_id)), user_id,
                                 *parts)))

    def reply_dedup_all(self) -> str:
        """The pattern of every user's :meth:`reply_dedup` keys (an ACL's key pattern)."""
        return self._p(":".join((self.dedup_prefix, f"{{{self.ai_responses}}}", "chat", "*")))

    def all_bus_names(self) -> list[str]:
        return [
            self.user_input,
            self.ai_responses,
            self.memory_updates,
            self.memory_updates_pubsub,
            self.ltm_requests,
            self.ltm_responses,
            self.memory_requests,
            self.memory_responses,
            self.chat_requests,
            self.chat_responses,
        ]


def env_var_names() -> list[str]:
    """Every environment variable that renames something (for docs and compose checks)."""
    return [*Names.ENV, "MESH_KEY_PREFIX"]


__all__ = ["DEAD_LETTER_SUFFIX", "Names", "env_var_names"]
