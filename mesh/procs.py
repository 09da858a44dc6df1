"""Service processes for a run: ``python -m services.<name>``, each with its own environment and log file.

:func:`spawn` and :func:`stop_groups` are the one way mesh tooling starts and stops services (evaluations here,
the bench in mesh/bench_procs.py); :class:`ServiceProcesses` is the evaluations' group of them.

Unlike the stack's supervisor (mesh/stack.py), nothing is restarted: a service that exits during an
evaluation is an error the caller reports (with the end of that service's log). Every child runs in a
process group of its own and gets SIGTERM if this process dies; :meth:`ServiceProcesses.stop` sends SIGTERM
to each group, then SIGKILL to what is left after the grace period.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import IO

from mesh.stack_files import tail
from shared.runtime.children import parent_death_hook

ROOT = Path(__file__).resolve().parent.parent


@dataclass
class Child:
    name: str
    log: Path
    proc: subprocess.Popen[bytes]
    handle: IO[bytes]


class ServiceProcesses:
    def __init__(self, log_dir: Path, cwd: Path = ROOT) -> None:
        self.log_dir, self.cwd = log_dir, cwd
        self.children: list[Child] = []

    def start(self, name: str, module: str, env: dict[str, str]) -> Child:
        """Start ``python -m module`` as ``name`` (its stdout and stderr go to ``<log_dir>/<name>.log``)."""
        log = self.log_dir / f"{name}.log"
        proc, handle = spawn(module, env, log, self.cwd)
        child = Child(name, log, proc, handle)
        self.children.append(child)
        return child

    def check(self) -> None:
        """Raise RuntimeError naming the first service that has exited, with the end of its log."""
        for child in self.children:
            code = child.proc.poll()
            if code is not None:
                raise RuntimeError(f"service {child.name} exited with code {code}; the end of {child.log}:\n"
                                   f"{tail(child.log, 25)}")

    def stop(self, grace: float = 15.0) -> None:
        """SIGTERM every service, SIGKILL what is left after ``grace`` seconds; a second Ctrl-C cannot cut it short."""
        previous = signal.signal(signal.SIGINT, signal.SIG_IGN) if _main_thread() else None
        try:
            self._stop(grace)
        finally:
            if previous is not None:
                signal.signal(signal.SIGINT, previous)

    def _stop(self, grace: float) -> None:
        stop_groups([c.proc for c in self.children], grace)
        for child in self.children:
            child.handle.close()
        self.children.clear()

    def __enter__(self) -> ServiceProcesses:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.stop()


def _main_thread() -> bool:
    import threading

    return threading.current_thread() is threading.main_thread()


def spawn(module: str, env: dict[str, str], log: Path, cwd: Path = ROOT) -> tuple[subprocess.Popen[bytes], IO[bytes]]:
    """``python -m module`` in a process group of its own, output appended to ``log``, SIGTERM if we die.

    The one way mesh tooling (evaluations, the bench) starts a service; the caller closes the handle after
    the process ended (:func:`stop_groups`).
    """
    log.parent.mkdir(parents=True, exist_ok=True)
    handle = log.open("ab")
    try:
        proc = subprocess.Popen([sys.executable, "-m", module], env=env, cwd=cwd, stdin=subprocess.DEVNULL,
                                stdout=handle, stderr=subprocess.STDOUT, start_new_session=True,
                                preexec_fn=parent_death_hook())
    except BaseException:
        handle.close()
        raise
    return proc, handle


def stop_groups(procs: list[subprocess.Popen[bytes]], grace: float) -> list[subprocess.Popen[bytes]]:
    """SIGTERM each process group at once, SIGKILL what is left after ``grace`` seconds; returns those killed."""
    running = [p for p in procs if p.poll() is None]
    for proc in running:
        killpg(proc.pid, signal.SIGTERM)
    deadline = time.monotonic() + grace
    while running and time.monotonic() < deadline:
        running = [p for p in running if p.poll() is None]
        time.sleep(0.1)
    for proc in running:
        killpg(proc.pid, signal.SIGKILL)
    for proc in procs:
        proc.wait()
    return running


def killpg(pid: int, sig: signal.Signals) -> None:
    try:
        os.killpg(pid, sig)
    except (ProcessLookupError, PermissionError):
        pass
