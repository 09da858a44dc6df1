"""The bench's CPU meter (mesh/bench_cpu.py): a process's tree, its children included, and nothing else."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest

from mesh.bench_cpu import CpuMeter, _named, _processes, _tree

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")

BURN = "import time\nt = time.process_time()\nwhile time.process_time() - t < {s}: pass\n"


def test_a_tree_sums_a_process_its_descendants_and_what_they_reaped_only() -> None:
    # pid: (parent, own seconds, reaped children's seconds, command)
    table = {1: (0, 1.0, 0.0, "a"), 2: (1, 2.0, 0.5, "b"), 3: (2, 4.0, 0.0, "c"), 4: (1, 8.0, 0.0, "d"),
             5: (0, 16.0, 0.0, "e")}
    assert _tree(table, [2]) == 6.5
    assert _tree(table, [1]) == 15.5
    assert _tree(table, [2, 4]) == 14.5
    assert _tree(table, [99]) == 0.0  # gone: nothing
    assert _named(table, 3, "c") and not _named(table, 3, "postgres") and not _named(table, 99, "c")


def test_a_running_tree_is_measured_while_it_burns() -> None:
    """A parent that only waits for its child, which burns CPU: the parent's label gets the child's time; the
    bench's own row (this process alone, asleep) does not; each CPU second is counted once."""
    parent = subprocess.Popen([sys.executable, "-c", "import subprocess, sys; subprocess.run([sys.executable, '-c', "
                               + repr(BURN.format(s=5)) + "])"], start_new_session=True)
    try:
        meter = CpuMeter(trees={"svc": [parent.pid]}, alone={"bench": os.getpid()})
        deadline = time.monotonic() + 10
        while not any(row[0] == parent.pid for row in _processes().values()):  # the child is up
            assert time.monotonic() < deadline, "the child never started"
            time.sleep(0.01)
        meter.start()
        started = time.perf_counter()
        time.sleep(0.5)
        seconds = time.perf_counter() - started
        out = meter.stop(seconds, units=10)
    finally:
        os.killpg(parent.pid, signal.SIGKILL)  # the child too
        parent.wait()
    cores, children = out["cores"], out["of_which_children"]
    assert cores["svc"] > 0.3, out  # the grandchild's burn, through its parent's tree (one core at most)
    assert cores["svc"] < 1.2, out  # not counted twice (tree and children)
    assert children["svc.children"] == pytest.approx(cores["svc"], abs=0.05), out  # the parent itself only waits
    assert cores["bench"] < 0.3, out  # this process slept
    assert out["cpu_ms_per_turn"]["svc"] == pytest.approx(cores["svc"] * seconds * 100, rel=0.02)


def test_a_child_that_ended_meanwhile_is_counted_through_its_parent() -> None:
    """A child alive at the start that burns and exits before the end: its time moves to its parent's reaped
    children's time, so the tree's figure stays whole (it went negative when only live processes were summed)."""
    parent = subprocess.Popen([sys.executable, "-c", "import subprocess, sys, time\n"
                               "p = subprocess.Popen([sys.executable, '-c', " + repr(BURN.format(s=0.4)) + "])\n"
                               "p.wait()\ntime.sleep(30)\n"], start_new_session=True)
    try:
        deadline = time.monotonic() + 10
        while not any(row[0] == parent.pid for row in _processes().values()):
            assert time.monotonic() < deadline, "the child never started"
            time.sleep(0.01)
        meter = CpuMeter(trees={"svc": [parent.pid]})
        meter.start()
        started = time.perf_counter()
        while any(row[0] == parent.pid for row in _processes().values()):  # until the child has ended
            assert time.monotonic() < deadline + 10, "the child never ended"
            time.sleep(0.02)
        out = meter.stop(time.perf_counter() - started)
    finally:
        os.killpg(parent.pid, signal.SIGKILL)
        parent.wait()
    assert out["cores"]["svc"] > 0.2, out
