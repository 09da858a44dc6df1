"""The bench's data: texts and questions from the dev splits, and a seeded ``ltm_memories``.

**Texts.** The pool of memory texts is LoCoMo's turns (``"<speaker>: <text>"``, the way the eval
feeds them) topped up with LongMemEval's shorter user turns; queries are the questions of both
files, each asked once per wrapper form ("Remind me: ...") so that no query text repeats within
a run (a query cache must not make a repeated question look like a fast search).

**Seeding** writes directly with SQL (binary ``COPY``), never through the services: a user with
``n`` memories gets every pool text once (shuffled), then two-sentence turns (two pool texts
joined) until it has ``n``, all episodic, in sessions of 20 turns with increasing timestamps.
Embeddings are the real all-MiniLM-L6-v2 vectors of the pool texts (computed once with the
project's embedder, cached under the bench's data directory), the normalised sum for a joined
pair, each with small Gaussian noise (cosine to the clean vector about 0.98) and normalised.
The seeded database is kept: the next run with the same plan reuses it (``--force-seed`` redoes it).
"""

from __future__ import annotations

import hashlib
import json
import random
import re
import time
import uuid
import zlib
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import numpy as np
import psycopg
from psycopg import sql
from psycopg.types.json import Jsonb

from mesh.bench_procs import ROOT, say
from services.ltm.retrieval import token_counts

SEED_VERSION = 2  # 2: content_tokens counted, as ingest does (ltm migration 010)
SESSION_TURNS = 20
NOISE = 0.01  # per dimension; |noise| ~ 0.2 on a unit 384-d vector
MIGRATIONS = {"memory": ROOT / "services" / "memory" / "migrations", "ltm": ROOT / "services" / "ltm" / "migrations"}
WRAPPERS = ("{q}", "Remind me: {q}", "Do you remember? {q}", "Quick question. {q}", "I forgot, {q}",
            "Tell me again: {q}", "Can you recall this? {q}", "One more thing: {q}", "Help me remember. {q}",
            "Sorry to ask again: {q}")
REQUIRED = ("memory_id", "user_id", "type", "content", "content_hash", "embedding")
_WS = re.compile(r"\s+")


# --------------------------------------------------------------------------- texts
@dataclass(frozen=True, slots=True)
class IngestTurn:
    """One update of an ingest workload: a turn of a LoCoMo conversation or a LongMemEval history."""

    conversation: int
    session: str
    speaker: str
    source: str  # "user" | "ai"
    content: str
    timestamp: float


@dataclass(frozen=True)
class Corpus:
    pool: list[str]
    questions: list[str]
    short_turns: list[IngestTurn]  # LoCoMo
    long_turns: list[IngestTurn]  # LongMemEval_S, user and assistant

    def digest(self) -> str:
        return hashlib.sha256("\x1f".join(self.pool).encode()).hexdigest()[:16]


def _locomo_date(text: Any, fallback: float) -> float:
    for fmt in ("%I:%M %p on %d %B, %Y", "%I:%M %p on %d %b, %Y", "%I:%M %p on %B %d, %Y"):
        try:
            return datetime.strptime(str(text).strip(), fmt).replace(tzinfo=UTC).timestamp()
        except ValueError:
            continue
    return fallback


def _lme_date(text: Any, fallback: float) -> float:
    try:
        return datetime.strptime(str(text)[:10], "%Y/%m/%d").replace(tzinfo=UTC).timestamp()
    except ValueError:
        return fallback


def load_corpus(locomo: Path, longmemeval: Path, pool_size: int) -> Corpus:
    """Texts, questions and ingest turns from a LoCoMo-format and a LongMemEval-format file."""
    short: list[IngestTurn] = []
    questions: list[str] = []
    for n, sample in enumerate(json.loads(locomo.read_text(encoding="utf-8"))):
        conv = sample.get("conversation", {})
        numbers = sorted(int(m.group(1)) for k in conv if (m := re.fullmatch(r"session_(\d+)", k)))
        when = 1_600_000_000.0
        for s in numbers:
            when = _locomo_date(conv.get(f"session_{s}_date_time"), when + 86_400)
            for i, t in enumerate(conv.get(f"session_{s}") or []):
                text = str(t.get("text") or "").strip()
                if t.get("blip_caption"):
                    text = f"{text} [shares a photo: {t['blip_caption']}]".strip()
                if text:
                    speaker = str(t.get("speaker") or "Someone")
                    short.append(IngestTurn(n, f"c{n}-s{s}", speaker, "user", f"{speaker}: {text}", when + i))
        questions += [str(q["question"]) for q in sample.get("qa", []) if q.get("question")]
    long: list[IngestTurn] = []
    extra_pool: list[str] = []
    for n, item in enumerate(json.loads(longmemeval.read_text(encoding="utf-8"))):
        questions.append(str(item.get("question") or "").strip())
        dates = item.get("haystack_dates") or []
        for s, session in enumerate(item.get("haystack_sessions") or []):
            when = _lme_date(dates[s] if s < len(dates) else "", 1_600_000_000.0 + s * 86_400)
            for i, t in enumerate(session):
                text = str(t.get("content") or "").strip()
                if not text:
                    continue
                role = "ai" if t.get("role") == "assistant" else "user"
                long.append(IngestTurn(n, f"q{n}-s{s}", role, role, text, when + i))
                if role == "user" and 20 <= len(text) <= 400:
                    extra_pool.append(f"User: {text}")
    unique: dict[str, str] = {}
    for text in [*(t.content for t in short), *extra_pool]:
        unique.setdefault(_key(text), text)  # the first spelling of each text
    pool = list(unique.values())
    if len(pool) < 2:
        raise SystemExit(f"too few texts in {locomo} and {longmemeval} to build a memory pool")
    return Corpus(pool[:pool_size], [q for q in dict.fromkeys(questions) if q], short, long)


class Queries:
    """Realistic questions, never the same text twice in a run (a new wrapper form on each pass)."""

    def __init__(self, questions: list[str], seed: int = 11) -> None:
        self.questions = list(questions)
        random.Random(seed).shuffle(self.questions)
        self.i = 0

    def next(self) -> str:
        q = self.questions[self.i % len(self.questions)]
        form = WRAPPERS[(self.i // len(self.questions)) % len(WRAPPERS)]
        self.i += 1
        return form.format(q=q if form.startswith("{q}") else q[:1].lower() + q[1:])


# --------------------------------------------------------------------------- the plan and the database
@dataclass(frozen=True)
class SeedPlan:
    sizes: tuple[int, ...]  # memories per user of the users searched
    filler_users: int  # users with filler_size memories each (the chat workload's users among them)
    filler_size: int = 1000
    pool_size: int = 4000

    @staticmethod
    def size_user(n: int) -> str:
        return f"bench-size-{n}"

    @staticmethod
    def filler_user(i: int) -> str:
        return f"bench-fill-{i:05d}"

    def users(self) -> list[tuple[str, int]]:
        return ([(self.size_user(n), n) for n in self.sizes]
                + [(self.filler_user(i), self.filler_size) for i in range(self.filler_users)])

    def rows(self) -> int:
        return sum(n for _, n in self.users())

    def identity(self, corpus: Corpus) -> dict[str, Any]:
        return {"version": SEED_VERSION, **asdict(self), "pool": corpus.digest(), "noise": NOISE}


def database_url(admin_url: str, name: str) -> str:
    return urlunsplit(urlsplit(admin_url)._replace(path=f"/{name}"))


async def _identity(url: str) -> dict[str, Any] | None:
    try:
        async with await psycopg.AsyncConnection.connect(url, autocommit=True) as conn:
            cur = await conn.execute("SELECT identity FROM bench_seed WHERE id = 1 AND done_at IS NOT NULL")
            row = await cur.fetchone()
            return dict(row[0]) if row else None
    except psycopg.Error:
        return None


async def prepare(admin_url: str, name: str, plan: SeedPlan, corpus: Corpus, data_dir: Path,
                  force: bool = False) -> tuple[str, dict[str, Any]]:
    """The bench database, seeded for ``plan`` (reused when it already is): (url, what was done)."""
    from shared.runtime.db import migrate

    url = database_url(admin_url, name)
    identity = json.loads(json.dumps(plan.identity(corpus)))  # as it comes back from jsonb (tuples are lists)
    if not force and await _identity(url) == identity:
        for component, directory in MIGRATIONS.items():  # a migration added since is applied to the kept data
            await migrate(url, component, directory)
        say(f"seed: reusing database {name} ({plan.rows():,} memories; --force-seed to redo it)")
        return url, {"reused": True, "database": name, "rows": plan.rows(), "users": len(plan.users())}
    async with await psycopg.AsyncConnection.connect(admin_url, autocommit=True) as conn:
        await conn.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name)))
        await conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
    for component, directory in MIGRATIONS.items():
        await migrate(url, component, directory)
    started = time.perf_counter()
    vectors = pool_vectors(corpus, data_dir)
    await _copy_rows(url, plan, corpus.pool, vectors)
    seconds = time.perf_counter() - started
    async with await psycopg.AsyncConnection.connect(url, autocommit=True) as conn:
        await conn.execute("ANALYZE")
        await conn.execute("CREATE TABLE IF NOT EXISTS bench_seed (id int PRIMARY KEY, identity jsonb NOT NULL,"
                           " seconds real, done_at timestamptz)")
        await conn.execute("INSERT INTO bench_seed VALUES (1, %s, %s, now())", (Jsonb(identity), seconds))
    say(f"seed: {plan.rows():,} memories for {len(plan.users())} users in {seconds:.0f}s")
    return url, {"reused": False, "database": name, "rows": plan.rows(), "users": len(plan.users()),
                 "seconds": round(seconds, 1), "rows_per_s": round(plan.rows() / seconds)}


def pool_vectors(corpus: Corpus, data_dir: Path) -> np.ndarray:
    """Embeddings of the pool texts with the project's embedder, cached by the pool's digest."""
    cache = data_dir / f"pool-{corpus.digest()}-{len(corpus.pool)}.npy"
    if cache.exists():
        return np.load(cache)
    from shared.runtime.embedding import shared_model

    say(f"seed: embedding {len(corpus.pool)} pool texts (once; cached in {cache})")
    vectors = np.asarray(shared_model().encode(corpus.pool), dtype=np.float32)
    cache.parent.mkdir(parents=True, exist_ok=True)
    np.save(cache, vectors)
    return vectors


def _key(text: str) -> str:
    """What the content hash is of (as the ltm store computes it): trimmed, lower case, single spaces."""
    return _WS.sub(" ", text.strip().lower())


def _normalise(v: np.ndarray) -> np.ndarray:
    return (v / np.linalg.norm(v, axis=1, keepdims=True)).astype(np.float32)


def user_rows(user_id: str, n: int, pool: list[str], vectors: np.ndarray) -> Iterator[dict[str, Any]]:
    """The ``n`` memories of one seeded user, deterministic for the user id."""
    rng = np.random.default_rng(zlib.crc32(user_id.encode()))
    p = len(pool)
    if n > p * (p - 1) // 2:
        raise ValueError(f"a pool of {p} texts cannot make {n} distinct memories")
    items = [(int(i), -1, pool[int(i)]) for i in rng.permutation(p)[:n]]
    seen = {_key(t) for _, _, t in items}
    while len(items) < n:  # then two pool texts as one turn, every text distinct (the unique index holds)
        a, b = (int(x) for x in rng.integers(0, p, 2))
        text = f"{pool[a]} {pool[b].partition(': ')[2] or pool[b]}"
        if a != b and _key(text) not in seen:
            seen.add(_key(text))
            items.append((a, b, text))
    order = rng.permutation(len(items))
    base = time.time() - (n // SESSION_TURNS + 2) * 43_200.0  # two sessions a day, ending now
    for start in range(0, n, 4096):
        chunk = [items[int(k)] for k in order[start:start + 4096]]
        first = np.array([x for x, _, _ in chunk])
        second = np.array([y for _, y, _ in chunk])
        vec = vectors[first].copy()
        joined = second >= 0
        vec[joined] = _normalise(vectors[first[joined]] + vectors[second[joined]])
        vec = _normalise(vec + rng.normal(0.0, NOISE, vec.shape).astype(np.float32))
        counts = token_counts([text for _, _, text in chunk])
        for j, (x, _, text) in enumerate(chunk):
            i = start + j
            speaker = pool[x].partition(": ")[0] if ": " in pool[x][:40] else "User"
            session = i // SESSION_TURNS
            yield {
                "memory_id": uuid.uuid4(), "user_id": user_id, "type": "episodic", "content": text,
                "content_hash": hashlib.sha256(_key(text).encode()).hexdigest(),
                "embedding": vec[j], "confidence": 1.0, "source_message_id": f"{user_id}:m{i}",
                "source_session_id": f"{user_id}:s{session}",
                "source_timestamp": base + session * 43_200.0 + (i % SESSION_TURNS) * 45.0, "speaker": speaker,
                "meta": Jsonb({"role": "user", "speaker": speaker, "seeded": True}), "content_tokens": counts[j],
            }


TYPES = {"memory_id": "uuid", "user_id": "text", "type": "text", "content": "text", "content_hash": "text",
         "embedding": "vector", "confidence": "real", "source_message_id": "text", "source_session_id": "text",
         "source_timestamp": "float8", "speaker": "text", "meta": "jsonb", "content_tokens": "int4"}


async def _copy_rows(url: str, plan: SeedPlan, pool: list[str], vectors: np.ndarray) -> None:
    from pgvector.psycopg import register_vector_async

    total, done, started, last = plan.rows(), 0, time.perf_counter(), 0.0
    async with await psycopg.AsyncConnection.connect(url, autocommit=True) as conn:
        await register_vector_async(conn)
        cur = await conn.execute("SELECT column_name FROM information_schema.columns WHERE table_name ="
                                 " 'ltm_memories' AND is_generated = 'NEVER'")
        present = {r[0] for r in await cur.fetchall()}
        missing = [c for c in REQUIRED if c not in present]
        if missing:
            raise RuntimeError(f"ltm_memories has no column(s) {missing}: update mesh/bench_seed.py")
        cols = [c for c in TYPES if c in present]
        statement = sql.SQL("COPY ltm_memories ({}) FROM STDIN (FORMAT BINARY)").format(
            sql.SQL(", ").join(sql.Identifier(c) for c in cols))
        users = plan.users()
        for k in range(0, len(users), 20):  # one COPY (one transaction) per 20 users
            async with conn.cursor() as c, c.copy(statement) as copy:
                copy.set_types([TYPES[c] for c in cols])
                for user_id, n in users[k:k + 20]:
                    for row in user_rows(user_id, n, pool, vectors):
                        await copy.write_row([row[c] for c in cols])
                    done += n
            now = time.perf_counter()
            if now - last > 10 or done == total:
                say(f"seed: {done:,}/{total:,} memories ({done / (now - started):,.0f}/s)")
                last = now


# --------------------------------------------------------------------------- clean-up of run data
async def _tables_with(conn: psycopg.AsyncConnection[Any], *columns: str) -> list[str]:
    # tables, not their partitions (a partitioned table's DELETE reaches them)
    cur = await conn.execute(
        "SELECT c.table_name FROM information_schema.columns c JOIN pg_class r ON r.relname = c.table_name"
        " AND r.relnamespace = 'public'::regnamespace"
        " WHERE c.table_schema = 'public' AND NOT r.relispartition AND c.column_name = ANY(%s)"
        " GROUP BY c.table_name HAVING count(DISTINCT c.column_name) = %s", (list(columns), len(columns)))
    return sorted(r[0] for r in await cur.fetchall())


async def delete_users(url: str, pattern: str) -> int:
    """Remove every row of users whose id matches ``pattern`` (LIKE) from every table with a user_id."""
    removed = 0
    async with await psycopg.AsyncConnection.connect(url, autocommit=True) as conn:
        for table in await _tables_with(conn, "user_id"):
            cur = await conn.execute(sql.SQL("DELETE FROM {} WHERE user_id LIKE %s").format(sql.Identifier(table)),
                                     (pattern,))
            removed += max(cur.rowcount, 0)
    return removed


async def delete_sessions(url: str, users: list[str], pattern: str) -> int:
    """Remove what a run added to seeded users: rows of sessions (or messages) whose id matches ``pattern``."""
    removed = 0
    async with await psycopg.AsyncConnection.connect(url, autocommit=True) as conn:
        for column in ("source_session_id", "session_id", "message_id"):
            for table in await _tables_with(conn, "user_id", column):
                cur = await conn.execute(
                    sql.SQL("DELETE FROM {} WHERE user_id = ANY(%s) AND {} LIKE %s").format(
                        sql.Identifier(table), sql.Identifier(column)), (users, pattern))
                removed += max(cur.rowcount, 0)
    return removed


async def remove_leftovers(url: str, plan: SeedPlan) -> int:
    """What earlier runs left behind (an interrupted run skips its clean-up): their users and chat sessions."""
    removed = 0
    for pattern in ("bench-memory-%", "bench-ingest-%", "bench-ingesting-%"):
        removed += await delete_users(url, pattern)
    fillers = [plan.filler_user(i) for i in range(plan.filler_users)]
    return removed + await delete_sessions(url, fillers, "bench-chat-%")


async def user_texts(url: str, user_id: str) -> list[tuple[str, str, float]]:
    """(content, session, timestamp) of a seeded user's memories in time order (to seed mem0 the same)."""
    async with await psycopg.AsyncConnection.connect(url, autocommit=True) as conn:
        cur = await conn.execute("SELECT content, source_session_id, source_timestamp FROM ltm_memories"
                                 " WHERE user_id = %s ORDER BY source_timestamp, source_message_id", (user_id,))
        return [(r[0], r[1] or "s", float(r[2] or 0.0)) for r in await cur.fetchall()]
