"""The bench's CPU meter (mesh/bench_cpu.py): a process's tree, its children included, and nothing else."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest

from mesh.bench_cpu import CpuMeter, _processes, _tree

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")

BURN = "import time\nt = time.process_time()\nwhile time.process_time() - t < {s}: pass\n"


def test_a_tree_sums_a_process_and_its_descendants_only() -> None:
    table = {1: (0, 1.0), 2: (1, 2.0), 3: (2, 4.0), 4: (1, 8.0), 5: (0, 16.0)}
    assert _tree(table, [2]) == 6.0
    assert _tree(table, [1]) == 15.0
    assert _tree(table, [2, 4]) == 14.0
    assert _tree(table, [99]) == 0.0  # gone: nothing


def test_a_running_tree_is_measured_while_it_burns() -> None:
    """A parent that only waits for its child, which burns CPU: the parent's label gets the child's time; the
    bench's own row (this process alone, asleep) does not."""
    parent = subprocess.Popen([sys.executable, "-c", "import subprocess, sys; subprocess.run([sys.executable, '-c', "
                               + repr(BURN.format(s=5)) + "])"], start_new_session=True)
    try:
        meter = CpuMeter(trees={"svc": [parent.pid]}, alone={"bench": os.getpid()})
        deadline = time.monotonic() + 10
        while len([p for p, (pp, _) in _processes().items() if pp == parent.pid]) == 0:  # the child is up
            assert time.monotonic() < deadline, "the child never started"
            time.sleep(0.01)
        meter.start()
        started = time.perf_counter()
        time.sleep(0.5)
        out = meter.stop(time.perf_counter() - started, units=10)
    finally:
        os.killpg(parent.pid, signal.SIGKILL)  # the child too
        parent.wait()
    assert out["cores"]["svc"] > 0.5, out  # the grandchild's burn, through its parent's tree
    assert out["cores"]["bench"] < 0.3, out  # this process slept
    assert out["cpu_ms_per_turn"]["svc"] == pytest.approx(out["cores"]["svc"] * 50, rel=0.05)
    assert out["of_which_children"]["svc.children"] > 0.5, out  # the parent itself only waits
    assert out["cores_total"] == pytest.approx(sum(out["cores"].values()), abs=0.01)  # children counted once
