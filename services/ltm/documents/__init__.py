"""Documents beside memory: each user's own collection, chunked, embedded and searched like memories.

``doc_add`` parses a text, Markdown or HTML document into chunks under their headings (:mod:`.chunking`), embeds
them in passes with ingest's model (the model of memories: all-MiniLM-L6-v2, each chunk as ``title > headings:
text``) and stores them (:mod:`.store`), once per user and text; ``doc_search`` is the memories' hybrid retrieval
over the chunks (:mod:`.search`); ``doc_delete`` removes one document or all of them. A user's documents are no
other user's: every statement is scoped by the requester's user_id, whatever ids the request carries.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable

import numpy as np
from psycopg_pool import AsyncConnectionPool

from services.ltm.documents import search as doc_search
from services.ltm.documents.chunking import chunk, default_title, detect_format
from services.ltm.documents.store import DocumentStore, NewChunk, NewDocument, document_hash
from services.ltm.retrieval import RetrievalConfig
from shared.contracts.errors import BadRequest, NotFound
from shared.contracts.messages import (
    DocAddData,
    DocAdded,
    DocDeleted,
    DocDeleteData,
    DocPassage,
    DocSearchData,
    doc_label,
)
from shared.runtime.embedding import Embedder
from shared.runtime.passes import embed_in_steps

PASS_TOKENS = 1024  # one embedding pass: about five chunks (a search's query waits behind one pass at most)


class Documents:
    def __init__(self, pool: AsyncConnectionPool, embedder: Callable[[], Embedder], retrieval: RetrievalConfig,
                 chunk_tokens: int = 200, overlap: int = 30) -> None:
        """``embedder``: the model chunks are embedded with, looked up at each add (ingest's own copy once loaded)."""
        self.store = DocumentStore(pool)
        self.embedder, self.retrieval = embedder, retrieval
        self.chunk_tokens, self.overlap = chunk_tokens, overlap

    async def add(self, user_id: str, data: DocAddData) -> DocAdded:
        fmt = detect_format(data.source, data.mime, data.format)
        digest = document_hash(data.text, fmt)
        held = await self.store.held(user_id, data.source, digest)
        if held is not None:  # the same text again: not parsed, not embedded, not written
            return held
        found_title, chunks = await asyncio.to_thread(chunk, data.text, fmt, self.chunk_tokens, self.overlap)
        if not chunks:
            raise BadRequest("the document has no text (after dropping markup, scripts and styles)")
        title = (data.title or "").strip() or found_title or default_title(data.source)
        texts = [f"{doc_label(title, c.heading)}: {c.text}" for c in chunks]
        vectors = await embed_in_steps(self.embedder(), texts, PASS_TOKENS)
        return await self.store.put(NewDocument(
            user_id=user_id, source=data.source, title=title, format=fmt, content_hash=digest, chars=len(data.text),
            chunks=[NewChunk(c.heading, c.text, c.tokens, vectors[t]) for c, t in zip(chunks, texts, strict=True)]))

    async def search(self, user_id: str, data: DocSearchData, embedding: np.ndarray) -> list[DocPassage]:
        return await doc_search.search(self.store.pool, user_id, data, embedding, self.retrieval)

    async def delete(self, user_id: str, data: DocDeleteData) -> DocDeleted:
        if data.all:
            return await self.store.delete_all(user_id)
        assert data.doc_id is not None  # the model's validator
        deleted = await self.store.delete(user_id, data.doc_id)
        if deleted is None:
            raise NotFound("no such document for this user")
        return deleted

    async def stats(self, user_id: str) -> dict[str, int]:
        return await self.store.stats(user_id)


__all__ = ["Documents"]
