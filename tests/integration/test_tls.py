"""TLS to Redis and PostgreSQL, chosen by URL alone: ``rediss://...?ssl_ca_certs=CA`` and
``postgresql://...?sslmode=verify-full&sslrootcert=CA``, against servers holding a certificate signed by a
throw-away CA made here.

Redis: a ``redis-server`` with only a TLS port; memory and chat_ai run over it and answer a turn, and a
client that does not trust the CA, or speaks plain TCP, is refused. PostgreSQL: the embedded server has no
SSL built in, so Debian's PostgreSQL binaries (``/usr/lib/postgresql/*/bin``; ``make install`` installs them
when missing) run a cluster with ``ssl=on`` and only ``hostssl`` logins; the mesh's migrations run over it,
the server's ``pg_stat_ssl`` confirms the session is encrypted, and a non-TLS login is refused.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import os
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import psycopg
import pytest
import redis.asyncio as aioredis
import redis.exceptions
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from mesh.infra import free_port, postgres_os_user, wait_for_postgres, wait_for_redis
from mesh.redis_server import find_redis_server
from shared.contracts import Names
from shared.runtime.db import migrate
from shared.runtime.runner import redis_client
from tests.helpers import mesh_for, running, wait_until


@dataclass(frozen=True)
class Certs:
    ca: Path
    cert: Path
    key: Path


def _name(cn: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])


def make_certs(directory: Path) -> Certs:
    """A CA and a server certificate for 127.0.0.1 / localhost signed by it (EC P-256, one day)."""
    now = dt.datetime.now(dt.UTC)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca = (x509.CertificateBuilder().subject_name(_name("memory-mesh test CA")).issuer_name(_name("memory-mesh test CA"))
          .public_key(ca_key.public_key()).serial_number(x509.random_serial_number())
          .not_valid_before(now - dt.timedelta(minutes=5)).not_valid_after(now + dt.timedelta(days=1))
          .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
          .sign(ca_key, hashes.SHA256()))
    key = ec.generate_private_key(ec.SECP256R1())
    alt = x509.SubjectAlternativeName([x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))])
    cert = (x509.CertificateBuilder().subject_name(_name("localhost")).issuer_name(ca.subject)
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(minutes=5)).not_valid_after(now + dt.timedelta(days=1))
            .add_extension(alt, critical=False).sign(ca_key, hashes.SHA256()))
    out = Certs(directory / "ca.crt", directory / "server.crt", directory / "server.key")
    out.ca.write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    out.cert.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    out.key.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                          serialization.NoEncryption()))
    out.key.chmod(0o600)
    return out


@pytest.fixture(scope="module")
def tls_dir() -> Iterator[Path]:
    """A directory the unprivileged PostgreSQL user can reach (pytest's tmp dirs are private to root)."""
    path = Path(tempfile.mkdtemp(prefix="mesh-tls-"))
    user = postgres_os_user()
    if user is not None:
        os.chown(path, user.uid, user.gid)
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


@pytest.fixture(scope="module")
def certs(tls_dir: Path) -> Certs:
    return make_certs(tls_dir)


# --------------------------------------------------------------------------- Redis over TLS
@pytest.fixture(scope="module")
def rediss_url(tls_dir: Path, certs: Certs) -> Iterator[str]:
    port = free_port()
    proc = subprocess.Popen(
        [find_redis_server(), "--port", "0", "--tls-port", str(port), "--bind", "127.0.0.1",
         "--tls-cert-file", str(certs.cert), "--tls-key-file", str(certs.key), "--tls-ca-cert-file", str(certs.ca),
         "--tls-auth-clients", "no", "--save", "", "--appendonly", "no", "--dir", str(tls_dir)],
        stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
    url = f"rediss://127.0.0.1:{port}/0?ssl_ca_certs={certs.ca}"
    try:
        wait_for_redis(url, 15, alive=lambda: proc.poll() is None)
        yield url
    finally:
        proc.terminate()
        proc.wait(10)


async def test_redis_over_tls_is_chosen_by_the_url(rediss_url: str, certs: Certs) -> None:
    client = redis_client(rediss_url)
    try:
        assert await client.ping()
        port_config = {str(k): str(v) for k, v in (await client.config_get("port")).items()}
        assert port_config in ({"port": "0"}, {"b'port'": "b'0'"}), port_config  # no plain-TCP port at all
    finally:
        await client.aclose()
    port = rediss_url.split(":")[2].split("/")[0]
    untrusted = aioredis.from_url(f"rediss://127.0.0.1:{port}/0", socket_connect_timeout=3)  # the system's CAs only
    plain = aioredis.from_url(f"redis://127.0.0.1:{port}/0", socket_connect_timeout=3, socket_timeout=3)
    for refused in (untrusted, plain):
        with pytest.raises((redis.exceptions.ConnectionError, redis.exceptions.TimeoutError)):
            await refused.ping()
        await refused.aclose()


async def test_a_chat_turn_over_tls(rediss_url: str, database_url: str, sync_embedder) -> None:  # type: ignore[no-untyped-def]
    names = Names().with_prefix(f"tls:{os.getpid()}:")
    client = redis_client(rediss_url)
    try:
        async with mesh_for(names, client, rediss_url, database_url, sync_embedder) as mesh:
            mesh.overrides["chat"] = {"enable_ltm": False}
            async with running(mesh.memory()), running(mesh.chat()):
                msg = await mesh.send("Hello over TLS", user_id="tls-user", session_id="tls-session")
                reply = await mesh.reply_to(msg, timeout=30)
                assert reply.session_id == "tls-session"
                sql = "SELECT count(*) FROM conversation_messages WHERE session_id = %s"

                async def both_stored() -> bool:  # memory stores the reply after chat_ai sent it: wait for it
                    return await mesh.count(sql, "tls-session") == 2

                # the input and the reply, stored by memory over the TLS bus
                await wait_until(both_stored, timeout=15, message="the input and the reply stored")
    finally:
        keys = [k async for k in client.scan_iter(match=f"{names.prefix}*")]
        if keys:
            await client.delete(*keys)
        await client.aclose()


# --------------------------------------------------------------------------- PostgreSQL over TLS
def debian_pg_bin() -> Path:
    found = sorted(Path("/usr/lib/postgresql").glob("*/bin/postgres"), key=lambda p: int(p.parent.parent.name))
    if not found:
        pytest.fail("no Debian PostgreSQL binaries under /usr/lib/postgresql (make install installs `postgresql` "
                    "with apt-get when root); the TLS test needs a server built with SSL")
    return found[-1].parent


@pytest.fixture(scope="module")
def pg_tls_url(tls_dir: Path, certs: Certs) -> Iterator[str]:
    bin_dir, user = debian_pg_bin(), postgres_os_user()
    extra = user.popen_kwargs() if user else {}
    env = {**{k: v for k, v in os.environ.items() if not k.startswith("PG")}, "LC_ALL": "C", "LANG": "C"}
    data, port, password = tls_dir / "pg", free_port(), "tls-secret"
    (tls_dir / "pw").write_text(password)
    if user is not None:
        for path in (certs.cert, certs.key, certs.ca, tls_dir / "pw"):
            os.chown(path, user.uid, user.gid)

    def run(*argv: str) -> None:
        subprocess.run(argv, check=True, env=env, cwd="/", stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                       stderr=subprocess.STDOUT, timeout=120, **extra)

    run(str(bin_dir / "initdb"), "-D", str(data), "-U", "mesh", "--auth-local=trust", "--auth-host=reject",
        f"--pwfile={tls_dir / 'pw'}", "-E", "UTF8")
    (data / "pg_hba.conf").write_text("local all all trust\nhostssl all all 127.0.0.1/32 scram-sha-256\n")
    options = (f"-c port={port} -c listen_addresses=127.0.0.1 -c unix_socket_directories={tls_dir} -c ssl=on "
               f"-c ssl_cert_file={certs.cert} -c ssl_key_file={certs.key} -c ssl_ca_file={certs.ca} -c fsync=off")
    run(str(bin_dir / "pg_ctl"), "-D", str(data), "-l", str(tls_dir / "pg.log"), "-o", options, "-w", "start")
    url = f"postgresql://mesh:{password}@127.0.0.1:{port}/postgres?sslmode=verify-full&sslrootcert={certs.ca}"
    try:
        wait_for_postgres(url, 30)
        yield url
    finally:
        run(str(bin_dir / "pg_ctl"), "-D", str(data), "-m", "immediate", "-w", "stop")


async def test_postgres_over_tls_is_chosen_by_the_url(pg_tls_url: str, tmp_path: Path) -> None:
    (tmp_path / "001_probe.sql").write_text("CREATE TABLE IF NOT EXISTS tls_probe (id int PRIMARY KEY);\n")
    assert await migrate(pg_tls_url, "tls-probe", tmp_path) == [1]  # the mesh's migration path, over TLS
    async with await psycopg.AsyncConnection.connect(pg_tls_url) as conn:
        cur = await conn.execute("SELECT ssl, version FROM pg_stat_ssl WHERE pid = pg_backend_pid()")
        row = await cur.fetchone()
        assert row is not None and row[0] is True and row[1].startswith("TLS"), row
        cur = await conn.execute("SELECT count(*) FROM schema_migrations WHERE component = 'tls-probe'")
        assert await cur.fetchone() == (1,)
    for refused in (pg_tls_url.replace("sslmode=verify-full", "sslmode=disable"),  # hba: hostssl only
                    pg_tls_url.split("?")[0] + "?sslmode=verify-full&sslrootcert=system"):  # CA not trusted
        with pytest.raises(psycopg.OperationalError):
            await psycopg.AsyncConnection.connect(refused, connect_timeout=5)
