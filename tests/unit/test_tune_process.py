"""A service process's interpreter settings (shared/runtime/runner.py tune_process)."""

from __future__ import annotations

import sys

import numpy as np
from threadpoolctl import threadpool_info, threadpool_limits

from shared.runtime.runner import tune_process
from shared.runtime.settings import MeshSettings


def test_switch_interval_and_one_blas_thread() -> None:
    before = sys.getswitchinterval()
    with threadpool_limits(limits=None):  # (the process's BLAS threads come back after the test)
        try:
            tune_process(MeshSettings(gil_switch_ms=2.0))
            assert abs(sys.getswitchinterval() - 0.002) < 1e-9
            blas = [p for p in threadpool_info() if p["user_api"] == "blas"]
            assert blas and all(p["num_threads"] == 1 for p in blas), blas
            vectors, query = np.ones((100, 8), np.float32), np.ones(8, np.float32)
            assert float((vectors @ query)[0]) == 8.0
        finally:
            sys.setswitchinterval(before)
    assert MeshSettings().gil_switch_ms == 1.0
