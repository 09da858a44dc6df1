"""``mesh reembed``: embed every stored text again with the model EMBEDDING_MODEL names (a change of model).

Run it with ltm and memory stopped, with the environment the services will then run with (EMBEDDING_MODEL,
EMBEDDING_BASE_URL/EMBEDDING_API_KEY, DATABASE_URL or the local stack's). For each vector column of
shared/runtime/vectors.py:

- ltm's (memories, entities; NOT NULL): a column ``embedding_next vector(<size>)`` is added and filled in batches
  from the text each vector was made from, with a progress bar; then, in one transaction holding the table's lock,
  the rows still missing one (written meanwhile) are filled, the old column dropped and the new one renamed. An
  interrupted run resumes where it stopped (the rows that have ``embedding_next`` are not embedded again).
- memory's (conversation_messages, optional): the vectors are cleared and the column re-typed; the memory service
  embeds the messages again in the background, as it does every new one (MEMORY_EMBED_INTERVAL_S), reading them
  with its own decryption key.

The model is then recorded in ``embedding_models``, and the services start with it.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import time
from collections.abc import Callable
from typing import Any

from psycopg import AsyncConnection, sql

from shared.runtime.vectors import VECTOR_COLUMNS, VectorColumn, column_dim, record_model, retype, triggers_lifted

NEXT = "embedding_next"


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--component", choices=["ltm", "memory", "all"], default="all")
    parser.add_argument("--batch", type=int, default=256, help="texts per embedding call (default 256)")
    parser.add_argument("--database-url", default=None, help="default: DATABASE_URL, else the local stack's")
    parser.add_argument("--json", action="store_true", help="print the counts as JSON only")


async def _count_missing(conn: AsyncConnection, c: VectorColumn) -> int:
    cur = await conn.execute(sql.SQL("SELECT count(*) FROM {} WHERE {} IS NULL").format(
        sql.Identifier(c.table), sql.Identifier(NEXT)))
    row = await cur.fetchone()
    return int(row[0]) if row else 0


async def _fill(conn: AsyncConnection, c: VectorColumn, encode: Callable[[list[str]], Any], batch: int,
                done: Callable[[int], object]) -> int:
    """Embed the rows without ``embedding_next`` in batches, walking (user_id, key): the order of the user's index
    (and of the partitioned tables' keys); the number embedded."""
    t, key, nxt = sql.Identifier(c.table), sql.Identifier(c.key), sql.Identifier(NEXT)
    src = sql.SQL(c.source)  # type: ignore[arg-type]  # a constant of shared/runtime/vectors.py, never input
    first = sql.SQL("SELECT t.user_id, t.{key}, {src} FROM {t} t WHERE t.{nxt} IS NULL ORDER BY t.user_id, t.{key}"
                    " LIMIT %s").format(key=key, src=src, t=t, nxt=nxt)
    more = sql.SQL("SELECT t.user_id, t.{key}, {src} FROM {t} t WHERE t.{nxt} IS NULL"
                   " AND (t.user_id, t.{key}) > (%s, %s) ORDER BY t.user_id, t.{key} LIMIT %s").format(
        key=key, src=src, t=t, nxt=nxt)
    update = sql.SQL("UPDATE {t} SET {nxt} = %s::vector WHERE user_id = %s AND {key} = %s").format(t=t, nxt=nxt,
                                                                                                  key=key)
    last: tuple[Any, Any] | None = None
    total = 0
    while True:
        cur = await conn.execute(first, (batch,)) if last is None else await conn.execute(more, (*last, batch))
        rows = await cur.fetchall()
        if not rows:
            return total
        vecs = await asyncio.to_thread(encode, [c.text(tuple(r[2:])) for r in rows])
        async with conn.cursor() as wcur:
            await wcur.executemany(update, [("[" + ",".join(f"{x:.7g}" for x in v) + "]", r[0], r[1])
                                            for r, v in zip(rows, vecs, strict=True)])
        last = (rows[-1][0], rows[-1][1])
        total += len(rows)
        done(len(rows))


async def reembed_component(conn: AsyncConnection, component: str, name: str, dim: int,
                            encode: Callable[[list[str]], Any], batch: int,
                            progress: Callable[[str, int], Callable[[int], object]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for c in VECTOR_COLUMNS[component]:
        label = f"{c.table}.{c.column}"
        if c.nullable:
            async with conn.transaction():
                cur = await conn.execute(sql.SQL("SELECT count(*) FROM {} WHERE {} IS NOT NULL").format(
                    sql.Identifier(c.table), sql.Identifier(c.column)))
                row = await cur.fetchone()
                await retype(conn, c, dim)
            out[label] = {"cleared": int(row[0]) if row else 0, "embedded": 0,
                          "note": "the memory service embeds them again in the background"}
            continue
        await conn.execute(sql.SQL("ALTER TABLE {} ADD COLUMN IF NOT EXISTS {} vector({})").format(
            sql.Identifier(c.table), sql.Identifier(NEXT), sql.Literal(dim)))
        if await column_dim(conn, c.table, NEXT) != dim:  # a run for another model was interrupted: start over
            async with conn.transaction():
                await retype(conn, c, dim, column=NEXT)
        bar = progress(label, await _count_missing(conn, c))
        embedded = await _fill(conn, c, encode, batch, bar)
        async with conn.transaction():  # what was written meanwhile, then the swap, under the table's lock
            await conn.execute(sql.SQL("LOCK TABLE {} IN EXCLUSIVE MODE").format(sql.Identifier(c.table)))
            embedded += await _fill(conn, c, encode, batch, bar)
            t, col, nxt = sql.Identifier(c.table), sql.Identifier(c.column), sql.Identifier(NEXT)
            async with triggers_lifted(conn, c.table, c.column):  # made again on the new column of that name
                await conn.execute(sql.SQL("ALTER TABLE {} DROP COLUMN {}").format(t, col))
                await conn.execute(sql.SQL("ALTER TABLE {} RENAME COLUMN {} TO {}").format(t, nxt, col))
                await conn.execute(sql.SQL("ALTER TABLE {} ALTER COLUMN {} SET NOT NULL").format(t, col))
        out[label] = {"embedded": embedded}
    await record_model(conn, component, name, dim)
    return out


async def reembed(database_url: str, components: list[str], batch: int = 256,
                  progress: Callable[[str, int], Callable[[int], object]] | None = None) -> dict[str, Any]:
    from shared.runtime.embedding import SyncEmbedder

    model = SyncEmbedder()
    started = time.perf_counter()
    result: dict[str, Any] = {"model": model.name, "dim": model.dim, "components": {}}
    quiet = progress or (lambda _label, _total: (lambda _n: None))
    async with await AsyncConnection.connect(database_url, autocommit=True) as conn:
        for component in components:
            result["components"][component] = await reembed_component(
                conn, component, model.name, model.dim, lambda texts: model.encode(texts, batch), batch, quiet)
    result["seconds"] = round(time.perf_counter() - started, 2)
    return result


def run(args: argparse.Namespace) -> int:
    import os

    from tqdm import tqdm

    url = args.database_url or os.environ.get("DATABASE_URL")
    if not url:
        from mesh.client import stack_urls

        url = stack_urls()["DATABASE_URL"]
    bars: list[Any] = []

    def progress(label: str, total: int) -> Callable[[int], object]:
        bar = tqdm(total=total, desc=label, unit="text", disable=args.json)
        bars.append(bar)
        return bar.update

    components = ["ltm", "memory"] if args.component == "all" else [args.component]
    try:
        result = asyncio.run(reembed(url, components, args.batch, progress))
    finally:
        for bar in bars:
            bar.close()
    print(json.dumps(result, indent=None if args.json else 2))
    return 0
