"""What a database's schema is, as comparable rows, and throw-away databases for migration tests."""

from __future__ import annotations

import uuid
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from urllib.parse import urlsplit, urlunsplit

import psycopg

MEMORY_TABLES = ("conversation_%", "session_%", "user_preferences", "user_deletions")
LTM_TABLES = ("ltm_%", "user_deletions")

# Every table of public whose name matches one of the patterns: its columns, constraints, indexes, triggers and
# partitioning (partitions included, with their bounds), and the functions of public that are not an extension's.
_SCHEMA = """
WITH rel AS (
    SELECT c.oid, c.relname, c.relkind FROM pg_class c
    WHERE c.relnamespace = 'public'::regnamespace AND c.relkind IN ('r', 'p') AND c.relname LIKE ANY(%(like)s)
)
SELECT 'column', r.relname, format('%%s %%s %%s %%s %%s', a.attnum, a.attname, format_type(a.atttypid, a.atttypmod),
       a.attnotnull, a.attgenerated) || coalesce(' default ' || pg_get_expr(d.adbin, d.adrelid), '')
  FROM rel r JOIN pg_attribute a ON a.attrelid = r.oid AND a.attnum > 0 AND NOT a.attisdropped
  LEFT JOIN pg_attrdef d ON d.adrelid = r.oid AND d.adnum = a.attnum
UNION ALL
SELECT 'constraint', r.relname, con.conname || ' ' || pg_get_constraintdef(con.oid)
  FROM rel r JOIN pg_constraint con ON con.conrelid = r.oid
UNION ALL
SELECT 'index', r.relname, pg_get_indexdef(i.indexrelid) FROM rel r JOIN pg_index i ON i.indrelid = r.oid
UNION ALL
SELECT 'trigger', r.relname, pg_get_triggerdef(t.oid) FROM rel r JOIN pg_trigger t ON t.tgrelid = r.oid
 WHERE NOT t.tgisinternal
UNION ALL
SELECT 'partitioned', r.relname, pg_get_partkeydef(r.oid) FROM rel r WHERE r.relkind = 'p'
UNION ALL
SELECT 'partition', r.relname, pg_get_expr(c.relpartbound, c.oid) || ' of ' || i.inhparent::regclass::text
  FROM rel r JOIN pg_class c ON c.oid = r.oid JOIN pg_inherits i ON i.inhrelid = r.oid
UNION ALL
SELECT 'function', p.proname, md5(p.prosrc) FROM pg_proc p
 WHERE p.pronamespace = 'public'::regnamespace AND p.proname LIKE ANY(%(like)s)
   AND NOT EXISTS (SELECT 1 FROM pg_depend d WHERE d.classid = 'pg_proc'::regclass AND d.objid = p.oid
                   AND d.deptype = 'e')
ORDER BY 1, 2, 3
"""


def schema_of(conn: psycopg.Connection, patterns: Sequence[str]) -> list[tuple[str, str, str]]:
    """The schema of the tables (and functions) named like ``patterns`` (LIKE), sorted."""
    return [(r[0], r[1], r[2]) for r in conn.execute(_SCHEMA, {"like": list(patterns)}).fetchall()]


def schema_of_url(url: str, patterns: Sequence[str]) -> list[tuple[str, str, str]]:
    with psycopg.connect(url, autocommit=True) as conn:
        return schema_of(conn, patterns)


def with_db(url: str, dbname: str) -> str:
    return urlunsplit(urlsplit(url)._replace(path=f"/{dbname}"))


@contextmanager
def empty_database(admin_url: str) -> Iterator[str]:
    """A new empty database on the test server (dropped afterwards); yields its URL."""
    name = f"t_empty_{uuid.uuid4().hex[:10]}"
    with psycopg.connect(admin_url, autocommit=True) as conn:
        conn.execute(f"CREATE DATABASE {name}")
    try:
        yield with_db(admin_url, name)
    finally:
        with psycopg.connect(admin_url, autocommit=True) as conn:
            conn.execute(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")
