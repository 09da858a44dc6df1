"""doc_search: the memories' hybrid retrieval (services/ltm/retrieval.py) over the user's document chunks.

The same first stage (:func:`retrieval.hybrid_sql`: exact cosine of every chunk of the user, BM25 over the english
full text of the chunk and its headings, document frequencies and lengths from the user's own chunks, one
statement), the same fusion (:func:`retrieval.fuse`, the profile's dense and keyword weights) and the same gate
(:func:`retrieval.gate`: a query term matches or cosine >= ``LTM_MIN_SIMILARITY``, within the gate pool, above the
request's ``threshold``). What memories add after that (dates, neighbouring turns, speakers, supersession, access
statistics) does not apply to documents: passages come back in fused order, ``top_k`` of them, within
``max_tokens`` when the request sets it.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from psycopg.rows import dict_row
from psycopg_pool import AsyncConnectionPool

from services.ltm.retrieval import RetrievalConfig, fuse, gate, hybrid_sql
from shared.contracts.messages import DocPassage, DocSearchData

_KEYS = ("chunk_id", "doc_id", "chunk_no", "tokens")
_CANDIDATES = hybrid_sql("ltm_doc_chunks", "chunk_id", "m.chunk_id, m.doc_id, m.chunk_no, m.tokens",
                         _KEYS).format(filters="")
_PASSAGES = (
    "SELECT c.chunk_id, c.heading, c.content, d.source, d.title FROM ltm_doc_chunks c"
    " JOIN ltm_documents d ON d.user_id = c.user_id AND d.doc_id = c.doc_id"
    " WHERE c.user_id = %(user_id)s AND d.user_id = %(user_id)s AND c.chunk_id = ANY(%(ids)s)"
)


def pick(rows: list[dict[str, Any]], cfg: RetrievalConfig, data: DocSearchData) -> list[tuple[dict[str, Any], float]]:
    """The passages to return, best first, with their fused score (module docstring)."""
    rel = fuse(rows, cfg.profile.dense, cfg.profile.keyword)
    out: list[tuple[dict[str, Any], float]] = []
    used = 0
    for i in gate(rows, rel, max(cfg.gate_pool, data.top_k), cfg.min_similarity, data.threshold):
        if data.max_tokens is not None and used + int(rows[i]["tokens"]) > data.max_tokens:
            continue  # a shorter one further down may still fit
        out.append((rows[i], float(rel[i])))
        used += int(rows[i]["tokens"])
        if len(out) >= data.top_k:
            break
    return out


async def search(pool: AsyncConnectionPool, user_id: str, data: DocSearchData, embedding: np.ndarray,
                 cfg: RetrievalConfig) -> list[DocPassage]:
    params = {"user_id": user_id, "query": data.query, "vec": embedding, "k1": cfg.bm25_k1, "b": cfg.bm25_b,
              "wd": cfg.profile.dense, "wk": cfg.profile.keyword, "candidates": cfg.candidates}
    async with pool.connection() as conn:
        cur = conn.cursor(row_factory=dict_row)
        await cur.execute(_CANDIDATES, params)
        chosen = pick(await cur.fetchall(), cfg, data)
        if not chosen:
            return []
        await cur.execute(_PASSAGES, {"user_id": user_id, "ids": [r["chunk_id"] for r, _ in chosen]})
        text = {r["chunk_id"]: r for r in await cur.fetchall()}
    return [DocPassage(doc_id=str(r["doc_id"]), chunk_id=str(r["chunk_id"]), chunk=int(r["chunk_no"]),
                       source=text[r["chunk_id"]]["source"], title=text[r["chunk_id"]]["title"],
                       heading=list(text[r["chunk_id"]]["heading"] or []), text=text[r["chunk_id"]]["content"],
                       score=score, similarity=float(r["sim"]))
            for r, score in chosen if r["chunk_id"] in text]  # a document deleted meanwhile is left out
