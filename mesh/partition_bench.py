"""How long the partitioning migrations (ltm 006, memory 004) take on a database made by the older ones.

``python -m mesh.partition_bench --rows 100000``: a throw-away PostgreSQL (``fsync`` on, default settings; or
``--database-url`` of a server where it may create and drop a database) gets migrations ltm 001-005 and memory
001-003, then ``--rows`` memories, ingestion records and messages (random 384-dimension embeddings, sentences of
about 100 characters) for ``rows / 100`` users, with 20% as many entities, about 90% memory-entity links, 12%
relations and 5% sessions; then the new migrations run and their times are printed (docs/partitioning.md has the
figures). The rows are written by SQL, not through the services: only the conversion is measured.
"""

from __future__ import annotations

import argparse
import asyncio
import shutil
import tempfile
import time
from pathlib import Path

import psycopg
from psycopg import sql

from shared.runtime.db import migrate

ROOT = Path(__file__).resolve().parent.parent
DIRS = {"ltm": ROOT / "services" / "ltm" / "migrations", "memory": ROOT / "services" / "memory" / "migrations"}
OLD = {"ltm": 5, "memory": 3}

_VECTORS = """
CREATE TEMP TABLE vecs AS SELECT vi, (SELECT array_agg(random()::real - 0.5) FROM generate_series(1, 384)
                                      WHERE vi >= 0)::vector(384) AS v FROM generate_series(0, 999) AS vi;
CREATE TEMP TABLE words AS SELECT array['garden', 'kyoto', 'budget', 'cat', 'miso', 'rust', 'rewrite', 'deadline',
  'sister', 'berlin', 'oslo', 'nurse', 'google', 'tea', 'maps', 'teal', 'piano', 'allergy', 'peanuts', 'trip',
  'weather', 'project'] AS w;
"""
_LTM = """
INSERT INTO ltm_memories (memory_id, user_id, type, content, content_hash, embedding, confidence, entities,
    source_message_id, source_session_id, source_timestamp, speaker, meta, subject, slot, slot_value, valid_from,
    asserted_at, sources)
SELECT gen_random_uuid(), 'user-' || (i % {users}), CASE WHEN i % 3 = 0 THEN 'episodic' ELSE 'fact' END,
       'Turn ' || i || ': we talked about ' || w[1 + i % 22] || ' and ' || w[1 + (i / 7) % 22]
         || ' and what to do next week with the ' || w[1 + (i / 13) % 22] || '.',
       md5(i::text), v.v, 0.9, ARRAY[w[1 + i % 22]], 'msg-' || i, 'sess-' || (i % ({users} * 5)), 1.7e9 + i,
       'User', jsonb_build_object('role', 'user', 'question', false), 'User',
       CASE WHEN i % 10 = 0 THEN 'location' END, CASE WHEN i % 10 = 0 THEN w[1 + i % 22] END, 1.7e9 + i, 1.7e9 + i,
       jsonb_build_array(jsonb_build_object('message_id', 'msg-' || i, 'timestamp', 1.7e9 + i))
FROM generate_series(1, {rows}) AS i, words, vecs v WHERE v.vi = i % 1000;
INSERT INTO ltm_ingested (user_id, message_id) SELECT user_id, source_message_id FROM ltm_memories;
INSERT INTO ltm_entities (entity_id, user_id, name, name_norm, type, embedding, first_seen, last_seen)
SELECT gen_random_uuid(), 'user-' || u, w[k], w[k], 'thing', v.v, 1.7e9, 1.7e9
FROM generate_series(0, {users} - 1) AS u, generate_series(1, 20) AS k, words, vecs v WHERE v.vi = (u * 20 + k) % 1000;
INSERT INTO ltm_memory_entities (memory_id, entity_id, user_id, role)
SELECT m.memory_id, e.entity_id, m.user_id, 'mention' FROM ltm_memories m
JOIN ltm_entities e ON e.user_id = m.user_id AND e.name_norm = m.entities[1];
INSERT INTO ltm_relations (relation_id, user_id, subject_id, predicate, object_id)
SELECT gen_random_uuid(), a.user_id, a.entity_id, 'likes', b.entity_id FROM ltm_entities a
JOIN ltm_entities b ON b.user_id = a.user_id AND b.name_norm <> a.name_norm AND b.name_norm < 'e' AND a.name_norm < 'c';
"""
_MEMORY = """
INSERT INTO conversation_sessions (session_id, user_id, created_at, last_activity)
SELECT 'sess-' || s, 'user-' || (s % {users}), to_timestamp(1.7e9), to_timestamp(1.7e9)
FROM generate_series(0, {users} * 5 - 1) AS s;
ALTER TABLE conversation_messages DISABLE TRIGGER USER;
INSERT INTO conversation_messages (message_id, session_id, user_id, role, content, message_index, embedding,
    token_count, timestamp)
SELECT 'msg-' || i, 'sess-' || (i % ({users} * 5)), 'user-' || ((i % ({users} * 5)) % {users}),
       CASE WHEN i % 2 = 0 THEN 'human' ELSE 'ai' END,
       'Turn ' || i || ': we talked about the garden and what to do next week, because the deadline is in May.',
       i / ({users} * 5), CASE WHEN i % 2 = 0 THEN v.v END, 20, to_timestamp(1.7e9 + i)
FROM generate_series(1, {rows}) AS i, vecs v WHERE v.vi = i % 1000;
ALTER TABLE conversation_messages ENABLE TRIGGER USER;
INSERT INTO session_summary (session_id, message_count)
SELECT session_id, count(*) FROM conversation_messages GROUP BY 1
ON CONFLICT (session_id) DO UPDATE SET message_count = EXCLUDED.message_count;
INSERT INTO conversation_context (session_id, context_type, key, value)
SELECT session_id, 'project', 'k', '{{"a": 1}}' FROM conversation_sessions;
"""


def _with_db(url: str, name: str) -> str:
    return url.rsplit("/", 1)[0] + "/" + name


async def measure(admin_url: str, rows: int, work: Path) -> dict[str, float]:
    name = f"partition_bench_{rows}"
    with psycopg.connect(admin_url, autocommit=True) as conn:
        conn.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name)))
        conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
    url = _with_db(admin_url, name)
    try:
        for component, directory in DIRS.items():
            old = work / component
            old.mkdir(parents=True, exist_ok=True)
            for path in sorted(directory.glob("*.sql")):
                if int(path.name[:3]) <= OLD[component]:
                    shutil.copy(path, old)
            await migrate(url, component, old)
        started = time.perf_counter()
        counts = {"rows": sql.Literal(rows), "users": sql.Literal(max(1, rows // 100))}
        with psycopg.connect(url, autocommit=True) as conn:
            conn.execute(_VECTORS)
            conn.execute(sql.SQL(_LTM).format(**counts))
            conn.execute(sql.SQL(_MEMORY).format(**counts))
            conn.execute("VACUUM ANALYZE")
            size = conn.execute("SELECT pg_size_pretty(pg_database_size(current_database()))").fetchone()
        out = {"seed_s": time.perf_counter() - started}
        print(f"seeded {rows:,} rows per big table in {out['seed_s']:.1f} s (database {size[0] if size else '?'})")
        for component, directory in DIRS.items():
            started = time.perf_counter()
            applied = await migrate(url, component, directory)
            out[component] = time.perf_counter() - started
            print(f"{component} migrations {applied}: {out[component]:.2f} s", flush=True)
        return out
    finally:
        with psycopg.connect(admin_url, autocommit=True) as conn:
            conn.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name)))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m mesh.partition_bench", description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, default=100_000, help="memories, ingestion records and messages")
    parser.add_argument("--database-url", help="a server to use (a superuser URL); default: a throw-away one")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="partition-bench-") as tmp:
        if args.database_url:
            asyncio.run(measure(args.database_url, args.rows, Path(tmp)))
            return 0
        from mesh.postgres_server import PostgresServer

        server = PostgresServer(Path(tmp) / "pg", ephemeral=True)
        server.start()
        try:
            asyncio.run(measure(server.url, args.rows, Path(tmp) / "migrations"))
        finally:
            server.stop()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
