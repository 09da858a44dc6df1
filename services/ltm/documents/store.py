"""PostgreSQL storage of each user's documents and their chunks (migration 007). Every statement is scoped by
user_id, and every key starts with it."""

from __future__ import annotations

import hashlib
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
from psycopg import AsyncConnection
from psycopg.rows import dict_row
from psycopg_pool import AsyncConnectionPool

from services.ltm.store import values
from shared.contracts.messages import LABEL_SEP, DocAdded, DocDeleted, DocFormat
from shared.runtime.fence import refuse_if_deleted

DOC_TABLES = ("ltm_doc_chunks", "ltm_documents")
"""The tables of a user's documents, in deletion order (services/ltm/store.py USER_TABLES erases them too)."""
INSERT_BATCH = 500  # chunk rows per INSERT statement
RACE_RETRIES = 3

_FIND = (
    "SELECT doc_id, source, title, format, chunks, content_hash FROM ltm_documents"
    " WHERE user_id = %(user_id)s AND (source = %(source)s OR content_hash = %(hash)s)"
)
_CHUNK_COLUMNS = "user_id, chunk_id, doc_id, chunk_no, heading, heading_text, content, tokens, embedding"


def document_hash(text: str, fmt: DocFormat) -> str:
    """What makes two documents the same: the format and the exact text (line endings normalised)."""
    return hashlib.sha256(f"{fmt}\x1f{text.replace(chr(13) + chr(10), chr(10))}".encode()).hexdigest()


@dataclass(slots=True)
class NewChunk:
    heading: list[str]
    text: str
    tokens: int
    embedding: np.ndarray


@dataclass(slots=True)
class NewDocument:
    user_id: str
    source: str
    title: str
    format: DocFormat
    content_hash: str
    chars: int
    chunks: list[NewChunk]


def _added(row: dict[str, Any], status: Literal["created", "updated", "unchanged"]) -> DocAdded:
    return DocAdded(doc_id=str(row["doc_id"]), source=row["source"], title=row["title"], format=row["format"],
                    chunks=int(row["chunks"]), status=status)


class DocumentStore:
    def __init__(self, pool: AsyncConnectionPool) -> None:
        self.pool = pool

    async def held(self, user_id: str, source: str, content_hash: str) -> DocAdded | None:
        """The user's document with this text (under any source), if there is one: adding it again changes nothing."""
        async with self.pool.connection() as conn:
            cur = conn.cursor(row_factory=dict_row)
            await cur.execute(_FIND, {"user_id": user_id, "source": source, "hash": content_hash})
            same = [r for r in await cur.fetchall() if r["content_hash"] == content_hash]
        return _added(same[0], "unchanged") if same else None

    async def put(self, doc: NewDocument) -> DocAdded:
        """Store ``doc`` in one transaction: nothing when the user holds its text already (``unchanged``), its new
        text and chunks in place of the old under the same source (``updated``, same doc_id), else a new document.
        Two concurrent adds of one document store it once (the unique keys; the later one finds the first)."""
        async with self.pool.connection() as conn, conn.transaction():
            await refuse_if_deleted(conn, doc.user_id, "ltm")  # a deletion that overtook this request (doc_add)
            cur = conn.cursor(row_factory=dict_row)
            params = {"user_id": doc.user_id, "source": doc.source, "hash": doc.content_hash}
            for _ in range(RACE_RETRIES):
                await cur.execute(_FIND + " FOR UPDATE", params)
                rows = await cur.fetchall()
                same = next((r for r in rows if r["content_hash"] == doc.content_hash), None)
                if same is not None:
                    return _added(same, "unchanged")
                old = next((r for r in rows if r["source"] == doc.source), None)
                if old is not None:
                    doc_id, status = old["doc_id"], "updated"
                    await cur.execute("DELETE FROM ltm_doc_chunks WHERE user_id = %s AND doc_id = %s",
                                      (doc.user_id, doc_id))
                    await cur.execute(
                        "UPDATE ltm_documents SET title = %s, format = %s, content_hash = %s, chars = %s, chunks = %s,"
                        " updated_at = now() WHERE user_id = %s AND doc_id = %s",
                        (doc.title, doc.format, doc.content_hash, doc.chars, len(doc.chunks), doc.user_id, doc_id))
                    break
                await cur.execute(
                    "INSERT INTO ltm_documents (user_id, doc_id, source, title, format, content_hash, chars, chunks)"
                    " VALUES (%s, %s, %s, %s, %s, %s, %s, %s) ON CONFLICT DO NOTHING RETURNING doc_id",
                    (doc.user_id, uuid.uuid4(), doc.source, doc.title, doc.format, doc.content_hash, doc.chars,
                     len(doc.chunks)))
                row = await cur.fetchone()
                if row is not None:
                    doc_id, status = row["doc_id"], "created"
                    break
                # a concurrent add of this source or text committed first: read what it stored
            else:
                raise RuntimeError("the document kept changing while it was stored")  # internal: try again
            await self._insert_chunks(conn, doc.user_id, doc_id, doc.chunks)
        return DocAdded(doc_id=str(doc_id), source=doc.source, title=doc.title, format=doc.format,
                        chunks=len(doc.chunks), status=status)  # type: ignore[arg-type]

    @staticmethod
    async def _insert_chunks(conn: AsyncConnection, user_id: str, doc_id: uuid.UUID,
                             chunks: Sequence[NewChunk]) -> None:
        rows = [(user_id, uuid.uuid4(), doc_id, no, c.heading, LABEL_SEP.join(c.heading), c.text, c.tokens, c.embedding)
                for no, c in enumerate(chunks)]
        for i in range(0, len(rows), INSERT_BATCH):
            batch = rows[i:i + INSERT_BATCH]
            await conn.execute(f"INSERT INTO ltm_doc_chunks ({_CHUNK_COLUMNS}) VALUES {values(len(batch), 9)}",
                               [p for r in batch for p in r])

    async def delete(self, user_id: str, doc_id: str) -> DocDeleted | None:
        """One document of the user and its chunks; None when the user has no document of that id (another user's
        id included: it looks exactly like a missing one)."""
        try:
            did = uuid.UUID(doc_id)
        except ValueError:
            return None
        async with self.pool.connection() as conn, conn.transaction():
            cur = await conn.execute("DELETE FROM ltm_doc_chunks WHERE user_id = %s AND doc_id = %s", (user_id, did))
            chunks = cur.rowcount
            cur = await conn.execute("DELETE FROM ltm_documents WHERE user_id = %s AND doc_id = %s RETURNING doc_id",
                                     (user_id, did))
            gone = [str(r[0]) for r in await cur.fetchall()]
        return DocDeleted(documents=len(gone), chunks=chunks, doc_ids=gone) if gone else None

    async def delete_all(self, user_id: str) -> DocDeleted:
        async with self.pool.connection() as conn, conn.transaction():
            cur = await conn.execute("DELETE FROM ltm_doc_chunks WHERE user_id = %s", (user_id,))
            chunks = cur.rowcount
            cur = await conn.execute("DELETE FROM ltm_documents WHERE user_id = %s RETURNING doc_id", (user_id,))
            gone = sorted(str(r[0]) for r in await cur.fetchall())
        return DocDeleted(documents=len(gone), chunks=chunks, doc_ids=gone)

    async def stats(self, user_id: str) -> dict[str, int]:
        async with self.pool.connection() as conn:
            cur = await conn.execute("SELECT count(*), coalesce(sum(chunks), 0) FROM ltm_documents WHERE user_id = %s",
                                     (user_id,))
            row = await cur.fetchone()
        return {"documents": int(row[0]) if row else 0, "chunks": int(row[1]) if row else 0}
