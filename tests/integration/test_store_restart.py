"""The local stack restarts its own Redis when it dies (issue "Never loses", faults): on the same port, with the
data of its append-only file, and says so in its log; a mesh that reconnects finds it where it was. Redis's
files are its owner's only, and when the stack runs as root Redis does not: it runs as the `redis` account."""

from __future__ import annotations

import asyncio
import os
import pwd
import shutil
import signal
import sys
import tempfile
from pathlib import Path

import pytest
import redis.asyncio as aioredis

from mesh.infra import read_pid
from mesh.stack_files import read_env_file
from tests.conftest import ROOT
from tests.helpers import wait_until


def _uid_of(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("Uid:"):
            return int(line.split()[1])
    raise AssertionError(f"no Uid line for pid {pid}")


def _expected_redis_uid() -> int:
    if os.geteuid() != 0:
        return os.geteuid()
    try:
        return pwd.getpwnam("redis").pw_uid
    except KeyError:
        pytest.fail("running as root and no `redis` account (Debian's redis-server package makes it)")


async def test_a_killed_redis_is_restarted_on_its_port_with_its_data(database_url: str) -> None:
    env = {k: v for k, v in os.environ.items() if k not in ("REDIS_URL", "MESH_DATA_DIR")}
    env["DATABASE_URL"] = database_url
    top = Path(tempfile.mkdtemp(prefix="mesh-stack-"))  # reachable by the redis account (pytest's tmp is private)
    os.chmod(top, 0o755)
    data = top / "stack"
    try:
        await _kill_and_check(env, data)
    finally:
        shutil.rmtree(top, ignore_errors=True)


async def _kill_and_check(env: dict[str, str], data: Path) -> None:
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "mesh", "stack", "--no-services", "--data-dir", str(data), cwd=ROOT, env=env,
        stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.PIPE)
    errors: list[str] = []

    async def read_log() -> None:
        assert proc.stderr is not None
        async for line in proc.stderr:
            errors.append(line.decode(errors="replace"))

    reader = asyncio.create_task(read_log())
    try:
        async def url() -> str | None:
            return read_env_file(data / "stack.env").get("REDIS_URL") if (data / "stack.env").exists() else None

        redis_url = await wait_until(url, timeout=60, message=f"stack.env (log: {''.join(errors)[-2000:]})")
        client = aioredis.Redis.from_url(redis_url)
        try:
            await client.set("survives", "yes", ex=600)
            await client.execute_command("BGREWRITEAOF")  # what was acknowledged is on disk, not just in the buffer

            async def rewritten() -> bool:
                return int((await client.info("persistence"))["aof_rewrite_in_progress"]) == 0

            await wait_until(rewritten, timeout=20, message="AOF rewrite done")
            old_pid = read_pid(data / "redis" / "redis.pid")
            assert old_pid
            assert _uid_of(old_pid) == _expected_redis_uid()
            os.kill(old_pid, signal.SIGKILL)

            async def back() -> bool:
                try:
                    pid = read_pid(data / "redis" / "redis.pid")
                    return pid not in (None, old_pid) and bool(await client.ping())
                except (aioredis.ConnectionError, OSError):
                    return False

            await wait_until(back, timeout=30, interval=0.2,
                             message=f"redis back on {redis_url} (log: {''.join(errors)[-2000:]})")
            assert await client.get("survives") == b"yes"
            new_pid = read_pid(data / "redis" / "redis.pid")
            assert new_pid and _uid_of(new_pid) == _expected_redis_uid()  # the restart too
            # the append-only file holds every message: nothing under the data directory is readable by others
            exposed = [f"{p} {oct(p.stat().st_mode & 0o777)}" for p in [data / "redis", *(data / "redis").rglob("*")]
                       if p.stat().st_mode & 0o077]
            assert not exposed, exposed
            log = "".join(errors)
            assert "is down" in log and "is back at" in log, log[-2000:]
        finally:
            await client.aclose()
    finally:
        proc.send_signal(signal.SIGTERM)
        await asyncio.wait_for(proc.wait(), 60)
        reader.cancel()
    assert proc.returncode == 0


def test_the_local_postgresql_needs_its_password(tmp_path: Path) -> None:
    """The stack's own PostgreSQL takes TCP logins with the role's password only (scram-sha-256), also after a
    restart, and even when its cluster was made by an earlier run with trust."""
    import psycopg

    from mesh.postgres_server import PostgresServer

    trusting = PostgresServer(tmp_path / "pg", fast=True)
    trusting.start()  # an earlier run's cluster: trust
    trusting.stop()
    server = PostgresServer(tmp_path / "pg", fast=True, password="p@ss w'rd/1")
    try:
        for start in ("converts the trust cluster", "finds it converted"):
            server.start()
            with psycopg.connect(server.url, connect_timeout=5) as conn:
                assert conn.execute("SELECT 1").fetchone() == (1,), start
            without = f"postgresql://mesh@127.0.0.1:{server.port}/mesh"
            with pytest.raises(psycopg.OperationalError, match="password"):
                psycopg.connect(without, connect_timeout=5)
            server.stop()
    finally:
        server.stop()
