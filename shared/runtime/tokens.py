"""The all-MiniLM-L6-v2 WordPiece tokenizer, the mesh's one unit of text size (budgets, counts).

Read from the ``tokenizer.json`` packaged with the embedding model, with no padding and no truncation (the file
itself truncates at 128 for the embedder, which would under-count long text); special tokens are not counted.
"""

from __future__ import annotations

from functools import cache
from typing import Any


@cache
def wordpiece() -> Any:
    """The process's one tokenizer (``tokenizers.Tokenizer``)."""
    from tokenizers import Tokenizer

    from shared.runtime.embedding import model_dir

    tok = Tokenizer.from_file(f"{model_dir()}/tokenizer.json")
    tok.no_padding()
    tok.no_truncation()
    return tok


def count_tokens(text: str) -> int:
    """WordPiece tokens of ``text``, special tokens not counted."""
    return len(wordpiece().encode(text, add_special_tokens=False).ids) if text else 0
