"""The first stage's candidates as columns, and the array steps of ranking (retrieval.py, steps 1-3).

A search ranks up to ``LTM_CANDIDATES`` (1,000) rows, and only the ``gate_pool`` (50) most relevant of them go on.
Building a dict per candidate and scoring them one by one in Python was a third of a search's time on the event
loop (py-spy, 10k memories); here the candidates are arrays (similarity, BM25, session, time, role, question) and
the rows themselves are only read: the search index hands its own row dicts, shared, never copied or changed, and
only the rows that pass the gate are copied (:meth:`Candidates.row`). The SQL stage's rows become the same
columns (:meth:`Candidates.of_rows`), so both paths rank with the same code.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Generic, TypeVar, overload

import numpy as np

STATS = ("n", "sim_mean", "sim_sd", "s1", "s2")
T = TypeVar("T")


class Picked(Sequence[T], Generic[T]):
    """``held[picks[i]]`` as a sequence, without building the list: a first stage picks up to 1,000 rows and
    ranking reads the fifty that pass the gate. A live view of the search index's rows, which a later read of the
    user's changes replaces in place: read it before the next ``await`` (ranking does, services/ltm/retrieval.py)."""

    __slots__ = ("held", "picks")

    def __init__(self, held: Sequence[T], picks: np.ndarray) -> None:
        self.held, self.picks = held, picks

    def __len__(self) -> int:
        return len(self.picks)

    @overload
    def __getitem__(self, i: int) -> T: ...

    @overload
    def __getitem__(self, i: slice) -> list[T]: ...

    def __getitem__(self, i: int | slice) -> T | list[T]:
        if isinstance(i, slice):
            return [self.held[j] for j in self.picks[i].tolist()]
        return self.held[int(self.picks[i])]


@dataclass(slots=True)
class Candidates:
    """``rows[i]`` (the KEYS columns; read only) with ``sim[i]`` and ``bm25[i]``; ``session[i]`` a number per
    session (-1: none), ``ts[i]`` its source time (NaN: none), ``ai[i]``/``question[i]`` its flags; the first
    stage's statistics over every row it read (``n``, ``sim_mean``, ``sim_sd``, BM25's ``s1`` and ``s2``).
    ``entities[i]``: row i's entities when its row does not hold them (the search index's rows: ids as text, no
    entities, held.HeldUser); :meth:`row` adds them."""

    rows: Sequence[dict[str, Any]]
    sim: np.ndarray
    bm25: np.ndarray
    session: np.ndarray
    ts: np.ndarray
    ai: np.ndarray
    question: np.ndarray
    n: float = 0.0
    sim_mean: float = 0.0
    sim_sd: float = 0.0
    s1: float = 0.0
    s2: float = 0.0
    entities: Sequence[tuple[str, ...]] | None = None

    def __len__(self) -> int:
        return len(self.rows)

    @classmethod
    def of_rows(cls, rows: Sequence[dict[str, Any]]) -> Candidates:
        """The columns of the SQL stage's rows (retrieval.hybrid_sql: KEYS, ``sim``, ``bm25`` and the statistics)."""
        c = cls.of_scores(rows)
        codes: dict[str, int] = {}
        c.session = np.array([-1 if r["source_session_id"] is None
                              else codes.setdefault(r["source_session_id"], len(codes)) for r in rows], dtype=np.int64)
        c.ts = np.array([math.nan if r["source_timestamp"] is None else float(r["source_timestamp"]) for r in rows],
                        dtype=np.float64)
        c.ai = np.array([r.get("role") == "ai" for r in rows], dtype=bool)
        c.question = np.array([bool(r.get("question")) for r in rows], dtype=bool)
        return c

    @classmethod
    def of_scores(cls, rows: Sequence[dict[str, Any]]) -> Candidates:
        """Only the scores of rows (``sim``, ``bm25``, the statistics): for rows of another kind (document chunks)
        that are fused and gated but have no sessions."""
        first = rows[0] if rows else {}
        k = len(rows)
        return cls(rows=rows, sim=np.array([float(r["sim"]) for r in rows], dtype=np.float64),
                   bm25=np.array([float(r["bm25"]) for r in rows], dtype=np.float64),
                   session=np.full(k, -1, dtype=np.int64), ts=np.full(k, math.nan), ai=np.zeros(k, dtype=bool),
                   question=np.zeros(k, dtype=bool), n=float(first.get("n") or 0.0),
                   sim_mean=float(first.get("sim_mean") or 0.0), sim_sd=float(first.get("sim_sd") or 0.0),
                   s1=float(first.get("s1") or 0.0), s2=float(first.get("s2") or 0.0))

    def row(self, i: int) -> dict[str, Any]:
        """Row ``i`` as the SQL stage returns it (but for ids as text from the search index): a new dict, with its
        ``sim``, ``bm25``, the statistics (and its entities)."""
        row = {**self.rows[i], "sim": float(self.sim[i]), "bm25": float(self.bm25[i]),
               **{k: getattr(self, k) for k in STATS}}
        if self.entities is not None:
            row["entities"] = list(self.entities[i])
        return row

    def as_rows(self) -> list[dict[str, Any]]:
        return [self.row(i) for i in range(len(self.rows))]


def z(values: np.ndarray, mean: float, sd: float) -> np.ndarray:
    return (values - mean) / sd if sd > 1e-9 else np.zeros_like(values)


def fuse_columns(c: Candidates, dense: float, keyword: float) -> np.ndarray:
    """``dense * z(cosine) + keyword * z(bm25)``, the z-scores over every row the first stage read."""
    if not len(c):
        return np.zeros(0)
    n = max(c.n, 1.0)
    k_mean = c.s1 / n
    k_sd = math.sqrt(max(c.s2 / n - k_mean * k_mean, 0.0))
    return dense * z(c.sim, c.sim_mean, c.sim_sd) + keyword * z(c.bm25, k_mean, k_sd)


def gate_columns(sim: np.ndarray, bm25: np.ndarray, rel: np.ndarray, pool: int, min_similarity: float,
                 threshold: float | None) -> list[int]:
    """Of the ``pool`` most relevant rows, in relevance order, those with evidence of relevance (a query term
    matches, or cosine >= ``min_similarity``) and at least ``threshold`` cosine when one is set."""
    order = np.argsort(-rel, kind="stable")[:pool]
    ok = (bm25[order] > 0) | (sim[order] >= min_similarity)
    if threshold is not None:
        ok &= sim[order] >= threshold
    return [int(i) for i in order[ok]]


def neighbour_best(session: np.ndarray, ts: np.ndarray, rel: np.ndarray) -> np.ndarray:
    """For each row, the best relevance among the turns just before and just after it in its session (rows at the
    same time of one session are one turn: the best of them counts); 0 when it has none, or no session or time."""
    out = np.zeros(len(rel))
    idx = np.flatnonzero((session >= 0) & ~np.isnan(ts))
    if not len(idx):
        return out
    order = idx[np.lexsort((ts[idx], session[idx]))]
    s, t = session[order], ts[order]
    first = np.ones(len(order), dtype=bool)
    first[1:] = (s[1:] != s[:-1]) | (t[1:] != t[:-1])
    slot = np.cumsum(first) - 1  # the turn (session, time) of each row, in time order within each session
    best_of_slot = np.full(int(slot[-1]) + 1, -np.inf)
    np.maximum.at(best_of_slot, slot, rel[order])
    slot_session = s[first]
    same_as_next = slot_session[:-1] == slot_session[1:]
    before = np.full(len(best_of_slot), -np.inf)
    after = np.full(len(best_of_slot), -np.inf)
    before[1:] = np.where(same_as_next, best_of_slot[:-1], -np.inf)
    after[:-1] = np.where(same_as_next, best_of_slot[1:], -np.inf)
    near = np.maximum(before, after)
    near[np.isneginf(near)] = 0.0
    out[order] = near[slot]
    return out
