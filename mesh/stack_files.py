"""The files of a local stack (mesh/stack.py): where they live, the env file the services and tools read, and the
lock and pid that say a stack runs."""

from __future__ import annotations

import fcntl
import logging
import os
import shlex
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from mesh.infra import (
    pid_alive,
    read_pid,
)

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class StackPaths:
    """The files of one local stack, all under its data directory (default ``.data``)."""

    root: Path

    @classmethod
    def from_arg(cls, data_dir: str | None) -> StackPaths:
        return cls(Path(data_dir or os.environ.get("MESH_DATA_DIR") or ".data").absolute())

    @property
    def env(self) -> Path:
        return self.root / "stack.env"

    @property
    def pid(self) -> Path:
        return self.root / "stack.pid"

    @property
    def log(self) -> Path:
        return self.root / "stack.log"

    @property
    def logs(self) -> Path:
        return self.root / "logs"

    def service_log(self, name: str) -> Path:
        return self.logs / f"{name}.log"

    @property
    def lock(self) -> Path:
        return self.root / "stack.lock"

    @property
    def redis(self) -> Path:
        return self.root / "redis"

    @property
    def pg(self) -> Path:
        return self.root / "pg"


def read_env_file(path: Path) -> dict[str, str]:
    """``KEY=value`` lines as a dict (a value with spaces is shell-quoted, see write_env_file); {} if missing."""
    values: dict[str, str] = {}
    try:
        text = path.read_text()
    except FileNotFoundError:
        return values
    for line in text.splitlines():
        key, sep, value = line.strip().partition("=")
        if sep and key and not key.startswith("#"):
            values[key] = " ".join(shlex.split(value)) if value[:1] in ("'", '"') else value
    return values


def write_env_file(path: Path, values: dict[str, str]) -> None:
    """Write ``KEY=value`` lines atomically (readers never see half a file); the owner's only (the URLs carry
    the Redis admin's password)."""
    staging = path.with_name(f".{path.name}.tmp")
    staging.touch(mode=0o600)
    staging.chmod(0o600)
    staging.write_text("".join(f"{key}={shlex.quote(value) if ' ' in value else value}\n"  # `. stack.env` in sh
                               for key, value in values.items()))
    os.replace(staging, path)


def _cmdline(pid: int) -> list[str] | None:
    try:
        raw = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return None
    return [part.decode(errors="replace") for part in raw.split(b"\0") if part]


def running_stack_pid(paths: StackPaths) -> int | None:
    """The pid in ``stack.pid`` if that process is alive and is a ``mesh stack``."""
    pid = read_pid(paths.pid)
    if pid is None or not pid_alive(pid):
        return None
    cmdline = _cmdline(pid)
    if cmdline is not None and not ("mesh" in cmdline and "stack" in cmdline):
        return None  # the pid was reused by something else
    return pid


@contextmanager
def stack_lock(paths: StackPaths) -> Iterator[None]:
    """Hold ``stack.lock`` so that two stacks never share one data directory."""
    paths.root.mkdir(parents=True, exist_ok=True)
    with paths.lock.open("a+") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            other = read_pid(paths.pid)
            raise SystemExit(
                f"another mesh stack (pid {other}) is using {paths.root}; stop it with `python -m mesh down`"
            ) from None
        yield


def tail(path: Path, lines: int = 30) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return ""
