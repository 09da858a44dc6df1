"""``python -m mesh eval stm``: which turns the STM's rolling summary keeps, with and without the salience model.

The short-term memory of a session is its last ``STM_MAX_MESSAGES`` turns plus an extractive summary of the older
ones under ``STM_MAX_TOKENS`` (services/memory/summary.py). This replays every dev session turn by turn through the
same :class:`ExtractiveSummariser`, folding each turn as it leaves the window, and counts the **evidence turns**
(LoCoMo ``qa[].evidence``, LongMemEval ``has_answer``: the salience model's labels, services/ltm/salience/data.py)
that had left the window and still have a sentence in the summary: at the session's end, and averaged over every
fold (``during``). ``STM_SALIENCE_WEIGHT`` = 0 is the summariser alone; above 0 each sentence's score is scaled by
its turn's salience (:func:`services.memory.summary.salience_factor`), the score ltm's model gives the turn.

The salience model was trained on these dev splits: only the ``val`` sessions (conv-43 and the held-out
LongMemEval questions, services/ltm/salience/split.json) say anything about data it has not seen; ``train`` is shown
beside them and flatters the model. In-process (no bus): the figure is the summariser's choice, not a service's.
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

DEFAULT_DATA = (Path("../shared/data/locomo/locomo10-dev.json"),
                Path("../shared/data/longmemeval/longmemeval-s-dev.json"))
DEFAULT_WEIGHTS = (0.0, 0.5, 1.0, 2.0, 4.0)


def add_parser(sub: Any) -> None:
    p = sub.add_parser("stm", help="evidence turns the STM summary keeps, with and without salience (in-process)",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", type=Path, nargs="+", default=list(DEFAULT_DATA),
                   help="LoCoMo and/or LongMemEval dev files (default: both in ../shared/data)")
    p.add_argument("--weights", type=float, nargs="+", default=list(DEFAULT_WEIGHTS),
                   help="STM_SALIENCE_WEIGHT values to compare (0: off)")
    p.add_argument("--window", type=int, default=None, help="STM_MAX_MESSAGES (default: the setting's default)")
    p.add_argument("--budget", type=int, default=None, help="STM_MAX_TOKENS (default: the setting's default)")
    p.add_argument("--join", action="store_true",
                   help="replay each LoCoMo conversation as one long session (its sessions in order; the model's "
                        "scores still per session, as ltm computes them); LongMemEval sessions are left out")
    p.add_argument("--out", type=Path, help="write the JSON report here too")


def replay(texts: Sequence[str], assistant: Sequence[bool], labels: Sequence[int], scores: Sequence[float] | None,
           summariser: Any, window: int) -> dict[str, float]:
    """One session through the window and the summary; counts of evidence turns that left the window and kept."""
    from services.memory.summary import SummaryState
    from shared.runtime.stm import Turn

    turns = [Turn(f"m{i}", "ai" if a else "user", t, 1_000.0 + i) for i, (t, a) in enumerate(zip(texts, assistant,
                                                                                                   strict=True))]
    salience = None if scores is None else {t.message_id: float(s) for t, s in zip(turns, scores, strict=True)}
    state = SummaryState()
    out = {"left": 0.0, "kept": 0.0, "during_left": 0.0, "during_kept": 0.0, "tokens": 0.0, "folds": 0.0}
    for i in range(len(turns) - window):
        state = summariser.fold_sync(state, [turns[i]], salience)
        kept_at = {s.timestamp for s in state.sentences}
        left = [j for j in range(i + 1) if labels[j]]
        out["during_left"] += len(left)
        out["during_kept"] += sum(turns[j].timestamp in kept_at for j in left)
        out["tokens"] += state.tokens
        out["folds"] += 1
    gone = max(len(turns) - window, 0)
    kept_at = {s.timestamp for s in state.sentences}
    out["left"] = float(sum(labels[:gone]))
    out["kept"] = float(sum(turns[j].timestamp in kept_at for j in range(gone) if labels[j]))
    return out


def joined(sessions: list[Any], scores: list[np.ndarray]) -> tuple[list[Any], list[np.ndarray]]:
    """LoCoMo's sessions of one conversation (``conv-N:session_M``) as one session, in session order."""
    from services.ltm.salience.data import Session

    out: dict[str, tuple[Any, list[np.ndarray]]] = {}
    order = sorted((s.key.split(":")[0], int(s.key.rsplit("_", 1)[1]), i) for i, s in enumerate(sessions)
                   if s.source == "locomo")
    for conv, _, i in order:
        s = sessions[i]
        whole, parts = out.setdefault(conv, (Session(conv, s.source, s.split), []))
        whole.texts += s.texts
        whole.assistant += s.assistant
        whole.labels += s.labels
        parts.append(scores[i])
    return [w for w, _ in out.values()], [np.concatenate(p) for _, p in out.values()]


def evaluate(data: Sequence[Path], weights: Sequence[float], window: int, budget: int,
             join: bool = False) -> dict[str, Any]:
    from services.ltm.salience.data import Embeddings, load_sessions
    from services.ltm.salience.infer import SalienceModel, SessionStates
    from services.memory.summary import ExtractiveSummariser
    from services.memory.tokens import default_counter

    seed = int(json.loads(Path("services/ltm/salience/train.json").read_text())["seed"])
    sessions = [s for s in load_sessions(list(data), seed) if not s.key.endswith("#raw")]
    emb = Embeddings()
    emb.ensure([t for s in sessions for t in s.texts])
    model = SalienceModel.load()
    scores: list[np.ndarray] = []
    for s in sessions:
        pairs = [emb.of(t) for t in s.texts]
        scores.append(model.score([s.key] * len(s.texts), np.stack([p[0] for p in pairs]),
                                  [p[1].astype(np.float32) for p in pairs], s.assistant, SessionStates(1)))
    if join:
        sessions, scores = joined(sessions, scores)
    counter = default_counter()
    groups: dict[str, Any] = {}
    for w in weights:
        summariser = ExtractiveSummariser(counter, budget, salience_weight=w)
        for s, sc in zip(sessions, scores, strict=True):
            r = replay(s.texts, s.assistant, s.labels, sc.tolist() if w > 0 else None, summariser, window)
            for key in (f"{s.source}/{s.split}", f"all/{s.split}"):
                g = groups.setdefault(f"{w:g}", {}).setdefault(key, {"sessions": 0, **dict.fromkeys(r, 0.0)})
                g["sessions"] += 1
                for k, v in r.items():
                    g[k] += v
    table: dict[str, Any] = {}
    for label, by in groups.items():
        table[label] = {key: {"sessions": g["sessions"], "evidence_left": int(g["left"]),
                              "kept_at_end": round(g["kept"] / g["left"], 4) if g["left"] else None,
                              "kept_during": (round(g["during_kept"] / g["during_left"], 4) if g["during_left"]
                                              else None),
                              "summary_tokens": round(g["tokens"] / g["folds"], 1) if g["folds"] else 0.0}
                        for key, g in sorted(by.items())}
    return {"window": window, "budget": budget, "joined": join, "counter": counter.name, "weights": list(weights),
            "data": [str(d) for d in data], "by_weight": table}


def run(args: argparse.Namespace) -> int:
    from services.memory.config import MemorySettings

    defaults = MemorySettings.model_fields
    window = args.window or int(defaults["stm_max_messages"].default)
    budget = args.budget or int(defaults["stm_max_tokens"].default)
    started = time.perf_counter()
    report = evaluate(args.data, args.weights, window, budget, args.join)
    report["seconds"] = round(time.perf_counter() - started, 1)
    keys = sorted(next(iter(report["by_weight"].values())))
    print(f"window {window} turns, summary {budget} tokens; evidence turns kept in the summary, at the end / during")
    print("weight  " + "  ".join(f"{k:>26}" for k in keys))
    for w, by in report["by_weight"].items():
        cells = [f"{by[k]['kept_at_end'] or 0:.3f} / {by[k]['kept_during'] or 0:.3f} (n={by[k]['evidence_left']})"
                 for k in keys]
        print(f"{w:>6}  " + "  ".join(f"{c:>26}" for c in cells))
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(report, indent=1) + "\n", encoding="utf-8")
    return 0
