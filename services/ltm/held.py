"""What the search index holds of one user, and the first stage it computes from it (services/ltm/search_index.py
says how the index is kept in step with PostgreSQL).

A held user is columns: each memory's row (atomic values only), its embedding in one float32 matrix, its lexemes
in postings, and the arrays ranking reads (type, session, time, role...). :func:`first_stage` gives what the SQL
stage's ranking columns hold (``retrieval._CANDIDATES``) from them.
"""

from __future__ import annotations

import asyncio
import math
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any
from uuid import UUID

import numpy as np

from services.ltm.candidates import Candidates, Picked
from services.ltm.postings import Postings

DIM = 384  # until the first rows say otherwise (another EMBEDDING_MODEL)

# The columns of a candidate row, as retrieval._CANDIDATES computes them (its ``base`` CTE: the same
# expressions, so the same values); tests/integration/test_ltm_search_index.py compares the two paths.
ROW_COLUMNS = """m.memory_id, m.type, m.source_message_id, m.source_session_id, m.source_timestamp, m.speaker,
       m.entities, m.confidence, m.access_count, m.valid_to, m.superseded_by,
       m.meta->>'role' AS role, (m.meta->>'question') = 'true' AS question,
       extract(epoch FROM m.created_at)::float8 AS created_at,
       extract(epoch FROM m.last_accessed)::float8 AS last_accessed, m.salience::float8 AS salience"""
KEYS = ("memory_id", "type", "source_message_id", "source_session_id", "source_timestamp", "speaker", "entities",
        "confidence", "access_count", "valid_to", "superseded_by", "role", "question", "created_at", "last_accessed",
        "salience")
_TYPE, _SESSION, _ENTITIES = KEYS.index("type"), KEYS.index("source_session_id"), KEYS.index("entities")
_SHARED = ("type", "source_session_id", "speaker", "role")
# What a held row keeps (every KEYS column but entities, held beside it), and where its ids are: see HeldUser.
_HELD = tuple(i for i, k in enumerate(KEYS) if k != "entities")
_HELD_KEYS = tuple(KEYS[i] for i in _HELD)
_HELD_ID, _HELD_SUPERSEDED = _HELD_KEYS.index("memory_id"), _HELD_KEYS.index("superseded_by")
_TXID = len(KEYS)  # in a _ROW row: KEYS, then txid, vec, lx, tf
_VEC = _TXID + 1


@dataclass(slots=True)
class HeldUser:
    """The indexed memories of one user (memory i = position i in every list and array).

    Nothing held per memory is an object the garbage collector tracks: a full collection walks every tracked
    object, with the event loop standing still, and three per held memory (its row dict, a UUID, a list) made one
    take 35-100 ms while 50k rows warmed (and longer at the 200k the index holds). So a row dict holds only
    atomic values: its ids as text (ranking and the result rows read them as text; the rows of the SQL stage have
    UUIDs), and ``pos`` is keyed by that text; the entities are tuples in a list beside the rows (a tuple of
    strings stops being tracked at its first collection), added back by :meth:`Candidates.row`.
    """

    horizon: int
    epoch: int | None
    rows: list[dict[str, Any]] = field(default_factory=list)  # the KEYS columns but entities (read only)
    entities: list[tuple[str, ...]] = field(default_factory=list)
    pos: dict[str, int] = field(default_factory=dict)  # memory id (text) -> i
    vecs: np.ndarray = field(default_factory=lambda: np.zeros((0, DIM), np.float32))  # sized by the first load
    norms: np.ndarray = field(default_factory=lambda: np.zeros(0, np.float64))
    dl: np.ndarray = field(default_factory=lambda: np.zeros(0, np.float64))
    types: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int32))
    sessions: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int32))
    ts: np.ndarray = field(default_factory=lambda: np.zeros(0, np.float64))  # source_timestamp (NaN: none)
    ai: np.ndarray = field(default_factory=lambda: np.zeros(0, bool))  # meta role = ai
    question: np.ndarray = field(default_factory=lambda: np.zeros(0, bool))  # meta question
    codes: dict[str, int] = field(default_factory=dict)  # type and session names -> small ints (-1 = NULL)
    strings: dict[str, str] = field(default_factory=dict)  # one copy of each repeated value
    postings: Postings = field(default_factory=Postings)  # lexeme -> (rows, counts)
    txids: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))  # -1: written before migration 004
    id_hi: np.ndarray = field(default_factory=lambda: np.zeros(0, np.uint64))  # memory_id as two numbers: ties
    id_lo: np.ndarray = field(default_factory=lambda: np.zeros(0, np.uint64))  # sort by it, as in SQL
    dead: np.ndarray = field(default_factory=lambda: np.zeros(0, bool))  # deleted since held (remove)
    n_dead: int = 0
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)

    @property
    def n(self) -> int:
        return len(self.rows)

    def code(self, name: str | None) -> int:
        if name is None:
            return -1
        return self.codes.setdefault(name, len(self.codes))

    def changed(self, pairs: list[tuple[UUID, str]]) -> tuple[list[UUID], list[UUID]]:
        """Of (memory id, txid) pairs, the memories not held, and those held as an older version."""
        new, updated = [], []
        for memory_id, txid in pairs:
            i = self.pos.get(str(memory_id))
            if i is None:
                new.append(memory_id)
            elif self.txids[i] != xid(txid):
                updated.append(memory_id)
        return new, updated

    def add(self, rows: list[tuple[Any, ...]]) -> int:
        """Take _ROW (or, for memories held already, _UPDATED) rows: a memory held gets its new values (what can
        change in place: confidence, uses, supersession...); returns how many memories are new."""
        fresh: dict[UUID, tuple[Any, ...]] = {}
        for r in rows:
            i = self.pos.get(str(r[0]))
            if i is None:
                fresh[r[0]] = r
            else:
                self.rows[i] = self._row(r)
                self.entities[i] = tuple(r[_ENTITIES] or ())
                self._columns(i, self.rows[i])
                self.txids[i] = xid(r[_TXID])
        if not fresh:
            return 0
        start, k = self.n, len(fresh)
        # pgvector's binary form: 2 bytes of size, 2 unused, then the floats (the size is the column's, EMBEDDING_DIM)
        vecs = np.frombuffer(b"".join(bytes(r[_VEC])[4:] for r in fresh.values()), dtype=">f4").reshape(k, -1)
        vecs = vecs.astype(np.float32)
        if start == 0 and self.vecs.shape[1] != vecs.shape[1]:
            self.vecs = np.zeros((0, vecs.shape[1]), np.float32)
        self.vecs = _grow(self.vecs, padded(start + k))
        self.vecs[start:start + k] = vecs
        self.norms = _grow(self.norms, start + k)
        self.norms[start:start + k] = np.sqrt(np.einsum("ij,ij->i", vecs, vecs, dtype=np.float64))
        self.dl = _grow(self.dl, start + k)
        self.types = _grow(self.types, start + k)
        self.sessions = _grow(self.sessions, start + k)
        self.ts, self.ai = _grow(self.ts, start + k), _grow(self.ai, start + k)
        self.question = _grow(self.question, start + k)
        self.txids = _grow(self.txids, start + k)
        self.id_hi = _grow(self.id_hi, start + k)
        self.id_lo = _grow(self.id_lo, start + k)
        self.dead = _grow(self.dead, start + k)
        self.dead[start:start + k] = False
        for j, r in enumerate(fresh.values()):
            i = start + j
            self.rows.append(self._row(r))
            self.entities.append(tuple(r[_ENTITIES] or ()))
            self._columns(i, self.rows[i])
            self.txids[i] = xid(r[_TXID])
            self.id_hi[i], self.id_lo[i] = divmod(r[0].int, 1 << 64)
            self.pos[self.rows[i]["memory_id"]] = i
            self.dl[i] = len(r[_VEC + 1])
            self.types[i] = self.code("t:" + r[_TYPE])
            self.sessions[i] = self.code(None if r[_SESSION] is None else "s:" + r[_SESSION])
        self.postings.add_rows(start, [r[_VEC + 1] for r in fresh.values()], [r[_VEC + 2] for r in fresh.values()])
        return k

    def _columns(self, i: int, row: dict[str, Any]) -> None:
        """Row ``i``'s values that ranking reads as arrays (candidates.Candidates)."""
        self.ts[i] = math.nan if row["source_timestamp"] is None else float(row["source_timestamp"])
        self.ai[i] = row["role"] == "ai"
        self.question[i] = bool(row["question"])

    def _row(self, r: tuple[Any, ...]) -> dict[str, Any]:
        """The KEYS columns of a row but entities as a dict of atomic values only (the class docstring), its repeated
        strings shared (type, session, speaker, role)."""
        values = [r[i] for i in _HELD]
        values[_HELD_ID] = str(values[_HELD_ID])
        if values[_HELD_SUPERSEDED] is not None:
            values[_HELD_SUPERSEDED] = str(values[_HELD_SUPERSEDED])
        row = dict(zip(_HELD_KEYS, values, strict=True))
        for key in _SHARED:
            value = row[key]
            if value is not None:
                row[key] = self.strings.setdefault(value, value)
        return row

    def remove(self, memory_ids: Iterable[str]) -> int:
        """Forget the memories (deleted in PostgreSQL); ids not held are skipped. Their rows stay in place, marked
        dead (searches pass them over: :meth:`mask`), until they are a quarter of the rows: then every column is
        rebuilt without them (new lists and arrays: the candidates of a search under way keep the old ones).
        Returns how many were held."""
        gone = [i for i in (self.pos.pop(m, None) for m in memory_ids) if i is not None]
        if not gone:
            return 0
        self.dead[gone] = True
        self.n_dead += len(gone)
        if self.n_dead * 4 >= self.n:
            self._drop_dead()
        return len(gone)

    def _drop_dead(self) -> None:
        n = self.n
        alive = ~self.dead[:n]
        kept = np.flatnonzero(alive)
        self.rows = [self.rows[i] for i in kept]
        self.entities = [self.entities[i] for i in kept]
        self.pos = {row["memory_id"]: j for j, row in enumerate(self.rows)}
        for name in _ARRAYS:
            setattr(self, name, getattr(self, name)[:n][kept])
        self.vecs = _grow(self.vecs, padded(len(kept)))
        self.n_dead = 0
        self.postings.keep(alive)

    def compact(self) -> None:
        """Free the room kept for rows to come (after a load)."""
        n = self.n
        for name in _ARRAYS:
            setattr(self, name, getattr(self, name)[:padded(n) if name == "vecs" else n].copy())
        self.postings.settle(force=True)

    def mask(self, types: list[str] | None, session: str | None, exclude_session: str | None) -> np.ndarray | None:
        """Rows that pass the search's filters (None: all of them)."""
        n = self.n
        keep: np.ndarray | None = ~self.dead[:n] if self.n_dead else None
        if types:
            known = [self.codes[k] for k in ("t:" + t for t in types) if k in self.codes]
            typed = np.isin(self.types[:n], known)
            keep = typed if keep is None else keep & typed
        if session is not None:
            code = self.codes.get("s:" + session, -2)
            same = self.sessions[:n] == code
            keep = same if keep is None else keep & same
        if exclude_session is not None:
            code = self.codes.get("s:" + exclude_session, -2)
            other = self.sessions[:n] != code
            keep = other if keep is None else keep & other
        return keep


# HeldUser's per-memory arrays (position i: memory i)
_ARRAYS = ("vecs", "norms", "dl", "types", "sessions", "ts", "ai", "question", "txids", "id_hi", "id_lo", "dead")


def padded(n: int) -> int:
    """The rows of ``vecs`` a product with the query runs over: ``n`` rounded up to a multiple of 64 (zero rows after
    the held ones). OpenBLAS's sgemv computes the last ``n`` mod 8 rows (Haswell kernels) with another kernel, whose
    sums round differently: two memories with the same vector (the same text stored as two types) then got cosines a
    float32 ulp apart, depending on where they sat, and no longer tied (ties are ordered by memory id, as in SQL)."""
    return -(-n // 64) * 64


def _grow(a: np.ndarray, size: int) -> np.ndarray:
    """``a`` with room for ``size`` rows (a quarter more each time; the rows beyond the used ones are garbage)."""
    if len(a) >= size:
        return a
    out = np.zeros((max(size, len(a) + len(a) // 4, 64), *a.shape[1:]), a.dtype)
    out[: len(a)] = a
    return out


def xid(text: str | None) -> int:
    return int(text) if text else -1


def first_stage(u: HeldUser, lexemes: list[str], embedding: np.ndarray, keep: np.ndarray | None, *, limit: int,
                 wd: float, wk: float, k1: float, b: float) -> Candidates:
    """The rows of ``retrieval._CANDIDATES`` from the memories of ``u`` that ``keep`` holds (all when None), as
    columns; the rows are the index's own dicts (shared: read only)."""
    n_all = u.n
    rows = None if keep is None else np.flatnonzero(keep)
    n = n_all if rows is None else len(rows)
    if n == 0:
        return Candidates.of_rows([])
    q = np.asarray(embedding, dtype=np.float32)
    qnorm = math.sqrt(float(np.dot(q.astype(np.float64), q.astype(np.float64))))
    # sgemv, on this thread (shared/runtime/runner.py one_blas_thread), over whole blocks of rows (padded)
    dots = (u.vecs[:padded(n_all)] @ q)[:n_all]
    with np.errstate(divide="ignore", invalid="ignore"):
        sim_all = np.clip(dots.astype(np.float64) / (u.norms[:n_all] * qnorm), -1.0, 1.0)
    sim = sim_all if rows is None else sim_all[rows]
    sim_mean, sim_sd = float(sim.mean()), float(sim.std())
    bm25_all = np.zeros(n_all)
    if lexemes:
        avgdl = max(float((u.dl[:n_all] if rows is None else u.dl[rows]).mean()), 1.0)
        for lexeme in dict.fromkeys(lexemes):
            post = u.postings.get(lexeme)
            if post is None:
                continue
            idx, tf = post[0], post[1].astype(np.float64)
            if keep is not None:
                inside = keep[idx]
                idx, tf = idx[inside], tf[inside]
            df = float(len(idx))
            if not df:
                continue
            idf = math.log(1 + (n - df + 0.5) / (df + 0.5))
            bm25_all[idx] += idf * tf * (k1 + 1) / (tf + k1 * (1 - b + b * u.dl[idx] / avgdl))
    bm25 = bm25_all if rows is None else bm25_all[rows]
    s1, s2 = float(bm25.sum()), float(np.dot(bm25, bm25))
    k_sd = math.sqrt(max(s2 / n - (s1 / n) ** 2, 0.0))
    fused = wd * sim / max(sim_sd, 1e-9) + wk * bm25 / max(k_sd, 1e-9)
    # the best k by the fused score, ties by memory_id (the order of retrieval._CANDIDATES)
    hi, lo = (u.id_hi[:n_all], u.id_lo[:n_all]) if rows is None else (u.id_hi[rows], u.id_lo[rows])
    k = min(limit, n)
    if k < n:
        cut = fused[np.argpartition(-fused, k - 1)[k - 1]]
        above, tied = np.flatnonzero(fused > cut), np.flatnonzero(fused == cut)
        tied = tied[np.lexsort((lo[tied], hi[tied]))][: k - len(above)]
        top = np.concatenate([above, tied])
    else:
        top = np.arange(n)
    top = top[np.lexsort((lo[top], hi[top], -fused[top]))]
    chosen = top if rows is None else rows[top]
    return Candidates(rows=Picked(u.rows, chosen), entities=Picked(u.entities, chosen), sim=sim_all[chosen],
                      bm25=bm25_all[chosen], session=u.sessions[chosen].astype(np.int64), ts=u.ts[chosen],
                      ai=u.ai[chosen], question=u.question[chosen], n=float(n), sim_mean=sim_mean, sim_sd=sim_sd,
                      s1=s1, s2=s2)
