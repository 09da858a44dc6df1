"""The one decode entry point: raw bytes in, a typed message or a typed error out."""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any, TypeVar

from pydantic import BaseModel, TypeAdapter, ValidationError

from shared.contracts.errors import DeadLetterReason, DecodeError
from shared.contracts.messages import (
    DEFAULT_MAX_CONTENT_BYTES,
    AIResponse,
    LTMRequest,
    LTMResponse,
    LtmWarm,
    MemoryUpdate,
    UserInput,
)

T = TypeVar("T")

# Field name that carries the JSON in a stream entry: XADD <stream> * data '<json>'
STREAM_FIELD = "data"

USER_INPUT: TypeAdapter[UserInput] = TypeAdapter(UserInput)
AI_RESPONSE: TypeAdapter[AIResponse] = TypeAdapter(AIResponse)
MEMORY_UPDATE: TypeAdapter[MemoryUpdate] = TypeAdapter(MemoryUpdate)
LTM_REQUEST: TypeAdapter[LTMRequest] = TypeAdapter(LTMRequest)
LTM_RESPONSE: TypeAdapter[LTMResponse] = TypeAdapter(LTMResponse)
LTM_WARM: TypeAdapter[LtmWarm] = TypeAdapter(LtmWarm)


def payload_limit(max_content_bytes: int) -> int:
    """Whole-message limit: the text limit plus room for ids, meta and JSON escaping."""
    return 2 * max_content_bytes + 16 * 1024


def _describe(err: ValidationError) -> str:
    """Field paths and messages only: never the offending input (it may be user content)."""
    parts = []
    for e in err.errors(include_input=False, include_url=False)[:5]:
        loc = ".".join(str(p) for p in e["loc"]) or "<message>"
        parts.append(f"{loc}: {e['msg']}")
    return "; ".join(parts)


def _str_or_none(obj: dict[str, Any], key: str) -> str | None:
    """An id to answer with, if it can be sent back at all (a lone surrogate cannot be encoded)."""
    value = obj.get(key)
    if not isinstance(value, str) or not value or "\x00" in value:
        return None
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        return None
    return value


MAX_DEPTH = 64
"""Deepest nesting of arrays and objects a message may have (the parser takes about 1,000, but pydantic cannot
encode past 255: a deeper value stored from one message would make every later reply that carries it fail)."""


def _unsendable(obj: Any) -> str | None:
    """Why a string in the message cannot be stored or sent on (NUL: PostgreSQL text refuses it; a lone UTF-16
    surrogate: not UTF-8), keys included, or why its shape cannot (nested deeper than :data:`MAX_DEPTH`); None when
    every string is fine."""
    stack: list[tuple[Any, int]] = [(obj, 0)]
    while stack:
        item, depth = stack.pop()
        if isinstance(item, dict | list):
            if depth >= MAX_DEPTH:
                return f"message is nested deeper than {MAX_DEPTH} levels"
            if isinstance(item, dict):
                stack.extend((k, depth) for k in item)
                stack.extend((v, depth + 1) for v in item.values())
            else:
                stack.extend((v, depth + 1) for v in item)
        elif isinstance(item, str):
            if "\x00" in item:
                return "text contains NUL (U+0000)"
            try:
                item.encode("utf-8")
            except UnicodeEncodeError:
                return "text contains a lone UTF-16 surrogate (not UTF-8)"
    return None


def decode(
    adapter: TypeAdapter[T],
    raw: bytes | str | None,
    *,
    max_content_bytes: int = DEFAULT_MAX_CONTENT_BYTES,
    entry_id: str | None = None,
    max_payload_bytes: int | None = None,
    context: Mapping[str, Any] | None = None,
) -> T:
    """Decode ``raw`` with ``adapter`` or raise :class:`DecodeError` naming what is wrong.

    The error carries ``request_id`` / ``reply_to`` / ``user_id`` when they were
    readable, so a consumer can still send an error reply. ``max_payload_bytes`` raises the
    whole-message limit (default :func:`payload_limit`) for batches; texts keep ``max_content_bytes``.
    ``context`` adds validation context (``max_document_bytes``: the limit of doc_add's text).
    """
    if raw is None:
        raise DecodeError(DeadLetterReason.INVALID, f"no '{STREAM_FIELD}' field in the message")
    size = len(raw) if isinstance(raw, bytes) else len(raw.encode("utf-8"))
    limit = max(max_payload_bytes or 0, payload_limit(max_content_bytes))
    oversize = size > limit
    try:
        obj = json.loads(raw) if size <= 8 * limit else None
    except RecursionError:
        raise DecodeError(DeadLetterReason.INVALID_JSON, "message is nested too deeply") from None
    except (ValueError, UnicodeDecodeError):
        raise DecodeError(DeadLetterReason.INVALID_JSON, "message is not valid UTF-8 JSON") from None
    ids: dict[str, str | None] = {}
    if isinstance(obj, dict):
        ids = {k: _str_or_none(obj, k) for k in ("request_id", "reply_to", "user_id")}
    if oversize:
        raise DecodeError(DeadLetterReason.TOO_LARGE, f"message is {size} bytes, over the limit of {limit}", **ids)
    if not isinstance(obj, dict):
        raise DecodeError(DeadLetterReason.INVALID, "message must be a JSON object")
    bad = _unsendable(obj)
    if bad:
        raise DecodeError(DeadLetterReason.INVALID, bad, **ids)
    try:
        return adapter.validate_python(obj, context={**(context or {}), "max_content_bytes": max_content_bytes,
                                                     "entry_id": entry_id})
    except ValidationError as err:
        errors = err.errors(include_input=False, include_url=False)
        if any(e["type"] == "union_tag_invalid" for e in errors):
            unknown = str(obj.get("type"))[:64]
            raise DecodeError(DeadLetterReason.UNKNOWN_TYPE, f"unknown type {unknown!r}", **ids) from None
        if any("over the limit" in e["msg"] for e in errors):
            raise DecodeError(DeadLetterReason.TOO_LARGE, _describe(err), **ids) from None
        raise DecodeError(DeadLetterReason.INVALID, _describe(err), **ids) from None


def encode(message: BaseModel) -> str:
    return message.model_dump_json()
