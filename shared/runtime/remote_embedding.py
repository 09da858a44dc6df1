"""Embeddings from an OpenAI-compatible ``/v1/embeddings`` endpoint (``EMBEDDING_MODEL`` other than the local
all-MiniLM-L6-v2): OpenAI's ``text-embedding-3-small``, or a vLLM, Ollama or TEI server speaking the same API.

The vector size comes from the model: known OpenAI models by name, any other by embedding one probe text at
start-up (``EMBEDDING_DIM`` overrides both, and is sent as ``dimensions`` to the models that can shorten their
vectors). Vectors are L2-normalised here as the local model's are, so cosine scores mean the same. A network
error, a timeout, 429 or 5xx is a :class:`TransientError` (the stream consumer retries the message in place);
any other refusal (401, 400 for a bad model name) is not, and says what the server answered.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from shared.runtime.errors import TransientError
from shared.runtime.logging import get_logger

log = get_logger(__name__)

KNOWN_DIMS = {"text-embedding-3-small": 1536, "text-embedding-3-large": 3072, "text-embedding-ada-002": 1536}
SHORTENABLE = ("text-embedding-3-",)  # models that take ``dimensions``


class RemoteEmbeddingModel:
    def __init__(self, model: str, *, api_key: str | None, base_url: str | None, dim: int | None = None,
                 timeout_s: float = 30.0, batch_size: int = 256) -> None:
        from openai import OpenAI

        self.name = model
        self.batch_size = batch_size
        self._client = OpenAI(api_key=api_key or "not-needed", base_url=base_url, timeout=timeout_s, max_retries=2)
        self._dimensions = dim if dim and model.startswith(SHORTENABLE) else None
        self.dim = dim or KNOWN_DIMS.get(model) or int(self._call(["dimension probe"]).shape[1])
        log.info("embedding.remote", model=model, dim=self.dim, base_url=base_url or "api.openai.com")

    def encode(self, texts: list[str], batch_size: int) -> np.ndarray:
        out = np.empty((len(texts), self.dim), dtype=np.float32)
        step = max(1, min(batch_size, self.batch_size))
        for start in range(0, len(texts), step):
            vecs = self._call(texts[start:start + step])
            if vecs.shape != (min(step, len(texts) - start), self.dim):
                raise ValueError(f"embedding server returned vectors of shape {vecs.shape}, expected "
                                 f"{self.dim} values for each of {min(step, len(texts) - start)} texts")
            out[start:start + step] = vecs
        return out

    def _call(self, texts: list[str]) -> np.ndarray:
        import openai

        extra: dict[str, Any] = {"dimensions": self._dimensions} if self._dimensions else {}
        try:
            resp = self._client.embeddings.create(model=self.name, input=[t or " " for t in texts], **extra)
        except (openai.APIConnectionError, openai.APITimeoutError, openai.RateLimitError,
                openai.InternalServerError) as exc:
            raise TransientError(f"embedding server unavailable: {type(exc).__name__}: {exc}") from exc
        except openai.APIStatusError as exc:
            raise ValueError(f"embedding server refused ({exc.status_code}): {exc.message}") from exc
        rows = sorted(resp.data, key=lambda d: d.index)
        vecs = np.asarray([r.embedding for r in rows], dtype=np.float32)
        norms = np.clip(np.linalg.norm(vecs, axis=1, keepdims=True), 1e-12, None)
        return vecs / norms


__all__ = ["KNOWN_DIMS", "RemoteEmbeddingModel"]
