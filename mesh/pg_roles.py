"""The services' PostgreSQL role: it owns the mesh's database and what the migrations make there, nothing more.

The local stack's cluster is created with the superuser ``mesh`` (initdb's bootstrap role), which starts the
server, creates the database and the ``vector`` extension. The services log in as ``mesh_app`` instead:
``LOGIN NOSUPERUSER NOCREATEDB NOCREATEROLE NOREPLICATION NOBYPASSRLS``, owner of the database and its
``public`` schema, so their own migrations (``CREATE TABLE IF NOT EXISTS`` ..., advisory locks) run, while
reading other databases' data, ``pg_authid``, ``COPY ... PROGRAM``, server files, roles and settings stay the
superuser's. A cluster an earlier run made (its tables owned by the superuser) is converted at start: every
table, sequence, view and function of ``public`` is handed to the role.
"""

from __future__ import annotations

from urllib.parse import quote, urlsplit, urlunsplit

APP_ROLE = "mesh_app"

_OBJECTS = """
SELECT format('ALTER %%s %%s OWNER TO %%I', kind, name, %(role)s) FROM (
    SELECT CASE c.relkind WHEN 'S' THEN 'SEQUENCE' WHEN 'v' THEN 'VIEW' WHEN 'm' THEN 'MATERIALIZED VIEW'
                ELSE 'TABLE' END AS kind,
           format('%%I.%%I', n.nspname, c.relname) AS name
      FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
     WHERE n.nspname = 'public' AND c.relkind IN ('r', 'p', 'v', 'm', 'S')
       AND pg_get_userbyid(c.relowner) <> %(role)s
       -- owned sequences follow their table; a partition (which depends on its table) has an owner of its own, and
       -- a partitioned table's key column depends on the table itself (objsubid: the column): both are changed too
       AND (c.relispartition
            OR NOT EXISTS (SELECT 1 FROM pg_depend d WHERE d.classid = 'pg_class'::regclass AND d.objid = c.oid
                           AND d.objsubid = 0 AND d.deptype IN ('a', 'i', 'e')))
    UNION ALL
    SELECT 'FUNCTION', p.oid::regprocedure::text
      FROM pg_proc p JOIN pg_namespace n ON n.oid = p.pronamespace
     WHERE n.nspname = 'public' AND pg_get_userbyid(p.proowner) <> %(role)s
       AND NOT EXISTS (SELECT 1 FROM pg_depend d WHERE d.classid = 'pg_proc'::regclass AND d.objid = p.oid
                       AND d.deptype = 'e')  -- the vector extension's functions stay its own
) AS o
"""


def ensure_app_role(superuser_url: str, dbname: str, password: str, role: str = APP_ROLE) -> str:
    """Create (or re-password) ``role``, give it the database and its objects; return its URL for ``dbname``."""
    import psycopg
    from psycopg import sql

    options = sql.SQL("LOGIN NOSUPERUSER NOCREATEDB NOCREATEROLE NOREPLICATION NOBYPASSRLS PASSWORD {}").format(
        sql.Literal(password))
    with psycopg.connect(superuser_url, autocommit=True, connect_timeout=5) as conn:
        conn.execute("SET password_encryption = 'scram-sha-256'")
        exists = conn.execute("SELECT 1 FROM pg_roles WHERE rolname = %s", (role,)).fetchone()
        verb = sql.SQL("ALTER ROLE") if exists else sql.SQL("CREATE ROLE")
        conn.execute(sql.SQL("{} {} {}").format(verb, sql.Identifier(role), options))
        conn.execute(sql.SQL("ALTER DATABASE {} OWNER TO {}").format(sql.Identifier(dbname), sql.Identifier(role)))
    with psycopg.connect(with_database(superuser_url, dbname), autocommit=True, connect_timeout=5) as conn:
        conn.execute(sql.SQL("ALTER SCHEMA public OWNER TO {}").format(sql.Identifier(role)))
        with conn.transaction():
            for (statement,) in conn.execute(_OBJECTS, {"role": role}).fetchall():
                conn.execute(statement)
    return with_credentials(with_database(superuser_url, dbname), role, password)


def with_database(url: str, dbname: str) -> str:
    parts = urlsplit(url)
    return urlunsplit(parts._replace(path=f"/{dbname}"))


def with_credentials(url: str, user: str, password: str) -> str:
    parts = urlsplit(url)
    host = parts.hostname or "127.0.0.1"
    netloc = f"{quote(user, safe='')}:{quote(password, safe='')}@{host}" + (f":{parts.port}" if parts.port else "")
    return urlunsplit(parts._replace(netloc=netloc))
