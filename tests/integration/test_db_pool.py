"""The pool's check as a connection leaves it (shared/runtime/db.py check_connection): no round trip for a
connection back from a request a moment ago, and never a connection whose server session has ended."""

from __future__ import annotations

import psycopg

from shared.runtime import db
from shared.runtime.db import open_pool
from tests.helpers import wait_until


async def _pid(pool) -> int:  # type: ignore[no-untyped-def]
    async with pool.connection() as conn:
        cur = await conn.execute("SELECT pg_backend_pid()")
        row = await cur.fetchone()
        assert row is not None
        return int(row[0])


async def test_a_connection_the_server_ended_is_never_handed_out(database_url: str) -> None:
    pool = await open_pool(database_url, min_size=1, max_size=1, name="test-check")
    try:
        first = await _pid(pool)
        assert await _pid(pool) == first  # back a moment ago, nothing to read: the same session, no check query
        async with await psycopg.AsyncConnection.connect(database_url, autocommit=True) as admin:
            await admin.execute("SELECT pg_terminate_backend(%s)", (first,))

            async def gone() -> bool:  # the backend has exited: it has written its notice and closed the socket
                cur = await admin.execute("SELECT count(*) FROM pg_stat_activity WHERE pid = %s", (first,))
                row = await cur.fetchone()
                return row is not None and row[0] == 0

            await wait_until(gone, timeout=10, message=f"backend {first} still running")
        # within RECENT_S of its return: the socket is readable (the termination notice), so the full check runs,
        # fails, and the pool hands out a new session instead of the dead one
        assert await _pid(pool) != first
    finally:
        await pool.close()


async def test_the_quick_check_skips_the_round_trip(database_url: str, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    full: list[object] = []
    original = db.AsyncConnectionPool.check_connection

    async def counting(conn):  # type: ignore[no-untyped-def]
        full.append(conn)
        await original(conn)

    monkeypatch.setattr(db.AsyncConnectionPool, "check_connection", staticmethod(counting))
    pool = await open_pool(database_url, min_size=1, max_size=1, name="test-quick")
    try:
        for _ in range(5):
            await _pid(pool)
        assert len(full) == 1, "only the first checkout (never returned yet) should have needed the round trip"
        monkeypatch.setattr(db, "RECENT_S", 0.0)
        await _pid(pool)
        assert len(full) == 2, "a connection idle longer than RECENT_S gets the full check"
    finally:
        await pool.close()
