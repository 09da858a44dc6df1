"""The ONNX Runtime embedder gives sentence-transformers' vectors, without importing torch."""

from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pytest

from shared.runtime.embedding import DIM, SyncEmbedder, max_seq_length
from shared.runtime.onnx_export import REPO

LONG = ("On Saturday we drove up to the lake, rented a canoe and paddled to the far shore, where my sister "
        "found a heron's nest and we ate the sandwiches Mum had packed. ") * 12  # ~400 tokens
TEXTS = [
    "", " ", "\n\t ", "a", "?!", "ok", "I", "hello world",
    "My favourite colour is teal and I live in Lisbon.",
    "  leading and trailing spaces  ",
    "Ünïcödé café naïve façade — “quotes” and \u2018apostrophes\u2019",
    "日本語のテキストと中文文本", "مرحبا بالعالم", "emoji 🤖🎉👍🏽 and zero\u200bwidth",
    "\uff26\uff35\uff2c\uff2c width",
    "x\x00y\x07z",
    "word " * 300,
    LONG,
    "tail " * 254 + "beyond the limit",
]


@pytest.fixture(scope="module")
def onnx_model(sync_embedder: SyncEmbedder) -> SyncEmbedder:
    return sync_embedder if sync_embedder.backend == "onnx" else SyncEmbedder(backend="onnx")


@pytest.fixture(scope="module")
def torch_model() -> SyncEmbedder:
    return SyncEmbedder(backend="torch")


def assert_same(a: np.ndarray, b: np.ndarray) -> None:
    assert a.shape == b.shape
    cos = (a * b).sum(axis=1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))
    assert cos.min() >= 0.9999, f"lowest cosine {cos.min()} at {int(cos.argmin())}"
    assert float(np.abs(a - b).max()) < 1e-4


def test_onnx_vectors_are_sentence_transformers_vectors(onnx_model: SyncEmbedder, torch_model: SyncEmbedder) -> None:
    got, want = onnx_model.encode(TEXTS), torch_model.encode(TEXTS)
    assert got.dtype == np.float32 and got.shape == (len(TEXTS), DIM)
    assert np.allclose(np.linalg.norm(got, axis=1), 1.0, atol=1e-5)
    assert_same(got, want)
    # one text at a time: no padding at all
    assert_same(np.vstack([onnx_model.encode([t]) for t in TEXTS]), want)


def test_truncation_is_sentence_transformers_max_seq_length(onnx_model: SyncEmbedder,
                                                             torch_model: SyncEmbedder) -> None:
    assert max_seq_length() == 256
    assert torch_model.model.model.max_seq_length == 256  # type: ignore[union-attr]
    tokenizer = onnx_model.model.tokenizer  # type: ignore[union-attr]
    assert len(tokenizer.encode(LONG).ids) == 256
    assert len(tokenizer.encode("word " * 200).ids) == 202  # [CLS] + 200 + [SEP], not the file's 128
    # what lies past token 254 changes nothing, on either backend
    same_head = ["tail " * 254 + "beyond the limit", "tail " * 254 + "something else entirely"]
    for model in (onnx_model, torch_model):
        a, b = model.encode(same_head)
        assert np.array_equal(a, b) or float(np.abs(a - b).max()) < 1e-6
    shorter = ["tail " * 200 + "beyond the limit", "tail " * 200 + "something else entirely"]
    a, b = onnx_model.encode(shorter)
    assert float(a @ b) < 0.9999


def test_length_sorted_batches_come_back_in_order(onnx_model: SyncEmbedder) -> None:
    mixed = [LONG, "a", "word " * 40, "", "hello world", LONG[:300], "ok"] * 3
    batched = onnx_model.encode(mixed, batch_size=4)  # several batches, each of similar lengths
    one_by_one = np.vstack([onnx_model.encode([t]) for t in mixed])
    assert_same(batched, one_by_one)
    assert onnx_model.encode([]).shape == (0, DIM)


def test_an_unknown_backend_is_refused() -> None:
    with pytest.raises(ValueError, match="EMBEDDING_BACKEND"):
        SyncEmbedder(backend="tensorflow")


def test_the_default_runtime_path_imports_no_torch() -> None:
    code = ("import sys; from shared.runtime.embedding import shared_model; m = shared_model(); m.encode(['x']); "
            "heavy = sorted({n.split('.')[0] for n in sys.modules} & {'torch', 'sentence_transformers', "
            "'transformers', 'onnx'}); print(m.backend, heavy)")
    env = {k: v for k, v in os.environ.items() if not k.startswith("EMBEDDING_")}
    done = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=120, check=False)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip().splitlines()[-1] == "onnx []"
