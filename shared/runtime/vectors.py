"""Which embedding model the stored vectors come from, and vector columns sized for it.

Each component's vector columns (``VECTOR_COLUMNS``) are created ``vector(384)`` by the migrations, for the local
all-MiniLM-L6-v2. At start-up a service calls :func:`ensure_vector_columns` with the model it will embed with
(``EMBEDDING_MODEL``; its size from the model): when it is the model ``embedding_models`` records (or, before the
first record, the migrations' 384-d default), nothing happens; when the columns hold no vector yet, they are
re-typed to the new size and the model recorded; when they hold vectors of another model, the service refuses to
start and says to run ``mesh reembed`` (shared/runtime/reembed.py): comparing vectors of two models gives noise,
and their sizes differ anyway.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any

from psycopg import AsyncConnection, sql
from psycopg_pool import AsyncConnectionPool

from shared.runtime.embedding import DIM, MODEL_NAME, EmbeddingSettings
from shared.runtime.logging import get_logger

log = get_logger(__name__)


def _first(row: tuple[Any, ...]) -> str:
    return str(row[0] or "")


def _chunk_text(row: tuple[Any, ...]) -> str:
    """What services/ltm/documents embeds for a chunk: ``title > heading: text``."""
    from shared.contracts.messages import doc_label

    return f"{doc_label(str(row[0] or ''), list(row[1] or []))}: {row[2]}"


@dataclass(frozen=True, slots=True)
class VectorColumn:
    table: str
    column: str
    key: str  # the table's key beside user_id, to walk it in batches (mesh reembed)
    source: str = "t.content"  # SQL over the row ``t``: what the vector was made from (a constant of this module)
    text: Callable[[tuple[Any, ...]], str] = _first  # ``source``'s columns -> the text embedded
    nullable: bool = False  # memory fills its own in the background (MEMORY_EMBED_INTERVAL_S)


VECTOR_COLUMNS: dict[str, list[VectorColumn]] = {
    "memory": [VectorColumn("conversation_messages", "embedding", "message_id", nullable=True)],
    "ltm": [VectorColumn("ltm_memories", "embedding", "memory_id"),
            VectorColumn("ltm_entities", "embedding", "entity_id", source="t.name"),
            VectorColumn("ltm_doc_chunks", "embedding", "chunk_id", text=_chunk_text, source=(
                "(SELECT d.title FROM ltm_documents d WHERE d.user_id = t.user_id AND d.doc_id = t.doc_id),"
                " t.heading, t.content"))],
}


class EmbeddingModelMismatch(RuntimeError):
    """The stored vectors come from another model: start refused until ``mesh reembed`` has run."""


def model_identity(settings: EmbeddingSettings) -> tuple[str, int]:
    """(model, size) without loading the local model; a remote model of unknown size is asked once."""
    if not settings.embedding_remote:
        return MODEL_NAME, DIM
    from shared.runtime.remote_embedding import KNOWN_DIMS

    if settings.embedding_dim or settings.embedding_model in KNOWN_DIMS:
        return settings.embedding_model, settings.embedding_dim or KNOWN_DIMS[settings.embedding_model]
    from shared.runtime.embedding import SyncEmbedder

    model = SyncEmbedder(settings=settings)
    return model.name, model.dim


async def column_dim(conn: AsyncConnection, table: str, column: str) -> int | None:
    """A vector column's declared size (pgvector keeps it as the type modifier); None when there is no column."""
    cur = await conn.execute("SELECT atttypmod FROM pg_attribute WHERE attrelid = %s::regclass AND attname = %s"
                             " AND NOT attisdropped", (table, column))
    row = await cur.fetchone()
    return int(row[0]) if row else None


async def column_dims(conn: AsyncConnection, component: str) -> dict[str, int]:
    """``table.column`` -> its declared vector size, for each of the component's vector columns."""
    out = {}
    for c in VECTOR_COLUMNS[component]:
        dim = await column_dim(conn, c.table, c.column)
        if dim is None:
            raise RuntimeError(f"{c.table}.{c.column} does not exist: run the {component} migrations first")
        out[f"{c.table}.{c.column}"] = dim
    return out


async def recorded_model(conn: AsyncConnection, component: str) -> tuple[str, int] | None:
    cur = await conn.execute("SELECT model, dim FROM embedding_models WHERE component = %s", (component,))
    row = await cur.fetchone()
    return (str(row[0]), int(row[1])) if row else None


async def record_model(conn: AsyncConnection, component: str, model: str, dim: int) -> None:
    await conn.execute(
        "INSERT INTO embedding_models (component, model, dim) VALUES (%s, %s, %s) ON CONFLICT (component)"
        " DO UPDATE SET model = EXCLUDED.model, dim = EXCLUDED.dim, updated_at = now()", (component, model, dim))


async def has_vectors(conn: AsyncConnection, c: VectorColumn) -> bool:
    query = sql.SQL("SELECT EXISTS (SELECT 1 FROM {} WHERE {} IS NOT NULL)").format(
        sql.Identifier(c.table), sql.Identifier(c.column))
    cur = await conn.execute(query)
    row = await cur.fetchone()
    return bool(row and row[0])


@asynccontextmanager
async def triggers_lifted(conn: AsyncConnection, table: str, column: str) -> AsyncIterator[None]:
    """The table's triggers that name ``column`` (``UPDATE OF ... embedding``: ltm's search-index epochs) dropped
    for the block and created again from their own definitions after it; run inside a transaction."""
    cur = await conn.execute(
        "SELECT DISTINCT t.tgname, pg_get_triggerdef(t.oid) FROM pg_trigger t"
        " JOIN pg_depend d ON d.classid = 'pg_trigger'::regclass AND d.objid = t.oid"
        " JOIN pg_attribute a ON a.attrelid = d.refobjid AND a.attnum = d.refobjsubid"
        " WHERE d.refobjid = %s::regclass AND a.attname = %s AND NOT t.tgisinternal AND t.tgparentid = 0",
        (table, column))
    triggers = [(str(r[0]), str(r[1])) for r in await cur.fetchall()]
    for name, _ in triggers:
        await conn.execute(sql.SQL("DROP TRIGGER {} ON {}").format(sql.Identifier(name), sql.Identifier(table)))
    yield
    for _, definition in triggers:
        await conn.execute(definition.encode())


async def retype(conn: AsyncConnection, c: VectorColumn, dim: int, *, column: str | None = None) -> None:
    """``column`` (default: the vector column) becomes ``vector(dim)``, emptied; only for a column with no vectors
    to keep. Run inside a transaction."""
    async with triggers_lifted(conn, c.table, column or c.column):
        await conn.execute(sql.SQL("ALTER TABLE {} ALTER COLUMN {} TYPE vector({}) USING NULL").format(
            sql.Identifier(c.table), sql.Identifier(column or c.column), sql.Literal(dim)))


async def ensure_vector_columns(pool: AsyncConnectionPool, component: str, model: str, dim: int) -> None:
    async with pool.connection() as conn, conn.transaction():
        # two copies starting at once: one decides, the other then finds it done
        await conn.execute("SELECT pg_advisory_xact_lock(hashtext('mesh.embedding_models'))")
        dims = await column_dims(conn, component)
        recorded = await recorded_model(conn, component)
        if recorded is None and set(dims.values()) == {DIM}:
            recorded = (MODEL_NAME, DIM)  # the migrations' columns, before anything was recorded
        if recorded == (model, dim) and set(dims.values()) == {dim}:
            await record_model(conn, component, model, dim)
            return
        filled = [f"{c.table}.{c.column}" for c in VECTOR_COLUMNS[component] if await has_vectors(conn, c)]
        if filled:
            sizes = sorted(set(dims.values()))
            was = f"{recorded[0]} ({recorded[1]} values)" if recorded else f"vectors of sizes {sizes}"
            raise EmbeddingModelMismatch(
                f"{', '.join(filled)} hold vectors of {was}, and EMBEDDING_MODEL={model} gives {dim} values: "
                f"run `python -m mesh reembed` to embed them again with it (docs/operations.md, \"Changing the "
                f"embedding model\"), or set EMBEDDING_MODEL back")
        for c in VECTOR_COLUMNS[component]:
            if dims[f"{c.table}.{c.column}"] != dim:
                await retype(conn, c, dim)
        await record_model(conn, component, model, dim)
        log.info("embedding.columns_sized", component=component, model=model, dim=dim)


__all__ = ["VECTOR_COLUMNS", "EmbeddingModelMismatch", "VectorColumn", "ensure_vector_columns", "model_identity"]
