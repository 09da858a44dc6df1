"""Requests first: background work of a process (ltm's ingest) steps aside while requests are in flight.

A search waits on the same CPU as ingest's embedding passes and spaCy steps; on a busy mesh that wait is what
makes a chat turn miss its ``LTM_TIMEOUT_MS``. The request server marks each request it serves
(:meth:`Foreground.serving`); background work calls :meth:`Foreground.turn` between its small steps (one
embedding pass, one extraction step, one write), which returns at once when no request is in flight and otherwise
waits until none is, at most ``max_wait_s`` (so ingest never starves: it still gets a step in every
``max_wait_s``). ``max_wait_s`` = 0 turns it off.

That orders work inside one process. Across processes (ltm's ingest against the searches of another ltm process,
memory's embedding of stored messages against ltm's searches, all on the same cores) the kernel decides:
:func:`background_executor` gives background work threads of a lower OS priority (``BACKGROUND_NICE``; on Linux the
nice value is a thread's own), so that under contention a search or a chat turn gets the CPU first and background
work takes what is left; on an idle machine it runs at full speed. It is opt-in (``BACKGROUND_NICE`` defaults to
0, no threads of its own): a niced thread that holds the GIL when the kernel preempts it keeps the process's event
loop waiting too (spaCy and numpy hold the GIL), the risk weighed in docs/operations.md.
"""

from __future__ import annotations

import asyncio
import mmap
import os
import struct
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager

from shared.runtime.metrics import Metrics


class SharedCount:
    """A number one process writes and its children read: the requests a service serves right now, for its worker
    children's :meth:`Foreground.turn` (ltm's ingest child steps aside for its parent's searches). A shared memory
    page of an unlinked temporary file; the child inherits the descriptor (``MESH_FOREGROUND_FD``): no name to
    clean up, gone with the last process that holds it."""

    ENV = "MESH_FOREGROUND_FD"

    def __init__(self, fd: int | None = None) -> None:
        self._file = None
        if fd is None:
            self._file = tempfile.TemporaryFile()  # noqa: SIM115  (kept open: the page lives as long as this)
            os.ftruncate(self._file.fileno(), mmap.PAGESIZE)
            fd = self._file.fileno()
        self.fd = fd
        self._page = mmap.mmap(fd, mmap.PAGESIZE)

    @classmethod
    def inherited(cls) -> SharedCount | None:
        """The parent's count, in a child started with its descriptor (None elsewhere, or when it is unusable)."""
        fd = os.environ.get(cls.ENV)
        if not fd:
            return None
        try:
            return cls(int(fd))
        except (OSError, ValueError):
            return None

    def set(self, n: int) -> None:
        struct.pack_into("q", self._page, 0, n)

    def get(self) -> int:
        return int(struct.unpack_from("q", self._page, 0)[0])


class Foreground:
    """``publish``: the count of requests served here goes to the children too; ``parent``: the count of the
    parent's requests, which background work here waits for as for its own (polled every ``PARENT_POLL_S``)."""

    PARENT_POLL_S = 0.01

    def __init__(self, max_wait_s: float, metrics: Metrics | None = None, *, publish: SharedCount | None = None,
                 parent: SharedCount | None = None) -> None:
        self.max_wait_s = max_wait_s
        self.metrics = metrics
        self.publish, self.parent = publish, parent
        self._serving = 0
        self._idle = asyncio.Event()
        self._idle.set()

    @contextmanager
    def serving(self) -> Iterator[None]:
        self._serving += 1
        self._idle.clear()
        if self.publish is not None:
            self.publish.set(self._serving)
        try:
            yield
        finally:
            self._serving -= 1
            if self.publish is not None:
                self.publish.set(self._serving)
            if self._serving == 0:
                self._idle.set()

    @property
    def busy(self) -> bool:
        return self._serving > 0 or (self.parent is not None and self.parent.get() > 0)

    async def turn(self) -> None:
        """Background work's turn: now if nothing is served (here or by the parent), else when nothing is (at most
        ``max_wait_s``)."""
        if self.max_wait_s <= 0 or not self.busy:
            return
        if self.metrics is not None:
            self.metrics.incr("background.yielded")
        deadline = time.monotonic() + self.max_wait_s
        try:
            await asyncio.wait_for(self._idle.wait(), self.max_wait_s)
            while self.parent is not None and self.parent.get() > 0:
                if time.monotonic() >= deadline:
                    raise TimeoutError
                await asyncio.sleep(self.PARENT_POLL_S)
        except TimeoutError:
            if self.metrics is not None:
                self.metrics.incr("background.yield_expired")


_executors: dict[int, ThreadPoolExecutor] = {}
_executors_lock = threading.Lock()
BACKGROUND_THREADS = 2  # one per core here: an extraction step and an embedding pass side by side


def _lower_priority(nice: int) -> None:
    """Executor thread initializer: this thread's nice value raised by ``nice`` (Linux: per thread; elsewhere
    setpriority would lower the whole process, so nothing is done)."""
    if sys.platform != "linux" or nice <= 0:
        return
    tid = threading.get_native_id()
    try:
        os.setpriority(os.PRIO_PROCESS, tid, min(19, os.getpriority(os.PRIO_PROCESS, tid) + nice))
    except OSError:  # not allowed here (a sandbox): the work still runs, at normal priority
        pass


def lower_process_priority(nice: int) -> list[str]:
    """The whole process ``nice`` below the priority it started at (PROCESS_NICE, at most 19): every thread it has
    (on Linux a nice value is a thread's own; threads started later inherit it), and, when the process leads a
    session of its own, that session's scheduling group (autogroup: with it on, the kernel first shares the CPU
    fairly between sessions, so a thread's nice value alone would order only the threads of one service). What
    was lowered."""
    if nice <= 0 or sys.platform != "linux":
        return []
    done = []
    value = min(19, os.getpriority(os.PRIO_PROCESS, 0) + nice)
    lowered = 0
    for tid in os.listdir("/proc/self/task"):
        try:
            os.setpriority(os.PRIO_PROCESS, int(tid), value)
            lowered += 1
        except OSError:  # the thread ended meanwhile, or not allowed here (a sandbox): it runs as it was
            pass
    if lowered:
        done.append("threads")
    if os.getsid(0) == os.getpid():  # never the autogroup of a shell the process was started from
        try:
            with open("/proc/self/autogroup", "w") as f:
                f.write(str(value))
            done.append("autogroup")
        except OSError:  # no autogroup scheduling in this kernel, or not allowed
            pass
    return done


def background_executor(nice: int) -> ThreadPoolExecutor | None:
    """The process's threads for background work at ``nice`` below normal priority (None when ``nice`` is 0: the
    event loop's default executor)."""
    if nice <= 0:
        return None
    with _executors_lock:
        if nice not in _executors:
            _executors[nice] = ThreadPoolExecutor(BACKGROUND_THREADS, thread_name_prefix=f"background-nice{nice}",
                                                  initializer=_lower_priority, initargs=(nice,))
        return _executors[nice]


__all__ = ["Foreground", "SharedCount", "background_executor", "lower_process_priority"]
