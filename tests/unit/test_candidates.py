"""The array steps of ranking (services/ltm/candidates.py) against the row-by-row definitions they replaced."""

from __future__ import annotations

import math
import random
from typing import Any

import numpy as np

from services.ltm.candidates import Candidates, gate_columns, neighbour_best


def neighbour_best_by_rows(rows: list[dict[str, Any]], rel: np.ndarray) -> np.ndarray:
    """The definition, one row at a time (retrieval._neighbour_best before it worked on arrays)."""
    slots: dict[tuple[str, float], float] = {}
    for r, v in zip(rows, rel, strict=True):
        if r["source_session_id"] is not None and r["source_timestamp"] is not None:
            key = (r["source_session_id"], float(r["source_timestamp"]))
            slots[key] = max(slots.get(key, -math.inf), float(v))
    ordered = sorted(slots)
    best: dict[tuple[str, float], float] = {}
    for i, key in enumerate(ordered):
        near = [slots[ordered[j]] for j in (i - 1, i + 1) if 0 <= j < len(ordered) and ordered[j][0] == key[0]]
        best[key] = max(near) if near else 0.0
    out = np.zeros(len(rows))
    for i, r in enumerate(rows):
        if r["source_session_id"] is not None and r["source_timestamp"] is not None:
            out[i] = best[(r["source_session_id"], float(r["source_timestamp"]))]
    return out


def random_rows(rng: random.Random, n: int) -> list[dict[str, Any]]:
    rows = []
    for i in range(n):
        rows.append({
            "memory_id": f"m{i}",
            "source_session_id": rng.choice([None, "s1", "s2", "s3", "a-much-longer-session-id"]),
            "source_timestamp": rng.choice([None, *(1_700_000_000.0 + 60 * k for k in range(8))]),  # shared times
            "role": rng.choice(["user", "ai", None]), "question": rng.choice([True, False, None]),
            "sim": rng.uniform(-0.2, 0.9), "bm25": rng.choice([0.0, 0.0, rng.uniform(0, 8)]),
            "n": 500.0, "sim_mean": 0.1, "sim_sd": 0.2, "s1": 40.0, "s2": 300.0,
        })
    return rows


def test_the_neighbour_term_on_arrays_is_the_row_by_row_one() -> None:
    rng = random.Random(7)
    for n in (0, 1, 2, 5, 40, 300):
        for _ in range(20):
            rows = random_rows(rng, n)
            rel = np.array([rng.uniform(-3, 3) for _ in rows])
            c = Candidates.of_rows(rows)
            assert np.allclose(neighbour_best(c.session, c.ts, rel), neighbour_best_by_rows(rows, rel)), rows


def test_rows_come_back_as_the_sql_stage_gave_them_and_the_gate_keeps_evidence() -> None:
    rows = random_rows(random.Random(3), 60)
    c = Candidates.of_rows(rows)
    assert c.as_rows() == rows
    assert list(c.ai) == [r["role"] == "ai" for r in rows] and list(c.question) == [bool(r["question"]) for r in rows]
    rel = np.linspace(1, 0, len(rows))
    kept = gate_columns(c.sim, c.bm25, rel, 50, 0.2, None)
    assert kept == [i for i in range(50) if rows[i]["bm25"] > 0 or rows[i]["sim"] >= 0.2]
    assert gate_columns(c.sim, c.bm25, rel, 50, 0.2, 0.5) == [i for i in kept if rows[i]["sim"] >= 0.5]
