"""The salience model's forward pass in numpy (what ltm runs at ingest; torch is never imported here).

The model (trained by :mod:`services.ltm.salience.train`, the same pass in torch in
:mod:`services.ltm.salience.model`) reads, per turn of a session, in order:

- the turn's all-MiniLM-L6-v2 **token vectors** (the first ``MAX_TOKENS``, before mean pooling), pooled by
  learned attention: ``a_i = v . tanh(W_a t_i + b_a)``, ``pooled = sum softmax(a)_i t_i``, L2-normalised;
- the turn's **sentence vector** ``s`` and the **previous turn's** ``p`` (zeros at the start of a session), their
  cosine, whether an assistant said it, and ``log1p(tokens) / 5``;
- projected ``u = tanh(W_in x + b_in)``, then one step of an **LSTM cell written out gate by gate**:
  ``i = sig(W_i u + U_i h + b_i)``, ``f = sig(W_f u + U_f h + b_f)``, ``g = tanh(W_g u + U_g h + b_g)``,
  ``o = sig(W_o u + U_o h + b_o)``, ``c' = f c + i g``, ``h' = o tanh(c')``, the state carried to the session's
  next turn;
- salience ``sigmoid(w_y . [h', u] + b_y)``: how likely the turn is to be needed later.

The *next* turn is not an input (it does not exist yet when a turn is ingested).
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import numpy as np

from shared.runtime.passes import tokens

DIM = 384
MAX_TOKENS = 64  # token vectors read per turn (the rest of a long turn is in its sentence vector)
EXTRA = 3  # cosine(s, p), is_assistant, log1p(tokens) / 5
WEIGHTS = Path(__file__).with_name("weights.npz")
NAMES = ("att_w", "att_b", "att_v", "in_w", "in_b", "w_x", "w_h", "b", "out_w", "out_b")


def _sigmoid(x: np.ndarray) -> np.ndarray:
    return 0.5 * (np.tanh(0.5 * x) + 1.0)  # no overflow warnings for large |x|


@dataclass(slots=True)
class State:
    """What a session carries from one turn to the next."""

    h: np.ndarray
    c: np.ndarray
    prev: np.ndarray  # the previous turn's sentence vector


class TextTurn(NamedTuple):
    """A turn as the services hold it: its session's key (user and session), its text, whether an assistant said it."""

    session: str
    content: str
    assistant: bool


def session_key(user_id: str | None, session_id: str | None) -> str:
    """TextTurn.session: one key for a user's session wherever a score is computed (ltm's ingest, memory's STM and
    the salience memory carries to ltm must key a session alike to give the same scores)."""
    return f"{user_id or ''}\x00{session_id or ''}"


class SalienceModel:
    """Weights (float32 arrays; gates stacked i, f, g, o in ``w_x`` (input, 4H) and ``w_h`` (H, 4H))."""

    def __init__(self, weights: dict[str, np.ndarray]) -> None:
        self.p = {k: np.asarray(weights[k], dtype=np.float32) for k in NAMES}
        self.hidden = int(self.p["w_h"].shape[0])

    @classmethod
    def load(cls, path: Path | str = WEIGHTS) -> SalienceModel:
        with np.load(path) as f:
            return cls({k: f[k] for k in NAMES})

    def zero(self) -> State:
        z = np.zeros(self.hidden, np.float32)
        return State(z, z.copy(), np.zeros(DIM, np.float32))

    def pool(self, tokens: Sequence[np.ndarray]) -> np.ndarray:
        """Attention pooling of each turn's token matrix, one matmul over the batch's tokens."""
        p = self.p
        mats = [np.asarray(t[:MAX_TOKENS], np.float32) for t in tokens]
        lengths = [len(m) for m in mats]
        flat = np.concatenate(mats) if mats else np.zeros((0, DIM), np.float32)
        scores = np.tanh(flat @ p["att_w"] + p["att_b"]) @ p["att_v"]
        out = np.zeros((len(mats), DIM), np.float32)
        start = 0
        for j, n in enumerate(lengths):
            if n:
                a = scores[start:start + n]
                w = np.exp(a - a.max())
                v = (w / w.sum()) @ flat[start:start + n]
                out[j] = v / max(float(np.linalg.norm(v)), 1e-12)
            start += n
        return out

    def features(self, pooled: np.ndarray, sent: np.ndarray, prev: np.ndarray, assistant: np.ndarray,
                 n_tokens: np.ndarray) -> np.ndarray:
        cos = np.einsum("ij,ij->i", sent, prev)[:, None]
        extra = np.stack([np.asarray(assistant, np.float32), np.log1p(np.asarray(n_tokens, np.float32)) / 5.0], 1)
        x = np.concatenate([pooled, sent, prev, cos, extra], axis=1).astype(np.float32)
        return np.tanh(x @ self.p["in_w"] + self.p["in_b"])

    def step(self, u: np.ndarray, h: np.ndarray, c: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """One LSTM step for a batch of sessions: rows of ``u``, ``h``, ``c``; returns (salience, h', c')."""
        p, n = self.p, self.hidden
        z = u @ p["w_x"] + h @ p["w_h"] + p["b"]
        i, f = _sigmoid(z[:, :n]), _sigmoid(z[:, n:2 * n])
        g, o = np.tanh(z[:, 2 * n:3 * n]), _sigmoid(z[:, 3 * n:])
        c2 = f * c + i * g
        h2 = o * np.tanh(c2)
        y = _sigmoid(np.concatenate([h2, u], axis=1) @ p["out_w"] + p["out_b"])
        return y[:, 0], h2, c2

    def score(self, sessions: Sequence[str], sent: np.ndarray, tokens: Sequence[np.ndarray],
              assistant: Sequence[bool], states: SessionStates, n_tokens: Sequence[int] | None = None) -> np.ndarray:
        """Salience of a batch of turns in arrival order; turns of one session in order, each session from the
        state ``states`` holds for it (zero when unseen), which is updated. Sessions are stepped side by side.
        ``n_tokens``: the turns' token counts when ``tokens`` holds a stand-in (default: the matrices' rows)."""
        k = len(sessions)
        out = np.zeros(k, np.float32)
        if not k:
            return out
        sent = np.asarray(sent, np.float32)
        pooled = self.pool(tokens)
        n_tok = np.array([min(len(t), MAX_TOKENS) for t in tokens] if n_tokens is None else n_tokens, np.float32)
        order: OrderedDict[str, list[int]] = OrderedDict()
        for j, s in enumerate(sessions):
            order.setdefault(s, []).append(j)
        live = {s: states.get(s) or self.zero() for s in order}
        for depth in range(max(len(v) for v in order.values())):
            rows = [(s, v[depth]) for s, v in order.items() if depth < len(v)]
            idx = [j for _, j in rows]
            prev = np.stack([live[s].prev for s, _ in rows])
            u = self.features(pooled[idx], sent[idx], prev, np.array([assistant[j] for j in idx], np.float32),
                              n_tok[idx])
            y, h, c = self.step(u, np.stack([live[s].h for s, _ in rows]), np.stack([live[s].c for s, _ in rows]))
            out[idx] = y
            for r, (s, j) in enumerate(rows):
                live[s] = State(h[r], c[r], sent[j])
        for s, st in live.items():
            states.put(s, st)
        return out

    def score_texts(self, turns: Sequence[TextTurn], vectors: Mapping[str, np.ndarray],
                    token_vectors: Mapping[str, np.ndarray], states: SessionStates) -> list[float]:
        """:meth:`score` for turns given as text, their vectors keyed by it (ltm's ingest, memory's background
        pass). A turn without token vectors (its vector came from a cache) has its sentence vector stand in, as in
        training, with its estimated token count."""
        toks = [token_vectors.get(t.content) for t in turns]
        return [float(x) for x in self.score(
            [t.session for t in turns], np.stack([vectors[t.content] for t in turns]),
            [m if m is not None else vectors[t.content][None, :] for m, t in zip(toks, turns, strict=True)],
            [t.assistant for t in turns], states,
            n_tokens=[len(m) if m is not None else min(tokens(t.content), MAX_TOKENS)
                      for m, t in zip(toks, turns, strict=True)])]


class SessionStates:
    """A bounded LRU of per-session states (hidden, cell, previous turn vector), in one ltm process."""

    def __init__(self, size: int) -> None:
        self.size = size
        self._states: OrderedDict[str, State] = OrderedDict()

    def get(self, session: str) -> State | None:
        st = self._states.get(session)
        if st is not None:
            self._states.move_to_end(session)
        return st

    def put(self, session: str, state: State) -> None:
        self._states[session] = state
        self._states.move_to_end(session)
        while len(self._states) > self.size:
            self._states.popitem(last=False)

    def clear(self) -> None:
        self._states.clear()

    def drop_users(self, user_ids: Iterable[str]) -> int:
        """Forget the sessions of these users (keyed by :func:`session_key`); how many states went."""
        prefixes = tuple(session_key(u, None) for u in user_ids)
        gone = [k for k in self._states if k.startswith(prefixes)] if prefixes else []
        for k in gone:
            del self._states[k]
        return len(gone)

    def __len__(self) -> int:
        return len(self._states)
