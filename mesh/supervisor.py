"""The local stack's supervisor: the services as child processes, each in its own process group, restarted with
exponential back-off when they crash, stopped with SIGTERM then SIGKILL after a grace period (mesh/stack.py)."""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO

from shared.runtime.children import parent_death_hook

log = logging.getLogger(__name__)

SERVICE_GRACE = 10.0
MIN_BACKOFF = 1.0
MAX_BACKOFF = 10.0
STABLE_AFTER = 30.0  # a service that ran this long restarts with the minimum backoff again


@dataclass
class Service:
    """One supervised child process."""

    name: str
    argv: list[str]
    env: dict[str, str] = field(default_factory=dict)  # over the supervisor's (e.g. the service's own REDIS_URL)
    proc: subprocess.Popen[bytes] | None = None
    started_at: float = 0.0
    restart_at: float = 0.0
    backoff: float = MIN_BACKOFF
    restarts: int = 0


class Supervisor:
    """Start services, restart crashed ones with exponential backoff, stop them all."""

    def __init__(
        self,
        services: Sequence[Service],
        env: dict[str, str],
        cwd: Path,
        *,
        max_backoff: float = MAX_BACKOFF,
        stable_after: float = STABLE_AFTER,
        log_dir: Path | None = None,
    ) -> None:
        """``log_dir``: each service's output is appended to ``<log_dir>/<name>.log`` (else inherited)."""
        self.services = list(services)
        self._log_dir = log_dir
        self._env = env
        self._cwd = cwd
        self._max_backoff = max_backoff
        self._stable_after = stable_after
        self._preexec = parent_death_hook()

    def poll(self) -> None:
        """Start what is due, notice what exited. Call it every fraction of a second."""
        now = time.monotonic()
        for service in self.services:
            if service.proc is None:
                if now >= service.restart_at:
                    self._spawn(service, now)
            elif service.proc.poll() is not None:
                self._on_exit(service, service.proc.returncode, now)

    def _open_log(self, service: Service) -> BinaryIO | None:
        if self._log_dir is None:
            return None
        self._log_dir.mkdir(parents=True, exist_ok=True)
        handle = (self._log_dir / f"{service.name}.log").open("ab")
        stamp = time.strftime("%Y-%m-%d %H:%M:%S")
        handle.write(f"----- {stamp} mesh stack: starting {service.name} (start #{service.restarts + 1})\n".encode())
        handle.flush()
        return handle

    def _spawn(self, service: Service, now: float) -> None:
        try:
            output = self._open_log(service)
            try:
                service.proc = subprocess.Popen(
                    service.argv,
                    env={**self._env, **service.env},
                    cwd=self._cwd,
                    stdin=subprocess.DEVNULL,
                    stdout=output,
                    stderr=subprocess.STDOUT if output else None,
                    start_new_session=True,  # its own process group: the stack signals it, not the tty
                    preexec_fn=self._preexec,  # the stack is single-threaded
                )
            finally:
                if output:
                    output.close()  # the child has its own copy
        except OSError as exc:
            log.error("service %s could not start: %s", service.name, exc)
            self._schedule_restart(service, now)
            return
        service.started_at = now
        log.info("service %s started (pid %d): %s", service.name, service.proc.pid, " ".join(service.argv))

    def _on_exit(self, service: Service, code: int, now: float) -> None:
        uptime = now - service.started_at
        service.proc = None
        if uptime >= self._stable_after:
            service.backoff = MIN_BACKOFF
        self._schedule_restart(service, now)
        log.warning(
            "service %s exited with code %s after %.1fs; restart #%d in %.1fs",
            service.name,
            code,
            uptime,
            service.restarts,
            service.restart_at - now,
        )

    def _schedule_restart(self, service: Service, now: float) -> None:
        service.restarts += 1
        service.restart_at = now + service.backoff
        service.backoff = min(service.backoff * 2, self._max_backoff)

    def stop(self, grace: float = SERVICE_GRACE) -> None:
        """SIGTERM every service, wait up to ``grace`` seconds, SIGKILL the rest."""
        running = [s for s in self.services if s.proc is not None and s.proc.poll() is None]
        for service in running:
            log.info("stopping service %s (pid %d)", service.name, _pid(service))
            _signal_group(service, signal.SIGTERM)
        deadline = time.monotonic() + grace
        while running and time.monotonic() < deadline:
            running = [s for s in running if s.proc is not None and s.proc.poll() is None]
            time.sleep(0.1)
        for service in running:
            log.warning("service %s ignored SIGTERM for %.0fs, killing it", service.name, grace)
            _signal_group(service, signal.SIGKILL)
        for service in self.services:
            if service.proc is not None:
                service.proc.wait()
                service.proc = None


def _pid(service: Service) -> int:
    return service.proc.pid if service.proc is not None else -1


def _signal_group(service: Service, sig: signal.Signals) -> None:
    """Signal the service's process group (it and anything it forked)."""
    try:
        os.killpg(_pid(service), sig)
    except (ProcessLookupError, PermissionError):
        pass
