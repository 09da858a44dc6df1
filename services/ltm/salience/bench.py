"""``python -m services.ltm.salience.bench``: the salience model's cost per turn at ingest, on one core.

Batches of 64 turns (8 sessions of 8 turns, the default LTM_INGEST_BATCH), each turn with the most token vectors
the model reads (MAX_TOKENS, the worst case), scored with the state carried across batches; prints ms per turn.
"""

from __future__ import annotations

import os

for _var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_var, "1")

import json  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402

import numpy as np  # noqa: E402

from services.ltm.salience.infer import DIM, MAX_TOKENS, SalienceModel, SessionStates  # noqa: E402


def main(batches: int = 50, tokens: int = MAX_TOKENS) -> dict[str, float]:
    rng = np.random.default_rng(0)
    model, states = SalienceModel.load(), SessionStates(10_000)
    sessions = [f"s{i}" for i in range(8) for _ in range(8)]
    sent = rng.normal(size=(64, DIM)).astype(np.float32)
    sent /= np.linalg.norm(sent, axis=1, keepdims=True)
    toks = [rng.normal(size=(tokens, DIM)).astype(np.float32) for _ in range(64)]
    model.score(sessions, sent, toks, [False] * 64, states)  # warm-up
    started = time.perf_counter()
    for _ in range(batches):
        model.score(sessions, sent, toks, [False] * 64, states)
    ms = (time.perf_counter() - started) * 1000 / (batches * 64)
    out = {"ms_per_turn": round(ms, 4), "tokens_per_turn": tokens, "batch": 64, "batches": batches}
    print(json.dumps(out))
    return out


if __name__ == "__main__":
    main(tokens=int(sys.argv[1]) if len(sys.argv) > 1 else MAX_TOKENS)
