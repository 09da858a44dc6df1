"""Embedding in small forward passes, with a turn for other work between them (shared by ltm's ingest, its
documents, and memory's background embedding of stored messages).

On this kind of CPU (2 cores, measured with the ONNX model) one forward pass over 64 texts costs more per text
than passes over 4-8 texts (about 0.22 ms per token at 4-8 short texts against 0.4 at 64; for long turns 1-4
texts a pass), and a small pass waits little for padding; between passes, ``turn`` lets work that a user waits
for go first (shared/runtime/priority.py).
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Iterable, Sequence
from typing import TypeVar

import numpy as np

from shared.runtime.embedding import Embedder
from shared.runtime.errors import is_transient

T = TypeVar("T")
SALIENCE_TOKENS = 64  # token vectors the salience model reads (services/ltm/salience/infer.py MAX_TOKENS)
MAX_TOKENS = 256  # all-MiniLM-L6-v2 sees no more of a text (sentence-transformers' max_seq_length)


def tokens(text: str) -> int:
    """About how many WordPiece tokens the model reads of ``text`` (4 characters a token, at most 256)."""
    return min(MAX_TOKENS, len(text) // 4 + 2)


def steps(items: Sequence[T], size: Callable[[T], int], budget: int) -> Iterable[list[T]]:
    """``items`` in consecutive runs of at most ``budget`` (by ``size``), each holding at least one item."""
    run: list[T] = []
    used = 0
    for item in items:
        n = size(item)
        if run and used + n > budget:
            yield run
            run, used = [], 0
        run.append(item)
        used += n
    if run:
        yield run


async def embed_in_steps(embedder: Embedder, texts: Sequence[str], budget_tokens: int,
                         turn: Callable[[], Awaitable[None]] | None = None, *, with_tokens: set[str] | None = None,
                         tokens_out: dict[str, np.ndarray] | None = None,
                         failed: dict[str, Exception] | None = None) -> dict[str, np.ndarray]:
    """The vector of every distinct text, in forward passes of at most ``budget_tokens`` padded tokens (texts
    sorted by length, so that a pass pads little); ``turn`` is awaited before each pass (requests first). The
    texts in ``with_tokens`` also get their token vectors in ``tokens_out`` (the same pass: the salience model's).
    With ``failed``, a pass that fails for a text's own sake (not an outage: shared/runtime/errors.py
    ``is_transient``) is run again a text at a time, and the texts that still fail go into ``failed`` (text ->
    error) instead of raising: the others keep their vectors."""
    want = with_tokens or set()
    sink: dict[str, np.ndarray] = tokens_out if tokens_out is not None else {}
    distinct = sorted(set(texts), key=lambda t: (tokens(t), t))
    out: dict[str, np.ndarray] = {}
    run: list[str] = []
    for text in distinct:
        # sorted ascending: the padded size of a pass is its count times its last (longest) text
        if run and (len(run) + 1) * tokens(text) > budget_tokens:
            if turn is not None:
                await turn()
            await _pass(embedder, run, out, want, sink, failed)
            run = []
        run.append(text)
    if run:
        if turn is not None:
            await turn()
        await _pass(embedder, run, out, want, sink, failed)
    return out


async def _pass(embedder: Embedder, run: list[str], out: dict[str, np.ndarray], want: set[str],
                sink: dict[str, np.ndarray], failed: dict[str, Exception] | None = None) -> None:
    if failed is not None:
        try:
            await _pass(embedder, run, out, want, sink)
        except Exception as exc:
            if is_transient(exc):
                raise
            if len(run) == 1:
                failed[run[0]] = exc
                return
            for text in run:
                await _pass(embedder, [text], out, want, sink, failed)
        return
    if want and not want.isdisjoint(run):
        vecs, toks = await embedder.embed_many_with_tokens(run, SALIENCE_TOKENS)
        sink.update((text, tok) for text, tok in zip(run, toks, strict=True) if text in want)
    else:
        vecs = await embedder.embed_many(run)
    for text, vec in zip(run, vecs, strict=True):
        out[text] = vec
