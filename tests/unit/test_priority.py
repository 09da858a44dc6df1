"""Requests first (shared/runtime/priority.py): background work waits while a request is served, never longer
than its bound, and not at all when nothing is served."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from shared.runtime.metrics import Metrics
from shared.runtime.priority import Foreground, SharedCount


async def test_background_waits_for_requests_in_flight_but_never_longer_than_its_bound() -> None:
    fg = Foreground(0.3, Metrics())
    await fg.turn()  # nothing served: at once
    assert fg.metrics is not None and fg.metrics.get("background.yielded") == 0

    async def request(seconds: float) -> None:
        with fg.serving():
            await asyncio.sleep(seconds)

    short = asyncio.create_task(request(0.1))
    await asyncio.sleep(0)
    started = time.perf_counter()
    await fg.turn()  # waits for the short request to finish
    assert time.perf_counter() - started >= 0.05 and short.done()  # order, not speed

    long = asyncio.create_task(request(2.0))
    await asyncio.sleep(0)
    started = time.perf_counter()
    await fg.turn()  # a long request: background gets its turn after the bound anyway
    assert time.perf_counter() - started >= 0.29 and not long.done()
    assert fg.metrics is not None and fg.metrics.get("background.yield_expired") == 1
    long.cancel()
    await asyncio.gather(long, return_exceptions=True)
    assert not fg.busy  # a cancelled request leaves the count right


async def test_off_when_the_bound_is_zero() -> None:
    fg = Foreground(0.0, Metrics())
    with fg.serving():
        await fg.turn()
    assert fg.metrics is not None and fg.metrics.get("background.yielded") == 0


_PROBE = """
import json, os, threading
from shared.runtime.priority import lower_process_priority
started = threading.Event(); release = threading.Event()
t = threading.Thread(target=lambda: (started.set(), release.wait())); t.start(); started.wait()
done = lower_process_priority(5)
later = threading.Thread(target=lambda: print(json.dumps({
    "done": done,
    "threads": {tid: os.getpriority(os.PRIO_PROCESS, int(tid)) for tid in os.listdir("/proc/self/task")},
    "autogroup": open("/proc/self/autogroup").read() if os.path.exists("/proc/self/autogroup") else None})))
later.start(); later.join(); release.set(); t.join()
"""


def _probe(new_session: bool) -> dict[str, object]:
    out = subprocess.run([sys.executable, "-c", _PROBE], capture_output=True, text=True, check=True, timeout=60,
                         start_new_session=new_session, cwd=Path(__file__).resolve().parents[2])
    return json.loads(out.stdout)


@pytest.mark.skipif(sys.platform != "linux", reason="per-thread nice values and autogroups are Linux's")
def test_process_nice_lowers_every_thread_and_the_autogroup_only_of_a_session_leader() -> None:
    want = min(19, os.getpriority(os.PRIO_PROCESS, 0) + 5)  # below where it started (this test's own value)
    led = _probe(new_session=True)  # as the stack and the bench start a service
    assert set(led["threads"].values()) == {want}, led  # threads before it, and one started after
    if led["autogroup"] is not None:  # a kernel with autogroup scheduling: its nice is the group's
        assert "autogroup" in led["done"] and led["autogroup"].split("nice")[1].strip() == str(want), led
    inside = _probe(new_session=False)  # started from a shell (this test's session): never its autogroup
    assert set(inside["threads"].values()) == {want} and "autogroup" not in inside["done"], inside


async def test_a_child_steps_aside_while_its_parent_serves_requests_but_never_longer_than_its_bound() -> None:
    count = SharedCount()
    parent = Foreground(1.0, publish=count)
    child = Foreground(0.3, Metrics(), parent=SharedCount(count.fd))  # the same page, as a child maps it
    await child.turn()  # the parent serves nothing: at once
    assert child.metrics is not None and child.metrics.get("background.yielded") == 0

    async def request(seconds: float) -> None:
        with parent.serving():
            await asyncio.sleep(seconds)

    short = asyncio.create_task(request(0.1))
    await asyncio.sleep(0)
    assert count.get() == 1 and child.busy
    await child.turn()  # waits for the parent's request to end
    assert short.done() and count.get() == 0 and child.metrics.get("background.yield_expired") == 0
    long = asyncio.create_task(request(2.0))
    await asyncio.sleep(0)
    started = time.perf_counter()
    await child.turn()  # never longer than its bound
    assert time.perf_counter() - started < 1.0 and not long.done()
    assert child.metrics.get("background.yield_expired") == 1
    long.cancel()


def test_the_count_reaches_a_child_process_through_the_inherited_descriptor() -> None:
    count = SharedCount()
    count.set(3)
    probe = "from shared.runtime.priority import SharedCount; c = SharedCount.inherited(); print(c.get()); c.set(7)"
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True, timeout=60,
                         pass_fds=(count.fd,), env={**os.environ, SharedCount.ENV: str(count.fd)},
                         cwd=Path(__file__).resolve().parents[2])
    assert out.stdout.strip() == "3" and count.get() == 7  # one page, both ways
