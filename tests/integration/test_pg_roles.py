"""The services' PostgreSQL role (mesh/pg_roles.py): it owns the mesh's database, so its own migrations and
every query of the services run, converted from a cluster whose tables an earlier run made as the superuser;
and it is refused what only a superuser may do: roles, databases, server files and programs, settings, and
another database's tables."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from pathlib import Path

import psycopg
import pytest

from mesh.pg_roles import ensure_app_role, with_database
from shared.runtime.db import migrate, open_pool
from tests.conftest import MIGRATIONS


@pytest.fixture
def fresh_db(pg_admin_url: str) -> Iterator[tuple[str, str]]:
    """A database migrated by the superuser (what an earlier run left) and a role name of this test's own."""
    name, role = f"r_{uuid.uuid4().hex[:10]}", f"app_{uuid.uuid4().hex[:8]}"
    with psycopg.connect(pg_admin_url, autocommit=True) as conn:
        conn.execute(f"CREATE DATABASE {name}")
    yield name, role
    with psycopg.connect(pg_admin_url, autocommit=True) as conn:
        conn.execute(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")
        conn.execute(f"DROP ROLE IF EXISTS {role}")
        conn.execute("DROP TABLE IF EXISTS not_yours")


async def test_the_app_role_owns_the_mesh_database_and_nothing_more(pg_admin_url: str, fresh_db: tuple[str, str],
                                                                    tmp_path: Path) -> None:
    name, role = fresh_db
    admin_db = with_database(pg_admin_url, name)
    for component, directory in MIGRATIONS.items():  # the earlier run: every table the superuser's
        await migrate(admin_db, component, directory)
    url = ensure_app_role(pg_admin_url, name, "app pw/1'", role=role)
    assert ensure_app_role(pg_admin_url, name, "app pw/1'", role=role) == url  # again: harmless

    with psycopg.connect(url, autocommit=True) as conn:
        assert conn.execute("SELECT rolsuper, rolcreaterole, rolcreatedb FROM pg_roles WHERE rolname = current_user"
                            ).fetchone() == (False, False, False)
        foreign = conn.execute(
            "SELECT c.relname FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace WHERE n.nspname = "
            "'public' AND c.relkind IN ('r', 'S', 'v', 'm', 'p') AND pg_get_userbyid(c.relowner) <> current_user "
            "AND NOT EXISTS (SELECT 1 FROM pg_depend d WHERE d.objid = c.oid AND d.deptype = 'e')").fetchall()
        assert foreign == []  # every table and sequence of the mesh is the role's now
    # the services' own path: migrations (again, and a new one altering an existing table), the pool, a write
    for component, directory in MIGRATIONS.items():
        assert await migrate(url, component, directory) == []
    (tmp_path / "001_alter.sql").write_text(
        "ALTER TABLE conversation_messages ADD COLUMN IF NOT EXISTS probe int;\n"
        "CREATE TABLE IF NOT EXISTS probe_table (id bigserial PRIMARY KEY);\n")
    assert await migrate(url, "probe", tmp_path) == [1]
    pool = await open_pool(url, max_size=2)
    try:
        async with pool.connection() as conn:
            await conn.execute("INSERT INTO probe_table DEFAULT VALUES")
            cur = await conn.execute("SELECT count(*) FROM probe_table")
            assert await cur.fetchone() == (1,)
    finally:
        await pool.close()

    with psycopg.connect(pg_admin_url, autocommit=True) as conn:  # a table of another database, the superuser's
        conn.execute("CREATE TABLE IF NOT EXISTS not_yours (secret text)")
    refused = [
        "CREATE ROLE intruder LOGIN SUPERUSER",
        f"CREATE DATABASE {name}_more",
        "SELECT rolpassword FROM pg_authid",
        "COPY (SELECT 1) TO PROGRAM 'id'",
        "SELECT pg_read_file('postgresql.conf')",
        "ALTER SYSTEM SET log_statement = 'all'",
        f"ALTER ROLE {role} SUPERUSER",
    ]
    for statement in refused:
        with psycopg.connect(url, autocommit=True) as conn, pytest.raises(psycopg.errors.InsufficientPrivilege):
            conn.execute(statement)
    admin_dbname = pg_admin_url.rsplit("/", 1)[-1].split("?")[0]
    with psycopg.connect(with_database(url, admin_dbname), autocommit=True) as conn, \
            pytest.raises(psycopg.errors.InsufficientPrivilege):
        conn.execute("SELECT * FROM not_yours")


def test_compose_init_script_makes_the_same_role(pg_admin_url: str, fresh_db: tuple[str, str]) -> None:
    """deploy/postgres/20-app-role.sh, as the postgres image runs it on a fresh volume (psql as POSTGRES_USER)."""
    import os
    import subprocess
    from urllib.parse import urlsplit

    from mesh.postgres_server import pg_bin_dir
    from tests.conftest import ROOT

    name, _ = fresh_db
    parts = urlsplit(pg_admin_url)
    env = {**os.environ, "PATH": f"{pg_bin_dir()}:{os.environ['PATH']}", "PGHOST": parts.hostname or "",
           "PGPORT": str(parts.port), "PGPASSWORD": parts.password or "", "POSTGRES_USER": parts.username or "",
           "POSTGRES_DB": name, "POSTGRES_APP_PASSWORD": "compose-app-pw"}
    try:
        subprocess.run(["sh", str(ROOT / "deploy" / "postgres" / "20-app-role.sh")], env=env, check=True,
                       capture_output=True, timeout=60)
        url = f"postgresql://mesh_app:compose-app-pw@{parts.hostname}:{parts.port}/{name}"
        with psycopg.connect(url, autocommit=True) as conn:
            assert conn.execute("SELECT rolsuper FROM pg_roles WHERE rolname = current_user").fetchone() == (False,)
            conn.execute("CREATE TABLE owned_here (id int)")  # the database's owner: its migrations run
            with pytest.raises(psycopg.errors.InsufficientPrivilege):
                conn.execute("CREATE ROLE intruder")
    finally:
        with psycopg.connect(pg_admin_url, autocommit=True) as conn:
            conn.execute(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")
            conn.execute("DROP ROLE IF EXISTS mesh_app")
