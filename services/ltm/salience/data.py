"""Training data for the salience model: labelled sessions from the LoCoMo and LongMemEval dev splits.

A turn is labelled 1 when a question needs it later: LoCoMo's ``qa[].evidence`` dia_ids (malformed ones such as
``"D:11:26"`` parsed as mesh.eval_locomo does), LongMemEval's ``has_answer`` turns. Turns are written as the
evaluations ingest them (LoCoMo ``"<speaker>: <text>"``, LongMemEval the raw content, assistant turns flagged);
LoCoMo's training sessions also once more without the speaker prefix (the product ingests a turn's raw text).

Validation is held out **by conversation / question**: LoCoMo ``conv-43``, and 20% of the LongMemEval questions
(seeded); a haystack session that a held-out question samples is dropped from training (LongMemEval's haystacks
share sessions). LongMemEval haystacks are large: per question, its evidence sessions and ``OTHER_SESSIONS``
others, drawn with the seed.

Embeddings (sentence vector and the first MAX_TOKENS token vectors, float16) are cached under
``.data/salience/`` by text.
"""

from __future__ import annotations

import hashlib
import json
import random
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from services.ltm.salience.infer import DIM, MAX_TOKENS

LOCOMO_HELD_OUT = ("conv-43",)
LME_HELD_OUT = 0.2
OTHER_SESSIONS = 4
CACHE_DIR = Path(".data/salience")


@dataclass(slots=True)
class Session:
    key: str
    source: str  # locomo | longmemeval
    split: str  # train | val
    texts: list[str] = field(default_factory=list)
    assistant: list[bool] = field(default_factory=list)
    labels: list[int] = field(default_factory=list)


def _is_locomo(path: Path) -> bool:
    with path.open(encoding="utf-8") as f:
        head = f.read(4096)
    return '"conversation"' in head or '"sample_id"' in head


def locomo_sessions(path: Path) -> list[Session]:
    from mesh.eval_locomo import load

    out: dict[str, Session] = {}
    for conv in load(path):
        needed = {d for q in conv.questions for d in q.evidence}
        split = "val" if conv.sample_id in LOCOMO_HELD_OUT else "train"
        for t in conv.turns:
            s = out.setdefault(t.session_id, Session(t.session_id, "locomo", split))
            s.texts.append(t.content)
            s.assistant.append(False)
            s.labels.append(int(t.dia_id in needed))
            if split == "train":  # also without the "<speaker>: " prefix: the product ingests raw turns
                raw = out.setdefault(t.session_id + "#raw", Session(t.session_id + "#raw", "locomo", split))
                raw.texts.append(t.content[len(t.speaker) + 2:] if t.content.startswith(t.speaker + ": ")
                                 else t.content)
                raw.assistant.append(False)
                raw.labels.append(int(t.dia_id in needed))
    return list(out.values())


def held_out_questions(ids: list[str], seed: int) -> set[str]:
    """The LongMemEval question ids held out for validation (LME_HELD_OUT of them, drawn with the seed)."""
    ids = sorted(ids)
    order = list(range(len(ids)))
    random.Random(seed).shuffle(order)
    return {ids[i] for i in order[: round(LME_HELD_OUT * len(ids))]}


def longmemeval_sessions(path: Path, seed: int) -> list[Session]:
    from mesh.eval_longmemeval import load

    questions = sorted(load(path), key=lambda q: q.question_id)
    val = held_out_questions([q.question_id for q in questions], seed)
    picked: dict[str, tuple[str, list[tuple[str, bool, bool]]]] = {}  # session id -> (split, turns)
    val_sessions: set[str] = set()
    for q in questions:
        by_session: dict[str, list[tuple[str, bool, bool]]] = {}
        for t in q.turns:
            by_session.setdefault(t.session_id, []).append((t.content, t.role == "assistant", t.has_answer))
        evidence = [s for s, turns in by_session.items() if any(h for _, _, h in turns) or s in q.answer_sessions]
        others = sorted(set(by_session) - set(evidence))
        chosen = evidence + random.Random(f"{seed}:{q.question_id}").sample(others, min(OTHER_SESSIONS, len(others)))
        split = "val" if q.question_id in val else "train"
        for sid in chosen:
            if split == "val":
                val_sessions.add(sid)
            old = picked.get(sid)
            turns = by_session[sid]
            if old is not None:  # the same session in two haystacks: needed if either question needs a turn
                turns = [(a, r, h or h2) for (a, r, h), (_, _, h2) in zip(turns, old[1], strict=False)]
            picked[sid] = ("val" if split == "val" or (old and old[0] == "val") else "train", turns)
    out = []
    for sid, (split, turns) in picked.items():
        if split == "train" and sid in val_sessions:
            split = "val"
        s = Session(f"lme:{sid}", "longmemeval", split)
        for text, assistant, label in turns:
            s.texts.append(text)
            s.assistant.append(assistant)
            s.labels.append(int(label))
        out.append(s)
    return out


def load_sessions(paths: list[Path], seed: int) -> list[Session]:
    out: list[Session] = []
    for p in paths:
        out.extend(locomo_sessions(p) if _is_locomo(p) else longmemeval_sessions(p, seed))
    return out


class Embeddings:
    """Sentence vectors and token matrices by text, computed once and cached on disk."""

    def __init__(self, cache_dir: Path = CACHE_DIR) -> None:
        self.path = cache_dir / f"embeddings-t{MAX_TOKENS}.npz"
        self.sent: dict[str, np.ndarray] = {}
        self.tokens: dict[str, np.ndarray] = {}
        self.seconds = 0.0
        self.computed = 0
        if self.path.exists():
            with np.load(self.path) as f:
                keys, sent, offs, toks = f["keys"], f["sent"], f["offsets"], f["tokens"]
            for i, k in enumerate(keys):
                self.sent[str(k)] = sent[i]
                self.tokens[str(k)] = toks[offs[i]:offs[i + 1]]

    @staticmethod
    def key(text: str) -> str:
        return hashlib.sha1(text.encode("utf-8", "surrogatepass")).hexdigest()

    def ensure(self, texts: list[str]) -> None:
        missing = list(dict.fromkeys(t for t in texts if self.key(t) not in self.sent))
        if not missing:
            return
        from tqdm import tqdm

        from shared.runtime.embedding import SyncEmbedder

        model = SyncEmbedder(threads=1, backend="onnx")
        started = time.perf_counter()
        for i in tqdm(range(0, len(missing), 64), desc="embedding", unit="batch"):
            chunk = missing[i:i + 64]
            sent, toks = model.encode_with_tokens(chunk, batch_size=16, max_tokens=MAX_TOKENS)
            for text, s, t in zip(chunk, sent, toks, strict=True):
                self.sent[self.key(text)] = s
                self.tokens[self.key(text)] = t.astype(np.float16)
        self.seconds += time.perf_counter() - started
        self.computed += len(missing)
        self.save()

    def save(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        keys = list(self.sent)
        offs = np.zeros(len(keys) + 1, np.int64)
        offs[1:] = np.cumsum([len(self.tokens[k]) for k in keys])
        toks = np.concatenate([self.tokens[k] for k in keys]) if keys else np.zeros((0, DIM), np.float16)
        tmp = self.path.with_suffix(".tmp.npz")
        np.savez(tmp, keys=np.array(keys), sent=np.stack([self.sent[k] for k in keys]), offsets=offs, tokens=toks)
        tmp.replace(self.path)

    def of(self, text: str) -> tuple[np.ndarray, np.ndarray]:
        k = self.key(text)
        return self.sent[k], self.tokens[k]


def summary(sessions: list[Session]) -> dict[str, dict[str, int]]:
    out: dict[str, dict[str, int]] = {}
    for s in sessions:
        row = out.setdefault(f"{s.source}/{s.split}", {"sessions": 0, "turns": 0, "positive": 0})
        row["sessions"] += 1
        row["turns"] += len(s.texts)
        row["positive"] += sum(s.labels)
    return out


def dump_split(sessions: list[Session], paths: list[Path], seed: int, path: Path) -> None:
    """What was held out: the LoCoMo conversations, the LongMemEval question ids, every validation session."""
    from mesh.eval_longmemeval import load

    questions = sorted(held_out_questions([q.question_id for q in load(p)], seed) for p in paths if not _is_locomo(p))
    path.write_text(json.dumps({"locomo_conversations": list(LOCOMO_HELD_OUT),
                                "longmemeval_questions": sorted(q for qs in questions for q in qs),
                                "val_sessions": sorted(s.key for s in sessions if s.split == "val")}, indent=0))
