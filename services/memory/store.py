"""The conversation store in PostgreSQL: the SQL of every storage operation, each scoped by user.

A session belongs to the ``user_id`` that created it. Every method that takes a ``user_id`` matches
it in the same statement that reads or writes, so another user's session behaves exactly like a
missing one (:class:`NotFound`), never a different error. Sessions whose messages arrived without a
``user_id`` (allowed by the contract for old clients) are stored but belong to nobody (the user
:data:`NOBODY`): no user can read them through this API.

The tables are hash-partitioned by ``user_id`` (migration 004, docs/partitioning.md) and every statement here
names the user, so it reads or writes one partition. Keys are per user: (user_id, session_id),
(user_id, message_id). Session ids stay unique across users through ``conversation_session_ids`` (kept by
triggers): :meth:`ConversationStore.session_owner` is the one lookup by a session id alone, one row of that table.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field, replace
from typing import Any, NamedTuple

import numpy as np
from psycopg import AsyncConnection, errors
from psycopg.types.json import Jsonb

from services.memory.context_store import Conflict, ContextStore
from services.memory.summary import SummaryState
from shared.contracts.errors import BadRequest, NotFound
from shared.contracts.memory_api import MessageInfo, SessionInfo, SummaryInfo
from shared.runtime.fence import RECEIVED_AT, refuse_if_deleted
from shared.runtime.stm import Turn

NOBODY = ""
"""The user_id of sessions (and their messages) stored without one: never a user id (ids have a character at least)."""
MAX_EMBED_FAILURES = 3  # a message's own failed embeddings before the background job gives it up (migration 007)


class Unembedded(NamedTuple):
    """A stored message without an embedding yet."""

    user_id: str
    message_id: str
    content: str
    session_id: str
    ai: bool  # said by the assistant


class Backlog(NamedTuple):
    """Turns for the summary, oldest first, the salience (by message_id) of those that have one, and each turn's
    message_index (by message_id: what the summary's fold point records)."""

    turns: list[Turn]
    scores: dict[str, float]
    indexes: dict[str, int]


SESSION_IDS_KEY = "conversation_session_ids_pkey"
"""The constraint a new session violates when another user holds its id (migration 004's trigger raises it)."""


def _held_elsewhere(exc: errors.UniqueViolation) -> bool:
    """True when the violation is a session id another user holds (not any other key)."""
    return exc.diag.constraint_name == SESSION_IDS_KEY


class SessionOwnershipError(BadRequest):
    """A message names a session (or a message id) that belongs to another user."""


@dataclass(slots=True)
class StoredMessage:
    message_id: str
    session_id: str
    user_id: str | None
    role: str  # human | ai | system
    content: str
    timestamp: float
    parent_message_id: str | None = None
    metadata: dict[str, Any] = field(default_factory=dict)
    message_type: str = "text"
    is_context_message: bool = False
    token_count: int = 0


_SESSION_COLS = (
    "session_id, user_id, name, type, status, metadata, context_summary, relevance_score, message_count,"
    " extract(epoch from created_at)::float8, extract(epoch from last_activity)::float8"
)
_MESSAGE_COLS = (
    "m.message_id, m.session_id, m.role, m.content, m.message_type, m.message_index, m.parent_message_id,"
    " m.metadata, m.relevance_score, m.is_context_message, m.token_count, extract(epoch from m.timestamp)::float8"
)


def _session(r: Sequence[Any]) -> SessionInfo:
    return SessionInfo(session_id=r[0], user_id=r[1], name=r[2], type=r[3], status=r[4], metadata=r[5],
                       context_summary=r[6], relevance_score=r[7], message_count=r[8], created_at=r[9],
                       last_activity=r[10])


def _message(r: Sequence[Any], similarity: float | None = None) -> MessageInfo:
    return MessageInfo(message_id=r[0], session_id=r[1], role=r[2], content=r[3], message_type=r[4],
                       message_index=r[5], parent_message_id=r[6], metadata=r[7], relevance_score=r[8],
                       is_context_message=r[9], token_count=r[10], timestamp=r[11], similarity=similarity)


class ConversationStore(ContextStore):
    """Sessions, messages and summaries (context, links and preferences: :class:`ContextStore`)."""

    # ------------------------------------------------------------------ sessions
    async def create_session(self, user_id: str, session_id: str, *, name: str | None = None, type_: str = "chat",
                             metadata: dict[str, Any] | None = None) -> tuple[SessionInfo, bool]:
        """Create the session, or return the caller's existing one with that id; True when new."""
        try:
            async with self.pool.connection() as conn:
                cur = await conn.execute(
                    "INSERT INTO conversation_sessions (session_id, user_id, name, type, metadata)"
                    " VALUES (%s, %s, %s, %s, %s) ON CONFLICT (user_id, session_id) DO NOTHING"
                    f" RETURNING {_SESSION_COLS}",
                    (session_id, user_id, name, type_, Jsonb(metadata or {})),
                )
                row = await cur.fetchone()
        except errors.UniqueViolation as exc:
            if _held_elsewhere(exc):
                raise Conflict("session_id is not available") from None
            raise
        if row is not None:
            return _session(row), True
        return await self.get_session(user_id, session_id), False

    async def get_session(self, user_id: str, session_id: str) -> SessionInfo:
        async with self.pool.connection() as conn:
            cur = await conn.execute(
                f"SELECT {_SESSION_COLS} FROM conversation_sessions WHERE session_id = %s AND user_id = %s",
                (session_id, user_id),
            )
            row = await cur.fetchone()
        if row is None:
            raise NotFound("no such session")
        return _session(row)

    async def update_session_activity(self, user_id: str, session_id: str, *, status: str | None = None,
                                      name: str | None = None, metadata: dict[str, Any] | None = None,
                                      relevance_score: float | None = None) -> SessionInfo:
        async with self.pool.connection() as conn:
            cur = await conn.execute(
                "UPDATE conversation_sessions SET last_activity = GREATEST(last_activity, now()),"
                " status = COALESCE(%s, status), name = COALESCE(%s, name),"
                " metadata = metadata || COALESCE(%s, '{}'::jsonb),"
                " relevance_score = COALESCE(%s, relevance_score)"
                f" WHERE session_id = %s AND user_id = %s RETURNING {_SESSION_COLS}",
                (status, name, Jsonb(metadata) if metadata is not None else None, relevance_score,
                 session_id, user_id),
            )
            row = await cur.fetchone()
        if row is None:
            raise NotFound("no such session")
        return _session(row)

    async def get_user_sessions(self, user_id: str, limit: int, status: str | None = None) -> list[SessionInfo]:
        async with self.pool.connection() as conn:
            cur = await conn.execute(
                f"SELECT {_SESSION_COLS} FROM conversation_sessions WHERE user_id = %s"
                " AND (%s::text IS NULL OR status = %s) ORDER BY last_activity DESC LIMIT %s",
                (user_id, status, status, limit),
            )
            return [_session(r) for r in await cur.fetchall()]

    async def delete_session(self, user_id: str, session_id: str) -> None:
        """Delete the session; messages, context, links and summary go with it (ON DELETE CASCADE)."""
        async with self.pool.connection() as conn:
            cur = await conn.execute(
                "DELETE FROM conversation_sessions WHERE session_id = %s AND user_id = %s", (session_id, user_id))
            if cur.rowcount == 0:
                raise NotFound("no such session")

    async def get_session_summary(self, user_id: str, session_id: str) -> SummaryInfo:
        async with self.pool.connection() as conn:
            cur = await conn.execute(
                "SELECT s.session_id, COALESCE(ss.message_count, 0), COALESCE(ss.human_count, 0),"
                " COALESCE(ss.ai_count, 0), COALESCE(ss.system_count, 0), COALESCE(ss.total_tokens, 0),"
                " extract(epoch from ss.first_activity)::float8, extract(epoch from ss.last_activity)::float8,"
                " s.context_summary, s.summary_state->>'kind', COALESCE((s.summary_state->>'turns')::int, 0)"
                " FROM conversation_sessions s LEFT JOIN session_summary ss"
                "  ON ss.user_id = %s AND ss.session_id = s.session_id"
                " WHERE s.session_id = %s AND s.user_id = %s",
                (user_id, session_id, user_id),
            )
            r = await cur.fetchone()
        if r is None:
            raise NotFound("no such session")
        return SummaryInfo(session_id=r[0], message_count=r[1], human_count=r[2], ai_count=r[3], system_count=r[4],
                           total_tokens=r[5], first_activity=r[6], last_activity=r[7], context_summary=r[8],
                           summary_kind=r[9] or None, summary_turns=r[10])

    async def session_owner(self, session_id: str) -> tuple[bool, str | None]:
        """(exists, user_id, None for nobody's): for the memory service's own use, never for answering a user.

        The one lookup by a session id alone (whose partition it is in is what it finds out): a primary-key read of
        ``conversation_session_ids``, which is partitioned by the session id."""
        async with self.pool.connection() as conn:
            cur = await conn.execute("SELECT user_id FROM conversation_session_ids WHERE session_id = %s",
                                     (session_id,))
            row = await cur.fetchone()
        return (row is not None, (row[0] or None) if row else None)

    # ------------------------------------------------------------------ messages
    async def store_message(self, m: StoredMessage, embedding: np.ndarray | None = None) -> bool:
        """Store once (idempotent by the user's message_id); True when it was new.

        One statement, so one round trip and one commit: the session is upserted (created on first
        sight, owned by the message's user) and its row locked, which serialises the message_index
        of concurrent writers; the insert trigger then counts the message and moves last_activity
        (migrations 002, 004). A message for a session another user holds raises
        :class:`SessionOwnershipError` (the new session's id is taken: migration 004's trigger fails the
        statement, nothing is written), and so does a message without a user_id for a session that has one, or a
        user's message for a session that belongs to nobody. Message ids are per user: another user's message
        with the same id is a message of that user, stored in that user's rows. ``embedding``: its vector, when
        the write path embedded it (services/memory/carry.py); else the background job embeds it.
        """
        uid = m.user_id or NOBODY
        try:
            async with self.pool.connection() as conn, self._fenced(conn, uid):
                cur = await conn.execute(
                    "WITH s AS ("
                    " INSERT INTO conversation_sessions AS cs (session_id, user_id, created_at, last_activity)"
                    " VALUES (%(sid)s, %(uid)s, to_timestamp(%(ts)s), to_timestamp(%(ts)s))"
                    " ON CONFLICT (user_id, session_id) DO UPDATE SET message_count = cs.message_count"
                    " RETURNING message_count),"
                    " ins AS ("
                    " INSERT INTO conversation_messages (message_id, session_id, user_id, role, content, message_type,"
                    "  message_index, parent_message_id, metadata, is_context_message, token_count, timestamp,"
                    "  embedding)"
                    " SELECT %(mid)s, %(sid)s, %(uid)s, %(role)s, %(content)s, %(mtype)s, s.message_count, %(parent)s,"
                    "  %(meta)s, %(ctx)s, %(tokens)s, to_timestamp(%(ts)s), %(emb)s FROM s"
                    " ON CONFLICT (user_id, message_id) DO NOTHING RETURNING 1)"
                    " SELECT count(*) FROM ins",
                    {"sid": m.session_id, "uid": uid, "ts": m.timestamp, "mid": m.message_id, "role": m.role,
                     "content": m.content, "mtype": m.message_type, "parent": m.parent_message_id,
                     "meta": Jsonb(m.metadata), "ctx": m.is_context_message, "tokens": m.token_count,
                     "emb": embedding},
                )
                row = await cur.fetchone()
        except errors.UniqueViolation as exc:
            if _held_elsewhere(exc):  # (a message without a user_id cannot go into a user's session either)
                raise SessionOwnershipError("session belongs to another user") from None
            raise
        assert row is not None
        return bool(row[0])

    @contextlib.asynccontextmanager
    async def _fenced(self, conn: AsyncConnection, user_id: str) -> AsyncIterator[None]:
        """A request's write (store_message on memory_requests) in a transaction that a deletion of its user after
        the request was taken refuses (shared/runtime/fence.py); a write from the streams as it was, one
        autocommitted statement (the deletion's second pass covers those)."""
        if RECEIVED_AT.get() is None:
            yield
            return
        async with conn.transaction():
            await refuse_if_deleted(conn, user_id, "memory")
            yield

    @contextlib.asynccontextmanager
    async def _given_or_own(self, conn: AsyncConnection | None) -> AsyncIterator[AsyncConnection]:
        """``conn`` (a caller's transaction), or a connection of the pool for this statement alone."""
        if conn is not None:
            yield conn
            return
        async with self.pool.connection() as own:
            yield own

    async def get_message(self, user_id: str, message_id: str) -> MessageInfo:
        async with self.pool.connection() as conn:
            cur = await conn.execute(
                f"SELECT {_MESSAGE_COLS} FROM conversation_messages m WHERE m.message_id = %s AND m.user_id = %s",
                (message_id, user_id),
            )
            row = await cur.fetchone()
        if row is None:
            raise NotFound("no such message")
        return _message(row)

    async def get_messages(self, user_id: str, session_id: str, limit: int, offset: int = 0,
                           newest_first: bool = False) -> list[MessageInfo]:
        order = "DESC" if newest_first else "ASC"  # one of two literals, never input
        async with self.pool.connection() as conn:
            cur = await conn.execute(
                f"SELECT {_MESSAGE_COLS}, s.user_id FROM conversation_sessions s"
                " LEFT JOIN LATERAL (SELECT * FROM conversation_messages WHERE user_id = %s"
                f"  AND session_id = s.session_id ORDER BY message_index {order} LIMIT %s OFFSET %s) m ON true"
                " WHERE s.session_id = %s AND s.user_id = %s",
                (user_id, limit, offset, session_id, user_id),
            )
            rows = await cur.fetchall()
        if not rows:
            raise NotFound("no such session")
        return [_message(r) for r in rows if r[0] is not None]

    async def search_messages(self, user_id: str, query: np.ndarray, *, session_id: str | None, limit: int,
                              threshold: float | None) -> list[MessageInfo]:
        """Exact cosine search over the user's messages (a btree on user_id, no vector index: see
        ../shared/README.md, filtered HNSW returns almost nothing for one user)."""
        if session_id is not None:
            await self.get_session(user_id, session_id)
        async with self.pool.connection() as conn:
            cur = await conn.execute(
                f"SELECT {_MESSAGE_COLS}, 1 - (m.embedding <=> %s) AS similarity FROM conversation_messages m"
                " WHERE m.user_id = %s AND m.embedding IS NOT NULL AND (%s::text IS NULL OR m.session_id = %s)"
                " ORDER BY m.embedding <=> %s LIMIT %s",
                (query, user_id, session_id, session_id, query, limit),
            )
            rows = await cur.fetchall()
        out = [_message(r[:-1], float(r[-1])) for r in rows]
        return [m for m in out if threshold is None or (m.similarity or 0.0) >= threshold]

    async def unembedded(self, *, user_id: str | None = None, limit: int = 256,
                         conn: AsyncConnection | None = None) -> list[Unembedded]:
        """Messages still without an embedding (of one user, or of anyone), oldest first (so each session's turns
        come in order, as the salience model reads them). With ``conn`` (in a transaction) the rows are claimed
        (``FOR UPDATE SKIP LOCKED``) until it ends: another memory copy's pass takes the next ones, not these."""
        cols = "SELECT user_id, message_id, content, session_id, role FROM conversation_messages"
        claim = " FOR UPDATE SKIP LOCKED" if conn is not None else ""
        pending = f"embedding IS NULL AND embed_failures < {MAX_EMBED_FAILURES:d}"
        if user_id is not None:
            sql: str = f"{cols} WHERE user_id = %s AND {pending} ORDER BY timestamp, message_index LIMIT %s"
            params: tuple[Any, ...] = (user_id, limit)
        else:  # the background backfill, oldest first across users: every partition (its partial index each)
            sql, params = f"{cols} WHERE {pending} ORDER BY timestamp, message_index LIMIT %s", (limit,)
        async with self._given_or_own(conn) as c:
            cur = await c.execute(sql + claim, params)
            return [Unembedded(r[0], r[1], r[2], r[3], r[4] == "ai") for r in await cur.fetchall()]

    async def embed_failed(self, messages: Sequence[Unembedded], conn: AsyncConnection) -> list[Unembedded]:
        """Count a failed embedding of each message (its own fault, not an outage); those that reached
        MAX_EMBED_FAILURES, which the background job no longer picks up."""
        cur = await conn.execute(
            "UPDATE conversation_messages m SET embed_failures = m.embed_failures + 1"
            " FROM unnest(%s::text[], %s::text[]) AS f(uid, mid) WHERE m.user_id = f.uid AND m.message_id = f.mid"
            " RETURNING m.message_id, m.embed_failures",
            ([m.user_id for m in messages], [m.message_id for m in messages]))
        spent = {r[0] for r in await cur.fetchall() if r[1] >= MAX_EMBED_FAILURES}
        return [m for m in messages if m.message_id in spent]

    async def set_embeddings(self, rows: Sequence[tuple[str, str, np.ndarray, float | None]],
                             conn: AsyncConnection | None = None) -> None:
        """(user_id, message_id, embedding, salience or None) of each message (in ``conn``'s transaction if given)."""
        if not rows:
            return
        async with self._given_or_own(conn) as c, c.cursor() as cur:
            await cur.executemany(
                "UPDATE conversation_messages SET embedding = %s, salience = %s WHERE user_id = %s AND message_id = %s",
                [(vec, sal, uid, mid) for uid, mid, vec, sal in rows])

    # ------------------------------------------------------------------ STM support
    async def load_summary(self, user_id: str | None, session_id: str) -> SummaryState:
        async with self.pool.connection() as conn:
            cur = await conn.execute(
                "SELECT context_summary, summary_state FROM conversation_sessions WHERE user_id = %s"
                " AND session_id = %s", (user_id or NOBODY, session_id))
            row = await cur.fetchone()
        return SummaryState.from_parts(row[0], row[1]) if row else SummaryState()

    async def save_summary(self, user_id: str | None, session_id: str, state: SummaryState) -> None:
        """Persist the rolling summary; an older state (fewer turns) never overwrites a newer one.

        Without waiting for the WAL flush (``synchronous_commit = off`` for this transaction only): the
        summary is derived from messages that are durable already, and a summary lost in a crash is
        caught up from them on the next fold or rebuild.
        """
        async with self.pool.connection() as conn:
            # One statement, so the setting (local to its transaction) and the update are one round trip.
            await conn.execute(
                "WITH relaxed AS (SELECT set_config('synchronous_commit', 'off', true))"
                " UPDATE conversation_sessions SET context_summary = %s, summary_state = %s FROM relaxed"
                " WHERE user_id = %s AND session_id = %s AND COALESCE((summary_state->>'turns')::int, 0) <= %s",
                (state.text, Jsonb(state.state_json()), user_id or NOBODY, session_id, state.turns),
            )

    async def unfolded_turns(self, user_id: str | None, session_id: str, state: SummaryState,
                             before: float | None = None) -> Backlog:
        """The session's turns the summary has not folded in (by ``state``'s fold point, which must be known:
        :meth:`fold_point_of`), oldest first; with ``before``, only those older than that timestamp (the window's
        oldest turn). On the (session_id, message_index) index: the turns after the fold point and the few it
        skipped, whatever their timestamps. Half a microsecond (the stored precision) is taken off ``before``
        against float noise."""
        assert state.folded_through is not None
        async with self.pool.connection() as conn:
            cur = await conn.execute(
                "SELECT message_id, role, content, extract(epoch from timestamp)::float8, salience, message_index"
                " FROM conversation_messages WHERE user_id = %s AND session_id = %s"
                " AND (message_index > %s OR message_index = ANY(%s))"
                " AND (%s::float8 IS NULL OR timestamp < to_timestamp(%s)) ORDER BY timestamp, message_index",
                (user_id or NOBODY, session_id, state.folded_through, state.not_folded, before,
                 None if before is None else before - 5e-7),
            )
            rows = await cur.fetchall()
        return Backlog([Turn(r[0], "user" if r[1] == "human" else "ai" if r[1] == "ai" else "system", r[2], r[3])
                        for r in rows], {r[0]: float(r[4]) for r in rows if r[4] is not None},
                       {r[0]: int(r[5]) for r in rows})

    async def fold_point_of(self, user_id: str | None, session_id: str, state: SummaryState) -> SummaryState:
        """``state`` with its fold point, for a state written before fold points were kept: it covered the turns up
        to ``covered_until`` (by their timestamps, half a microsecond of float noise allowed). Two index reads: the
        session's highest message index, and the indexes of the turns after that time (the window, a few more)."""
        if state.folded_through is not None:
            return state
        async with self.pool.connection() as conn:
            cur = await conn.execute(
                "SELECT (SELECT max(message_index) FROM conversation_messages WHERE user_id = %(uid)s"
                "   AND session_id = %(sid)s),"
                "  ARRAY(SELECT message_index FROM conversation_messages WHERE user_id = %(uid)s"
                "   AND session_id = %(sid)s AND timestamp > to_timestamp(%(after)s))",
                {"uid": user_id or NOBODY, "sid": session_id, "after": state.covered_until + 5e-7})
            row = await cur.fetchone()
        assert row is not None
        through, unfolded = (-1 if row[0] is None else int(row[0])), {int(i) for i in row[1]}
        while through in unfolded:
            through -= 1
        return replace(state, folded_through=through, not_folded=sorted(i for i in unfolded if i < through))
