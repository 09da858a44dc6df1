"""PostgreSQL: an explicitly opened psycopg 3 async pool, and versioned idempotent migrations.

Migrations are ``NNN_name.sql`` files of a component (``memory``, ``ltm``), applied in
order inside one transaction each, under an advisory lock so that several copies of
a service starting at once apply each file exactly once. Every file is written to be
safe to run again (``IF NOT EXISTS``), and ``schema_migrations`` records what ran.
"""

from __future__ import annotations

import re
import select
import time
import weakref
from pathlib import Path

import psycopg
from pgvector.psycopg import register_vector_async
from psycopg_pool import AsyncConnectionPool

from shared.runtime.logging import get_logger

log = get_logger(__name__)

MIGRATION_LOCK = 7_246_351  # arbitrary, fixed advisory-lock key
_NAME = re.compile(r"^(\d{3})_[\w-]+\.sql$")


async def _configure(conn: psycopg.AsyncConnection) -> None:
    await register_vector_async(conn)


RECENT_S = 5.0  # a connection back in the pool for less than this is checked without a round trip (check_connection)
_returned: weakref.WeakKeyDictionary[psycopg.AsyncConnection, float] = weakref.WeakKeyDictionary()


async def _returned_now(conn: psycopg.AsyncConnection) -> None:
    _returned[conn] = time.monotonic()


async def check_connection(conn: psycopg.AsyncConnection) -> None:
    """The pool's check as a connection leaves it: psycopg's (an empty query, one round trip) unless the connection
    came back less than ``RECENT_S`` ago and its socket has nothing to read. A server that restarted or ended the
    session has written to the socket (the termination notice) or closed it, and either makes it readable; an
    idle connection that is well has nothing to read. So a busy process pays no round trip per request, and a
    connection the server closed before the checkout is not handed out; one idle longer (where a network could
    have dropped it silently) gets the full check."""
    at = _returned.get(conn)
    if at is not None and time.monotonic() - at < RECENT_S and not conn.broken:
        poller = select.poll()  # (not select.select: a descriptor above 1023 is fine)
        poller.register(conn.pgconn.socket, select.POLLIN)
        if not poller.poll(0):
            return
    await AsyncConnectionPool.check_connection(conn)


async def open_pool(dsn: str, *, min_size: int = 1, max_size: int = 8, name: str = "mesh") -> AsyncConnectionPool:
    """Open (and wait for) a pool whose connections know the ``vector`` type.

    ``prepare_threshold=None`` keeps psycopg from switching per-user queries to a
    generic plan (see ../shared/README.md: the filtered-vector-index trap).
    ``check`` tests a connection as it leaves the pool (:func:`check_connection`), so after a
    PostgreSQL restart no request fails on a connection the server already closed.
    """
    pool = AsyncConnectionPool(
        dsn,
        min_size=min_size,
        max_size=max_size,
        name=name,
        configure=_configure,
        check=check_connection,
        reset=_returned_now,
        kwargs={"autocommit": True, "prepare_threshold": None},
        open=False,
        reconnect_timeout=3600,
    )
    await pool.open(wait=True, timeout=30)
    return pool


def _notice(component: str, message: str) -> None:
    if not (message.endswith(", skipping") or message.startswith("drop cascades to")):
        log.info("db.notice", component=component, message=message)


def migration_files(directory: Path) -> list[tuple[int, Path]]:
    files = []
    for path in sorted(directory.glob("*.sql")):
        m = _NAME.match(path.name)
        if m is None:
            raise ValueError(f"migration file name must be NNN_name.sql: {path.name}")
        files.append((int(m.group(1)), path))
    versions = [v for v, _ in files]
    if len(set(versions)) != len(versions):
        raise ValueError(f"duplicate migration versions in {directory}")
    return files


async def migrate(dsn: str, component: str, directory: Path) -> list[int]:
    """Apply the component's pending migrations; returns the versions applied now."""
    applied_now: list[int] = []
    async with await psycopg.AsyncConnection.connect(dsn, autocommit=True) as conn:
        # what a migration reports as it goes (ltm 006 and memory 004: rows copied per table, and the time), not the
        # routine notices of IF NOT EXISTS / IF EXISTS and DROP ... CASCADE
        conn.add_notice_handler(lambda d: _notice(component, d.message_primary or ""))
        async with conn.transaction():  # under the lock: two first starts at once (memory, ltm) race on the table
            await conn.execute("SELECT pg_advisory_xact_lock(%s)", (MIGRATION_LOCK,))
            await conn.execute(
                "CREATE TABLE IF NOT EXISTS schema_migrations ("
                " component text NOT NULL, version int NOT NULL, name text NOT NULL,"
                " applied_at timestamptz NOT NULL DEFAULT now(), PRIMARY KEY (component, version))"
            )
        for version, path in migration_files(directory):
            async with conn.transaction():
                await conn.execute("SELECT pg_advisory_xact_lock(%s)", (MIGRATION_LOCK,))
                cur = await conn.execute(
                    "SELECT 1 FROM schema_migrations WHERE component = %s AND version = %s", (component, version)
                )
                if await cur.fetchone():
                    continue
                await conn.execute(path.read_text(encoding="utf-8").encode())
                await conn.execute(
                    "INSERT INTO schema_migrations (component, version, name) VALUES (%s, %s, %s)",
                    (component, version, path.name),
                )
                applied_now.append(version)
                log.info("db.migrated", component=component, version=version, file=path.name)
    return applied_now
