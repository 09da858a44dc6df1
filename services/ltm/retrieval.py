"""The native backend's one query path: hybrid candidates, a relevance gate, boosts, neighbouring turns.

1. **Candidates** (one SQL statement, exact within the user): the cosine similarity of every memory
   of the user to the query (pgvector, exact sort: see ../shared/README), and BM25 over PostgreSQL
   full text (``search_tsv``, english stemming; document frequencies and lengths from the user's own
   memories). Both are turned into z-scores over the user's memories and fused:
   ``wd * z(cosine) + wk * z(bm25)``; the best ``candidates`` rows come back.
2. **Relevance** adds, in z units: a *time* term (``time`` when the memory's timestamp falls in a
   period the query names: "on 9 November, 2022" = that day +-2 days, "in May 2022", "in August",
   "in 2023") and a *neighbour* term (``neighbour`` x the best relevance of the turns just before
   and after in the same session: an answer often sits next to the turn that matches the question).
3. **Gate**: a memory is eligible only with real evidence of relevance (a query term matches, or
   cosine >= ``min_similarity``), within the ``gate_pool`` most relevant and above ``threshold``
   (cosine) when the request sets one. Boosts reorder eligible memories only, so they can never pull
   in an unrelated memory.
4. **Score** of an eligible memory, by profile: ``relevance * z + semantic * cosine + recency * r +
   access * a + confidence * c + salience * (s - 0.5)`` (r = 2^(-age / half life), a = log1p(uses) /
   log1p(most uses among the eligible), c = confidence, s = the memory's salience from ingest, a NULL one
   neutral; ``LTM_SALIENCE_WEIGHT``, any profile), minus ``superseded`` for a memory that a newer statement replaced (it
   also comes after the memory that replaced it when both are found: history stays visible, below). One
   memory per source message (a turn and the facts extracted from it are one result).
5. **Context within a token budget**: results and their neighbouring turns (``context``) share one
   budget of ``max_tokens`` (all-MiniLM-L6-v2 WordPiece tokens, counted on what is returned). Greedy:
   the next result has priority ``score``; the turn at distance d from result i has priority
   ``score_i - neighbour_cost * d * spread`` (spread = the standard deviation of the eligible scores),
   so the budget goes where the evidence is likeliest. A memory already shown as context is not
   repeated as a result.

Profiles (``LTM_RANK_PROFILE``): ``hybrid`` (default, weights chosen on the LoCoMo dev split, see the
README) and ``seed`` (the seed's 0.4 semantic, 0.3 recency, 0.2 access, 0.1 confidence, applied after
the same relevance gate).
"""

from __future__ import annotations

import heapq
import re
import string
import time
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np
from psycopg.rows import dict_row
from psycopg_pool import AsyncConnectionPool

from services.ltm.candidates import Candidates, fuse_columns, gate_columns, neighbour_best
from services.ltm.config import LtmSettings
from services.ltm.held import KEYS, ROW_COLUMNS
from services.ltm.periods import in_periods, query_periods
from services.ltm.search_index import SearchIndex
from shared.contracts import Memory, MemorySource
from shared.contracts.messages import ContextTurn, SearchData
from shared.runtime.tokens import wordpiece

DAY = 86_400.0


@dataclass(frozen=True, slots=True)
class Profile:
    """Weights of one ranking profile (documented in the module docstring and the README)."""

    name: str
    # 0.7/0.3: LoCoMo's plateau (0.6/0.4 0.905, 0.7/0.3 0.903) and LongMemEval's dense-leaning turns (README)
    dense: float = 0.7
    keyword: float = 0.3
    time: float = 2.0
    neighbour: float = 0.3
    # penalties in z units (step 2): what the assistant said, unless the query asks about the assistant's words,
    # and a turn that only asks a question; both stay findable, below the user's own statements
    assistant: float = 2.0
    question: float = 3.0
    # final score of an eligible memory
    relevance: float = 1.0
    semantic: float = 0.0
    recency: float = 0.0
    access: float = 0.0
    confidence: float = 0.0


PROFILES: dict[str, Profile] = {
    "hybrid": Profile("hybrid"),
    "seed": Profile("seed", relevance=0.0, semantic=0.4, recency=0.3, access=0.2, confidence=0.1),
}


@dataclass(frozen=True, slots=True)
class RetrievalConfig:
    profile: Profile = field(default_factory=lambda: PROFILES["hybrid"])
    candidates: int = 1000
    gate_pool: int = 50
    min_similarity: float = 0.2
    context_turns: int = 5
    neighbour_cost: float = 1.0
    max_tokens: int = 1000
    half_life_days: float = 30.0
    superseded: float = 1.0
    salience: float = 0.0  # LTM_SALIENCE_WEIGHT: + salience x (s - 0.5) on the score, NULL neutral
    bm25_k1: float = 1.2
    bm25_b: float = 0.75

    @classmethod
    def from_settings(cls, s: LtmSettings) -> RetrievalConfig:
        return cls(profile=PROFILES[s.ltm_rank_profile], candidates=s.ltm_candidates,
                   min_similarity=s.ltm_min_similarity, context_turns=s.ltm_context_turns,
                   max_tokens=s.ltm_result_tokens, half_life_days=s.ltm_decay_half_life_days,
                   salience=s.ltm_salience_weight)

    def with_profile(self, name: str) -> RetrievalConfig:
        return replace(self, profile=PROFILES[name])


# --------------------------------------------------------------------------- tokens
_TOKEN_CACHE: OrderedDict[str, int] = OrderedDict()
TOKEN_CACHE_SIZE = 50_000


def clear_token_cache() -> None:
    _TOKEN_CACHE.clear()


def token_counts(texts: Sequence[str]) -> list[int]:
    """WordPiece tokens of the embedding model (no special tokens): the unit of ``max_tokens``. No cache: safe in
    any thread (ingest counts what it stores, ``ltm_memories.content_tokens``)."""
    if not texts:
        return []
    return [len(enc.ids) for enc in wordpiece().encode_batch(list(texts), add_special_tokens=False)]


def count_tokens(texts: Sequence[str]) -> list[int]:
    """:func:`token_counts`, cached by text (LRU; the event loop's): the same turns come back as results and context
    again and again. Rows counted at ingest (``content_tokens``) do not come here."""
    missing = [t for t in dict.fromkeys(texts) if t not in _TOKEN_CACHE]
    if missing:
        for text, n in zip(missing, token_counts(missing), strict=True):
            _TOKEN_CACHE[text] = n
    out = []
    for text in texts:
        _TOKEN_CACHE.move_to_end(text)
        out.append(_TOKEN_CACHE[text])
    while len(_TOKEN_CACHE) > TOKEN_CACHE_SIZE:
        _TOKEN_CACHE.popitem(last=False)
    return out


# --------------------------------------------------------------------------- SQL
HYBRID_SQL = string.Template("""
WITH ql AS (
    SELECT coalesce(array_agg(lexeme), '{{}}'::text[]) AS lx FROM unnest(to_tsvector('english', %(query)s))
), tq AS (
    SELECT lx, CASE WHEN cardinality(lx) > 0
        THEN array_to_string(ARRAY(SELECT quote_literal(l) FROM unnest(lx) AS l), ' | ')::tsquery END AS q
    FROM ql
), base AS MATERIALIZED (
    SELECT $columns,
           (1 - (m.embedding <=> %(vec)s))::float8 AS sim,
           m.search_tsv AS tsv, length(m.search_tsv) AS dl,
           (tq.q IS NOT NULL AND m.search_tsv @@ tq.q) AS hit
    FROM $table m CROSS JOIN tq
    WHERE m.user_id = %(user_id)s {filters}
), terms AS (
    SELECT b.$key, b.dl, u.lexeme, coalesce(array_length(u.positions, 1), 1)::float8 AS tf
    FROM base b CROSS JOIN tq CROSS JOIN LATERAL unnest(b.tsv) AS u
    WHERE b.hit AND u.lexeme = ANY(tq.lx)
), coll AS (
    SELECT count(*)::float8 AS n, coalesce(avg(dl), 0)::float8 AS avgdl,
           coalesce(avg(sim), 0)::float8 AS sim_mean, coalesce(stddev_pop(sim), 0)::float8 AS sim_sd
    FROM base
), df AS (
    SELECT lexeme, count(*)::float8 AS df FROM terms GROUP BY lexeme
), kw AS (
    SELECT t.$key, sum(ln(1 + (c.n - d.df + 0.5) / (d.df + 0.5)) * t.tf * (%(k1)s + 1)
        / (t.tf + %(k1)s * (1 - %(b)s + %(b)s * t.dl / greatest(c.avgdl, 1))))::float8 AS bm25
    FROM terms t JOIN df d USING (lexeme) CROSS JOIN coll c GROUP BY t.$key
), kstat AS (
    SELECT coalesce(sum(bm25), 0)::float8 AS s1, coalesce(sum(bm25 * bm25), 0)::float8 AS s2 FROM kw
)
SELECT $out, b.sim,
       coalesce(k.bm25, 0)::float8 AS bm25, c.n, c.sim_mean, c.sim_sd, s.s1, s.s2
FROM base b LEFT JOIN kw k USING ($key) CROSS JOIN coll c CROSS JOIN kstat s
ORDER BY %(wd)s * b.sim / greatest(c.sim_sd, 1e-9)
       + %(wk)s * coalesce(k.bm25, 0) / greatest(sqrt(greatest(s.s2 / c.n - (s.s1 / c.n) ^ 2, 0)), 1e-9) DESC,
       b.$key
LIMIT %(candidates)s
""")


def hybrid_sql(table: str, key: str, columns: str, keys: Sequence[str]) -> str:
    """The first stage of a hybrid search over ``table`` (step 1 of the module docstring), for any table of rows
    with ``user_id``, ``embedding`` (vector) and ``search_tsv`` (tsvector): ``columns`` are the expressions of
    ``m`` (the table) each candidate row carries, named ``keys``; ``key`` is the row's unique column. Rows come
    with ``sim``, ``bm25`` and the statistics ``n``, ``sim_mean``, ``sim_sd``, ``s1``, ``s2`` (:func:`fuse`),
    best ``%(candidates)s`` first by the fused score. ``{filters}`` is left for further ``AND`` conditions on ``m``.
    ``table``, ``key`` and ``columns`` are the code's own constants, never input."""
    return HYBRID_SQL.substitute(table=table, key=key, columns=columns, out=", ".join(f"b.{k}" for k in keys))


_CANDIDATES = hybrid_sql("ltm_memories", "memory_id", ROW_COLUMNS, KEYS)

# The ``w`` episodic turns just before and just after each anchor, in its session (timestamp order), and for a
# typed memory (a fact extracted from a turn) the turn it came from (side 0: the words the fact was read from).
# Every scan names the user by the parameter (not h.user_id), so each is pruned to the user's partition when planned.
_NEIGHBOURS = """
SELECT h.memory_id::text AS anchor, x.memory_id::text, x.content, x.source_message_id, x.source_session_id,
       x.source_timestamp, x.speaker, x.side, x.content_tokens
FROM ltm_memories h CROSS JOIN LATERAL (
    (SELECT n.memory_id, n.content, n.source_message_id, n.source_session_id, n.source_timestamp,
            n.speaker, -1 AS side, n.content_tokens
     FROM ltm_memories n
     WHERE n.user_id = %(user_id)s AND n.source_session_id = h.source_session_id AND n.type = 'episodic'
       AND n.source_timestamp < h.source_timestamp
     ORDER BY n.source_timestamp DESC LIMIT %(w)s)
    UNION ALL
    (SELECT n.memory_id, n.content, n.source_message_id, n.source_session_id, n.source_timestamp,
            n.speaker, 1 AS side, n.content_tokens
     FROM ltm_memories n
     WHERE n.user_id = %(user_id)s AND n.source_session_id = h.source_session_id AND n.type = 'episodic'
       AND n.source_timestamp > h.source_timestamp
     ORDER BY n.source_timestamp ASC LIMIT %(w)s)
    UNION ALL
    (SELECT n.memory_id, n.content, n.source_message_id, n.source_session_id, n.source_timestamp,
            n.speaker, 0 AS side, n.content_tokens
     FROM ltm_memories n
     WHERE %(source_turns)s AND h.type <> 'episodic' AND n.user_id = %(user_id)s
       AND n.source_session_id = h.source_session_id AND n.type = 'episodic'
       AND n.source_message_id = h.source_message_id
     LIMIT 1)
) AS x
WHERE h.user_id = %(user_id)s AND h.memory_id = ANY(%(ids)s::uuid[])
  AND h.source_session_id IS NOT NULL AND h.source_timestamp IS NOT NULL
"""

# The heads' own rows (``anchor`` NULL) and, when ``w`` > 0, their neighbouring turns: one round trip.
_ROWS_AND_NEIGHBOURS = (
    "SELECT NULL::text AS anchor, memory_id::text, content, source_message_id, source_session_id,"
    " source_timestamp, speaker, NULL::int AS side, content_tokens FROM ltm_memories"
    " WHERE user_id = %(user_id)s AND memory_id = ANY(%(ids)s::uuid[])"
    " UNION ALL (" + _NEIGHBOURS.strip() + " AND %(w)s > 0)"
)


# --------------------------------------------------------------------------- ranking (pure)
@dataclass(slots=True)
class Ranked:
    """Eligible candidates with their final score, best first."""

    rows: list[dict[str, Any]]
    score: np.ndarray


_ABOUT_ASSISTANT = re.compile(
    r"\byou (?:\w+ ){0,2}(?:said|say|told|tell|recommend|suggest|mention|gave|give|provid|list|explain|describ|"
    r"wrote|write|shar|propos|came up|call|name|advis)\w*|\byour (?:\w+ )?(?:suggestion|recommendation|advice|answer|"
    r"response|list|explanation|idea|tip)s?\b|\b(?:our|the) (?:previous|last|earlier|past) (?:conversation|chat|"
    r"discussion)s?\b|\bremind me\b", re.IGNORECASE)


def about_assistant(query: str) -> bool:
    """Whether the query asks what the assistant said ("what did you recommend", "remind me", "our last chat")."""
    return _ABOUT_ASSISTANT.search(query) is not None


def fuse(rows: Sequence[dict[str, Any]], dense: float, keyword: float) -> np.ndarray:
    """``dense * z(cosine) + keyword * z(bm25)`` of candidate rows of :func:`hybrid_sql` (step 1), the z-scores over
    every row the first stage read (its statistics columns), not only the candidates returned."""
    return fuse_columns(Candidates.of_scores(rows), dense, keyword)


def gate(rows: Sequence[dict[str, Any]], rel: np.ndarray, pool: int, min_similarity: float,
         threshold: float | None) -> list[int]:
    """Step 3: of the ``pool`` most relevant rows, in relevance order, those with evidence of relevance (a query
    term matches, or cosine >= ``min_similarity``) and at least ``threshold`` cosine when one is set."""
    c = Candidates.of_scores(rows)
    return gate_columns(c.sim, c.bm25, rel, pool, min_similarity, threshold)


def relevance(c: Candidates, query: str, cfg: RetrievalConfig, now: float | None = None) -> np.ndarray:
    """Fused relevance of the candidates (see the module docstring, step 2)."""
    p = cfg.profile
    if not len(c):
        return np.zeros(0)
    rel = fuse_columns(c, p.dense, p.keyword)
    periods = query_periods(query, now) if p.time else []
    if periods:
        rel = rel + p.time * in_periods(c.ts, periods)
    if p.neighbour:
        rel = rel + p.neighbour * neighbour_best(c.session, c.ts, rel)
    if p.assistant and not about_assistant(query):
        rel = rel - p.assistant * c.ai
    if p.question:
        rel = rel - p.question * c.question
    return rel


def rank(c: Candidates, query: str, cfg: RetrievalConfig, threshold: float | None,
         now: float | None = None, keep: int | None = None) -> Ranked:
    """Relevance, the gate, then the profile's score; one memory per source message; best first. Only the best
    ``keep`` (default all) come back, as rows of their own (:meth:`Candidates.row`); the others are scored from
    the first stage's rows, read in place."""
    rel = relevance(c, query, cfg, now)
    eligible = gate_columns(c.sim, c.bm25, rel, cfg.gate_pool, cfg.min_similarity, threshold)
    if not eligible:
        return Ranked([], np.zeros(0))
    seen_rows = [c.rows[i] for i in eligible]  # read only: no await until the rows below are copied
    p = cfg.profile
    now = time.time() if now is None else now
    score = p.relevance * rel[eligible] + p.semantic * c.sim[eligible]
    if p.recency:
        age = np.array([max(now - float(r["source_timestamp"] or r["created_at"]), 0.0) for r in seen_rows]) / DAY
        score = score + p.recency * np.exp2(-age / cfg.half_life_days)
    if p.access:
        uses = np.log1p(np.array([float(r["access_count"]) for r in seen_rows]))
        score = score + p.access * (uses / uses.max() if uses.max() > 0 else uses)
    if p.confidence:
        score = score + p.confidence * np.array([float(r["confidence"]) for r in seen_rows])
    if cfg.salience:
        score = score + cfg.salience * np.array([float(r["salience"]) - 0.5 if r.get("salience") is not None
                                                 else 0.0 for r in seen_rows])
    score = score - cfg.superseded * np.array([1.0 if r["valid_to"] is not None else 0.0 for r in seen_rows])
    seen: set[str] = set()
    picked: list[int] = []
    for i in _after_successors(seen_rows, [int(i) for i in np.argsort(-score, kind="stable")]):
        key = seen_rows[i]["source_message_id"] or str(seen_rows[i]["memory_id"])
        if key not in seen:
            seen.add(key)
            picked.append(i)
            if keep is not None and len(picked) >= keep:
                break
    return Ranked([c.row(eligible[i]) for i in picked], score[picked])


def _after_successors(rows: list[dict[str, Any]], order: list[int]) -> list[int]:
    """``order`` with each superseded memory moved just after the memory that replaced it, when both are here."""
    present = {str(r["memory_id"]) for r in rows}
    waiting: dict[str, list[int]] = {}
    out: list[int] = []

    def place(i: int) -> None:
        out.append(i)
        for j in waiting.pop(str(rows[i]["memory_id"]), []):
            place(j)

    for i in order:
        successor = rows[i]["superseded_by"]
        if successor is not None and str(successor) in present and all(
                str(rows[k]["memory_id"]) != str(successor) for k in out):
            waiting.setdefault(str(successor), []).append(i)
        else:
            place(i)
    for rest in waiting.values():  # a cycle of replacements: keep their score order
        out.extend(rest)
    return out


@dataclass(slots=True)
class Turn:
    memory_id: str
    content: str
    message_id: str | None
    timestamp: float | None
    speaker: str | None
    tokens: int = -1  # counted when first needed

    def cost(self) -> int:
        if self.tokens < 0:
            self.tokens = count_tokens([self.content])[0]
        return self.tokens


def counted(turns: Sequence[Turn]) -> None:
    """Count the tokens of all ``turns`` in one tokenizer call (what :meth:`Turn.cost` would do one by one)."""
    todo = [t for t in turns if t.tokens < 0]
    for t, n in zip(todo, count_tokens([t.content for t in todo]), strict=True):
        t.tokens = n


@dataclass(slots=True)
class Packed:
    anchor: int
    context: list[Turn]


def pack(scores: Sequence[float], anchors: Sequence[Turn], neighbours: Sequence[Sequence[tuple[int, Turn]]],
         limit: int, max_tokens: int, neighbour_cost: float, turn_tokens: int | None = None) -> list[Packed]:
    """Choose results and context turns within ``max_tokens`` (module docstring, step 5).

    ``neighbours[i]`` holds (distance, turn) of anchor i, distance 1 = adjacent, 0 = the turn a typed
    result was extracted from. With ``turn_tokens``, a turn costs at most that much (the reader cuts longer ones).
    """
    spread = float(np.std(scores)) if len(scores) > 1 else 1.0
    spread = spread if spread > 1e-9 else 1.0
    heap: list[tuple[float, int, int, int]] = [(-float(s), i, -1, 0) for i, s in enumerate(scores)]
    heapq.heapify(heap)
    shown: set[str] = set()
    packed: dict[int, Packed] = {}
    used = 0
    while heap:
        _, anchor, j, dist = heapq.heappop(heap)
        turn = anchors[anchor] if j < 0 else neighbours[anchor][j][1]
        own_source = j >= 0 and dist == 0  # the turn a typed result was extracted from: same message id
        if turn.memory_id in shown or (turn.message_id and turn.message_id in shown and not own_source):
            continue
        cost = turn.cost() if turn_tokens is None else min(turn.cost(), turn_tokens)
        if used + cost > max_tokens and (j >= 0 or packed):
            continue
        if j < 0:
            if len(packed) >= limit:
                continue
            packed[anchor] = Packed(anchor, [])
            for k, (dist, _) in enumerate(neighbours[anchor]):
                heapq.heappush(heap, (-(float(scores[anchor]) - neighbour_cost * dist * spread), anchor, k, dist))
        else:
            packed[anchor].context.append(turn)
        used += cost
        shown.add(turn.memory_id)
        if turn.message_id:
            shown.add(turn.message_id)
    return list(packed.values())


# --------------------------------------------------------------------------- the query path
def _known(turn: Turn) -> int | None:
    return turn.tokens if turn.tokens >= 0 else None


def _turn(row: tuple[Any, ...]) -> Turn:
    """A turn of a _ROWS_AND_NEIGHBOURS row (anchor, memory_id, content, source_message_id, source_session_id,
    source_timestamp, speaker, side, content_tokens): plain tuples and text ids, no dict or UUID per row (a search
    reads up to 20 results and 10 context turns of each)."""
    tokens = row[8]  # counted at ingest; NULL: counted now (counted())
    return Turn(row[1], row[2], row[3], row[5], row[6], -1 if tokens is None else tokens)


async def search(pool: AsyncConnectionPool, user_id: str, data: SearchData, embedding: np.ndarray,
                 cfg: RetrievalConfig, index: SearchIndex | None = None) -> list[Memory]:
    filters, params = "", {
        "user_id": user_id, "query": data.query, "vec": embedding, "k1": cfg.bm25_k1, "b": cfg.bm25_b,
        "wd": cfg.profile.dense, "wk": cfg.profile.keyword, "candidates": cfg.candidates,
    }
    if data.types:
        filters += " AND m.type = ANY(%(types)s)"
        params["types"] = list(data.types)
    if data.session_id:
        filters += " AND m.source_session_id = %(session_id)s"
        params["session_id"] = data.session_id
    if data.exclude_session_id:
        filters += " AND m.source_session_id IS DISTINCT FROM %(exclude_session_id)s"
        params["exclude_session_id"] = data.exclude_session_id
    async with pool.connection() as conn:
        cur = conn.cursor(row_factory=dict_row)
        # the same candidate rows from the process's index (services/ltm/search_index.py), else in SQL
        found = None if index is None else await index.candidates(conn, user_id, data, embedding, cfg)
        if found is None:
            await cur.execute(_CANDIDATES.format(filters=filters), params)
            found = Candidates.of_rows(await cur.fetchall())
        ranked = rank(found, data.query, cfg, data.threshold, data.now, keep=max(2 * data.limit, data.limit + 10))
        heads = ranked.rows
        if not heads:
            return []
        ids = [r["memory_id"] for r in heads]
        rows = await conn.execute(_ROWS_AND_NEIGHBOURS, {"user_id": user_id, "ids": ids, "w": cfg.context_turns,
                                                         "source_turns": data.source_turns})
        content: dict[str, Turn] = {}
        sides: dict[tuple[str, int], list[tuple[Any, ...]]] = {}
        for r in await rows.fetchall():
            if r[0] is None:
                content[r[1]] = _turn(r)
            else:
                sides.setdefault((r[0], r[7]), []).append(r)
        near: dict[str, list[tuple[int, Turn]]] = {str(i): [] for i in ids}
        for (anchor, side), turns in sides.items():
            turns.sort(key=lambda t: t[5], reverse=side < 0)
            near[anchor].extend((d, _turn(t)) for d, t in enumerate(turns, start=1 if side else 0))
    # in rank order (a replaced memory placed after its replacement never outranks it)
    ordered = np.minimum.accumulate(ranked.score[: len(heads)])
    keys = [str(r["memory_id"]) for r in heads]
    live = [i for i, k in enumerate(keys) if k in content]  # not deleted meanwhile
    heads, keys, scores = [heads[i] for i in live], [keys[i] for i in live], [float(ordered[i]) for i in live]
    anchors = [content[k] for k in keys]
    neighbours = [near[k] for k in keys]
    counted([*anchors, *(t for side in neighbours for _, t in side)])
    packed = pack(scores, anchors, neighbours, data.limit, data.max_tokens or cfg.max_tokens, cfg.neighbour_cost,
                  data.turn_tokens)
    out = []
    for item in packed:
        row, full = heads[item.anchor], anchors[item.anchor]
        context = sorted(item.context, key=lambda t: t.timestamp or 0.0)
        out.append(Memory(
            memory_id=full.memory_id, type=row["type"], content=full.content,
            score=scores[item.anchor], similarity=float(row["sim"]),
            confidence=float(row["confidence"]), created_at=float(row["created_at"]),
            last_accessed=row["last_accessed"], access_count=int(row["access_count"]),
            entities=list(row["entities"] or []), valid_to=row["valid_to"],
            superseded_by=str(row["superseded_by"]) if row["superseded_by"] else None,
            source=MemorySource(message_id=row["source_message_id"], session_id=row["source_session_id"],
                                timestamp=row["source_timestamp"], speaker=row["speaker"]),
            context=[ContextTurn(message_id=t.message_id, content=t.content, timestamp=t.timestamp,
                                 speaker=t.speaker, tokens=_known(t)) for t in context],
            tokens=_known(full),  # every turn was counted (counted() above): chat_ai need not tokenize it again
        ))
    return out
