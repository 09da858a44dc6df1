"""Consumers survive a Redis restart and a PostgreSQL restart, and lose nothing."""

from __future__ import annotations

from pathlib import Path

import pytest

from mesh.infra import free_port
from mesh.postgres_server import PostgresServer
from mesh.redis_server import RedisServer
from shared.contracts import Names
from shared.runtime.db import migrate
from shared.runtime.runner import redis_client
from tests.conftest import MIGRATIONS
from tests.helpers import mesh_for, running, wait_until


async def test_services_reconnect_after_redis_restarts(tmp_path: Path, database_url: str, sync_embedder) -> None:  # type: ignore[no-untyped-def]
    server = RedisServer(tmp_path / "redis", port=free_port(), persist=True)
    server.start()
    redis = redis_client(server.url)
    try:
        async with mesh_for(Names(), redis, server.url, database_url, sync_embedder) as mesh, \
                running(mesh.memory()), running(mesh.ltm()), running(mesh.chat()):
            first = await mesh.send("I grow tomatoes on my balcony.", user_id="u-r", session_id="s1")
            await mesh.reply_to(first)
            server.stop()
            server.start()  # same port, same append-only file: streams and groups survive
            second = await mesh.send("What do I grow?", user_id="u-r", session_id="s2")
            reply = await mesh.reply_to(second, timeout=30)
            assert reply.in_reply_to == second.message_id
            await wait_until(lambda: _stored(mesh, 4), timeout=30, message="all four turns stored")
    finally:
        await redis.aclose()
        server.stop()


async def _stored(mesh, n: int) -> bool:  # type: ignore[no-untyped-def]
    return await mesh.count("SELECT count(*) FROM conversation_messages") >= n


@pytest.mark.slow
async def test_messages_wait_out_a_postgres_restart(tmp_path: Path, redis, redis_url: str, names: Names,  # type: ignore[no-untyped-def]
                                                    sync_embedder) -> None:
    pg = PostgresServer(tmp_path / "pg", port=free_port(), fast=True)  # its data must outlive the restart
    pg.start()
    try:
        for component, directory in MIGRATIONS.items():
            await migrate(pg.url, component, directory)
        async with mesh_for(names, redis, redis_url, pg.url, sync_embedder) as mesh, \
                running(mesh.memory()), running(mesh.ltm()):
            pg.stop()
            # sent while PostgreSQL is down: held pending and retried, not dead-lettered
            msg = await mesh.send("My passport expires in March.", user_id="u-pg", session_id="s-pg")
            await wait_until(lambda: _retrying(mesh), timeout=20, message="memory service retrying")
            pg.start()
            await wait_until(lambda: _stored(mesh, 1), timeout=60, message="stored after the restart")
            await wait_until(lambda: _ingested(mesh, msg.user_id or ""), timeout=60, message="ingested after restart")
            assert await mesh.dead(names.user_input) == []
    finally:
        pg.ephemeral = True  # now remove the data directory with the server
        pg.stop()


async def _retrying(mesh) -> bool:  # type: ignore[no-untyped-def]
    return int(await mesh.redis.xlen(mesh.names.user_input)) == 1 and int(
        (await mesh.redis.xpending(mesh.names.user_input, mesh.names.memory_group))["pending"]) == 1


async def _ingested(mesh, user_id: str) -> bool:  # type: ignore[no-untyped-def]
    return await mesh.count("SELECT count(*) FROM ltm_ingested WHERE user_id = %s", user_id) == 1
