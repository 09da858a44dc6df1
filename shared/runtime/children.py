"""Worker processes of one service: ltm's ingest runs in children of the process that answers requests.

Why processes: ingest (spaCy, embedding passes) and a search share one GIL and one event loop in one process, and a
search waits behind them (``make bench``: search p95 while ingest runs flat out 2.5-3.2x a quiet mesh). In a child
at a lower OS priority (``PROCESS_NICE``) ingest takes only the CPU the searches leave: 1.4x, measured the same hour
(docs/operations.md). To the outside it stays one service: the stack, compose and the bench start one ``ltm``; it
answers ``ping`` once its children are ready; they die with it.

- A child is ``python -m <module>`` in the parent's process group (a signal to the service reaches both), with
  ``MESH_READY_FD`` naming a pipe it writes one line to once ready (:func:`announce_ready`), and SIGTERM when
  the parent dies (:func:`parent_death_hook`, also the stack's).
- :meth:`Children.start` spawns them all and waits until each is ready (one that exits first, or is not ready in
  time, is an error); :meth:`Children.watch` starts one that exits again, after a back-off, and sends them SIGTERM
  as soon as the service stops (under compose's init only the parent gets the signal), so they drain beside it;
  :meth:`Children.stop` waits for them, then kills what is left.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import os
import signal
import socket
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from shared.runtime.logging import get_logger
from shared.runtime.metrics import Metrics
from shared.runtime.priority import SharedCount

log = get_logger(__name__)

READY_FD_ENV = "MESH_READY_FD"
MIN_BACKOFF_S, MAX_BACKOFF_S = 1.0, 30.0


def parent_death_hook() -> Callable[[], None] | None:
    """A preexec hook (Linux) so a child gets SIGTERM if its parent is SIGKILLed.

    The signal fires when the *thread* that spawned the child exits: spawn from a long-lived thread (the stack's
    main thread, a service's event loop).
    """
    if sys.platform != "linux":
        return None
    libc = ctypes.CDLL(None, use_errno=True)
    parent = os.getpid()
    pr_set_pdeathsig = 1

    def hook() -> None:
        libc.prctl(pr_set_pdeathsig, int(signal.SIGTERM), 0, 0, 0)
        if os.getppid() != parent:  # the parent died before prctl took effect
            os._exit(1)

    return hook


def announce_ready() -> None:
    """In a child started by :class:`Children`: tell the parent this process is ready (once; elsewhere nothing)."""
    fd = os.environ.pop(READY_FD_ENV, None)
    if not fd:
        return
    try:
        os.write(int(fd), b"ready\n")
        os.close(int(fd))
    except OSError:  # the parent is gone: PDEATHSIG stops this process
        log.warning("children.ready_unsent", exc_info=True)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class _Child:
    index: int
    proc: asyncio.subprocess.Process | None = None
    started_at: float = 0.0
    backoff: float = MIN_BACKOFF_S
    restarts: int = 0


@dataclass
class Children:
    """``count`` copies of ``python -m module`` with ``env`` over this process's environment (``env(i)`` for copy
    i); ``what`` names them in logs and metrics. With ``serve_metrics`` each copy serves ``/metrics`` on a local
    port of its own (:meth:`pages`, for the parent's page: shared/runtime/prom.py ``WithChildren``), labelled
    ``<label><i>``."""

    module: str
    count: int
    env: Callable[[int], dict[str, str]]
    what: str
    label: str = "child"
    serve_metrics: bool = False
    metrics: Metrics | None = None
    grace_s: float = 15.0
    ready_timeout_s: float = 120.0
    requests: SharedCount | None = None  # inherited by every copy (its descriptor: priority.SharedCount)
    _children: list[_Child] = field(default_factory=list)
    _pages: dict[str, str] = field(default_factory=dict)
    _stopping: asyncio.Event = field(default_factory=asyncio.Event)

    def pages(self) -> dict[str, str]:
        """Process label -> ``/metrics`` URL of each copy (a copy that is restarted gets a new port)."""
        return dict(self._pages)

    async def start(self) -> None:
        """Spawn every copy and wait until each says it is ready; RuntimeError when one exits first or is not
        ready within ``ready_timeout_s`` (it is then killed)."""
        self._children = [_Child(i) for i in range(self.count)]
        await asyncio.gather(*(self._spawn(c) for c in self._children))

    async def _spawn(self, child: _Child) -> None:
        env = {**os.environ, **self.env(child.index)}
        if self.serve_metrics:
            port = _free_port()
            env.update(METRICS_PORT=str(port), METRICS_HOST="127.0.0.1", PROMETHEUS_DISABLE_CREATED_SERIES="true")
            self._pages[f"{self.label}{child.index}"] = f"http://127.0.0.1:{port}/metrics"
        child.started_at = time.monotonic()
        read_end, write_end = os.pipe()
        try:
            child.proc = await asyncio.create_subprocess_exec(
                sys.executable, "-m", self.module, stdin=asyncio.subprocess.DEVNULL,
                env={**env, READY_FD_ENV: str(write_end)},
                pass_fds=(write_end,) if self.requests is None else (write_end, self.requests.fd),
                preexec_fn=parent_death_hook())
        except BaseException:
            os.close(read_end)
            raise
        finally:
            os.close(write_end)  # the child holds its own: end of file here once it exits
        log.info("children.started", what=self.what, index=child.index, pid=child.proc.pid)
        line = await self._ready_line(read_end)
        if not line.startswith(b"ready"):
            if child.proc.returncode is None:  # not ready in time, or we are stopping: it goes
                with contextlib.suppress(ProcessLookupError):
                    child.proc.kill()
            code = await child.proc.wait()
            raise RuntimeError(f"{self.what} {child.index} not ready (exit code {code}, "
                               f"{time.monotonic() - child.started_at:.1f}s after its start)")
        log.info("children.ready", what=self.what, index=child.index, pid=child.proc.pid,
                 seconds=round(time.monotonic() - child.started_at, 2))

    async def _ready_line(self, fd: int) -> bytes:
        """The child's line on the readiness pipe: b"" when it exits first, when ``ready_timeout_s`` passes, or when
        the copies are being stopped (read on the event loop: no thread waits on a child that never answers)."""
        loop = asyncio.get_running_loop()
        reader = asyncio.StreamReader()
        transport, _ = await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader),
                                                    os.fdopen(fd, "rb", buffering=0))
        line = asyncio.ensure_future(reader.readline())
        stopping = asyncio.ensure_future(self._stopping.wait())
        try:
            await asyncio.wait({line, stopping}, timeout=self.ready_timeout_s, return_when=asyncio.FIRST_COMPLETED)
            return line.result() if line.done() and not line.cancelled() else b""
        finally:
            line.cancel()
            stopping.cancel()
            transport.close()

    async def watch(self, stop: asyncio.Event) -> None:
        """Until ``stop``: a copy that exits is started again after a back-off (1 s, doubling up to 30 s, back to 1 s
        once a copy ran for a minute), and counted (``<what>.restarts``). When ``stop`` is set, every copy gets
        SIGTERM at once, so that they drain beside this process (:meth:`stop` then waits for them)."""
        try:
            while not stop.is_set():
                waits = {asyncio.ensure_future(c.proc.wait()): c for c in self._children if c.proc is not None}
                stopped = asyncio.ensure_future(stop.wait())
                done, _ = await asyncio.wait({*waits, stopped}, return_when=asyncio.FIRST_COMPLETED)
                for task in (*waits, stopped):
                    if task not in done:
                        task.cancel()
                for task in done:
                    child = waits.get(task)
                    if child is not None and not stop.is_set():
                        await self._restart(child, task.result(), stop)
        finally:
            self.terminate()

    async def _restart(self, child: _Child, code: int, stop: asyncio.Event) -> None:
        ran = time.monotonic() - child.started_at
        if ran > 60:
            child.backoff = MIN_BACKOFF_S
        wait, child.backoff = child.backoff, min(child.backoff * 2, MAX_BACKOFF_S)
        child.restarts += 1
        if self.metrics is not None:
            self.metrics.incr(f"{self.what}.restarts")
        log.error("children.exited", what=self.what, index=child.index, code=code, ran_s=round(ran, 1),
                  restart_in_s=wait)
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), wait)
        if stop.is_set():
            return
        try:
            await self._spawn(child)
        except (OSError, RuntimeError) as exc:  # watched again: it is retried after a longer back-off
            log.error("children.restart_failed", what=self.what, index=child.index, error=str(exc))

    def terminate(self) -> None:
        """SIGTERM to every copy still running (they drain and exit), and no copy is started or waited for again."""
        self._stopping.set()
        for c in self._children:
            if c.proc is not None and c.proc.returncode is None:
                with contextlib.suppress(ProcessLookupError):
                    c.proc.send_signal(signal.SIGTERM)

    async def stop(self) -> None:
        """:meth:`terminate`, then wait ``grace_s`` for the copies to drain; SIGKILL what is left."""
        self.terminate()
        running = [c.proc for c in self._children if c.proc is not None and c.proc.returncode is None]
        try:
            await asyncio.wait_for(asyncio.gather(*(p.wait() for p in running)), self.grace_s)
        except TimeoutError:
            for proc in running:
                if proc.returncode is None:
                    log.error("children.killed", what=self.what, pid=proc.pid, grace_s=self.grace_s)
                    with contextlib.suppress(ProcessLookupError):
                        proc.kill()
            await asyncio.gather(*(p.wait() for p in running))
