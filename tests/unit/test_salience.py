"""The salience model: numpy inference == the torch model; the trained weights rank evidence above chit-chat."""

from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pytest

from services.ltm.config import LtmSettings
from services.ltm.native import NativeBackend
from services.ltm.salience.infer import DIM, WEIGHTS, SalienceModel, SessionStates, session_key
from services.ltm.store import LtmStore
from shared.runtime.embedding import Embedder, SyncEmbedder


def _session(rng: np.random.Generator, n: int) -> tuple[np.ndarray, list[np.ndarray], list[bool]]:
    sent = rng.normal(size=(n, DIM)).astype(np.float32)
    sent /= np.linalg.norm(sent, axis=1, keepdims=True)
    tokens = [rng.normal(size=(int(rng.integers(1, 30)), DIM)).astype(np.float32) for _ in range(n)]
    return sent, tokens, [bool(rng.random() < 0.5) for _ in range(n)]


def test_numpy_equals_torch_on_random_inputs() -> None:
    torch = pytest.importorskip("torch")
    from services.ltm.salience.model import Salience

    rng = np.random.default_rng(7)
    model = Salience(seed=3)
    with torch.no_grad():  # weights away from their initial values (a zero bias would hide a mistake)
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    sessions = [_session(rng, n) for n in (5, 3, 8)]
    width, length = max(len(t) for _, ts, _ in sessions for t in ts), max(len(s) for s, _, _ in sessions)
    tok = np.zeros((3, length, width, DIM), np.float32)
    tmask = np.zeros((3, length, width), bool)
    tmask[:, :, 0] = True
    sent = np.zeros((3, length, DIM), np.float32)
    assistant = np.zeros((3, length), np.float32)
    n_tok = np.zeros((3, length), np.float32)
    for i, (s, ts, a) in enumerate(sessions):
        for j, t in enumerate(ts):
            tok[i, j, : len(t)], tmask[i, j, : len(t)] = t, True
            sent[i, j], assistant[i, j], n_tok[i, j] = s[j], a[j], len(t)
    with torch.no_grad():
        expected = torch.sigmoid(model(*(torch.from_numpy(x) for x in (tok, tmask, sent, assistant, n_tok)))).numpy()

    np_model = SalienceModel(model.export())
    states = SessionStates(8)
    # two ingest batches, the sessions' turns interleaved: the state is carried from the first to the second
    got: dict[tuple[int, int], float] = {}
    for part in (slice(0, 2), slice(2, None)):
        order = [(i, j) for j in range(length) for i in range(3) if j < len(sessions[i][0])
                 and j in range(length)[part]]
        scores = np_model.score([f"s{i}" for i, _ in order], np.stack([sessions[i][0][j] for i, j in order]),
                                [sessions[i][1][j] for i, j in order], [sessions[i][2][j] for i, j in order], states)
        got.update({key: float(v) for key, v in zip(order, scores, strict=True)})
    diffs = [abs(got[(i, j)] - float(expected[i, j])) for i in range(3) for j in range(len(sessions[i][0]))]
    assert len(got) == 16 and max(diffs) < 1e-5, max(diffs)


def test_unseen_session_starts_from_zero_and_lru_is_bounded() -> None:
    model = SalienceModel.load()
    rng = np.random.default_rng(1)
    states = SessionStates(2)
    sent, tokens, assistant = _session(rng, 3)
    first = model.score(["a"] * 3, sent, tokens, assistant, states)
    model.score(["b"], sent[:1], tokens[:1], assistant[:1], states)
    model.score(["c"], sent[:1], tokens[:1], assistant[:1], states)
    assert len(states) == 2 and states.get("a") is None  # "a" left first
    again = model.score(["a"] * 3, sent, tokens, assistant, states)  # a zero state again: the same scores
    assert np.allclose(first, again) and ((first >= 0) & (first <= 1)).all()


def test_forgetting_a_user_drops_that_users_session_states_only() -> None:
    """A user's deletion (``forget``, in every ltm process) dropped every session's state: each other session's
    next turn then scored as the first of its session."""
    backend = NativeBackend(LtmStore(None), Embedder(object()), settings=LtmSettings())  # type: ignore[arg-type]
    states, zero = backend._salience_states, SalienceModel.load().zero()
    keys = [session_key(u, s) for u in ("u1", "u2", "u10", "") for s in ("s1", "s2", None)]
    for key in keys:
        states.put(key, zero)
    backend.forget(["u1"])
    assert {k for k in keys if states.get(k) is not None} == {k for k in keys if not k.startswith("u1\x00")}
    assert len(states) == 9  # u2, u10 (not u1's, though "u1" begins it) and the anonymous sessions
    backend.forget(["nobody"])
    assert len(states) == 9


def test_memory_forgets_a_deleted_users_session_states_only() -> None:
    """memory's message salience (MEMORY_SALIENCE, the STM summary's scores) cleared every session's state on any
    user's deletion, as ltm did."""
    from services.memory.salience import MessageSalience

    salience = MessageSalience(model=SalienceModel.load())
    zero = salience.model.zero()
    keys = [session_key(u, s) for u in ("u1", "u10", "") for s in ("s1", None)]
    for key in keys:
        salience.states.put(key, zero)
    salience.forget("u1")
    assert {k for k in keys if salience.states.get(k) is not None} == {k for k in keys if not k.startswith("u1\x00")}


def test_trained_model_ranks_evidence_above_chit_chat(sync_embedder: SyncEmbedder) -> None:
    if not sync_embedder.has_tokens:
        pytest.skip("needs the ONNX embedder")
    model = SalienceModel.load()
    sessions = [
        ["Caroline: Hey Mel! Good to see you!", "Melanie: Hi Caroline! How are you doing?",
         "Caroline: I went to an LGBTQ support group yesterday and it was so powerful, I'm going to become a "
         "counselor for transgender kids.",
         "Melanie: Wow, that's great!", "Caroline: Thanks!"],
        ["Jon: Hey Gina, what's up?", "Gina: Not much, you?",
         "Jon: I lost my job as a banker last month, so I'm starting my own dance studio in Boston in June.",
         "Gina: Haha, cool.", "Jon: Bye, talk soon!"],
    ]
    for k, texts in enumerate(sessions):
        sent, tokens = sync_embedder.encode_with_tokens(texts)
        scores = model.score([f"s{k}"] * len(texts), sent, tokens, [False] * len(texts), SessionStates(4))
        evidence = scores[2]
        assert evidence > max(scores[0], scores[1], scores[3], scores[4]), scores


def test_inference_does_not_import_torch() -> None:
    code = ("import sys, numpy as np; from services.ltm.salience.infer import SalienceModel, SessionStates; "
            "m = SalienceModel.load(); m.score(['s'], np.zeros((1, 384), np.float32), [np.zeros((3, 384), "
            "np.float32)], [False], SessionStates(1)); assert 'torch' not in sys.modules")
    subprocess.run([sys.executable, "-c", code], check=True, env={**os.environ, "PYTHONPATH": os.getcwd()})


def test_weights_are_small() -> None:
    assert WEIGHTS.stat().st_size <= 2_000_000
