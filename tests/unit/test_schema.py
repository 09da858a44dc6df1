"""docs/schema/ is what the models generate, and it says what the codec does: the contract's own examples
pass both, broken messages fail both, and what the mesh emits matches its published schema."""

from __future__ import annotations

import json
from typing import Any

import jsonschema
import pytest

from shared.contracts import AIResponse, ErrorInfo, LTMResponse, Memory, MemorySource, decode, encode
from shared.contracts import schema as wire
from shared.contracts.messages import DocAdded, DocDeleted, DocPassage, DocSearchResult

GOOD: list[tuple[str, dict[str, Any]]] = [
    ("user_input", {"message_id": "m1", "user_id": "u1", "session_id": "s1", "content": "hi", "timestamp": 1.0,
                    "meta": {}}),
    ("user_input", {"session_id": "s1", "content": "no user id (backward compatible)"}),
    ("memory_update", {"user_id": "u1", "content": "text", "source": "user", "timestamp": 1712345678,
                       "meta": {"session_id": "s1", "message_id": "m1"}}),
    ("ltm_request", {"request_id": "r1", "type": "search", "user_id": "u1", "data": {"query": "pets", "limit": 5}}),
    ("ltm_request", {"request_id": "r2", "type": "add", "user_id": "u1",
                     "data": {"content": "likes tea", "type": "preference", "confidence": 0.9}}),
    ("ltm_request", {"request_id": "r3", "type": "profile_update", "user_id": "u1", "data": {"profile": {"a": 1}}}),
    ("ltm_request", {"request_id": "r4", "type": "ping", "data": {}}),
    ("memory_request", {"request_id": "r5", "type": "get_messages", "user_id": "u1", "data": {"session_id": "s1"}}),
    ("ltm_warm", {"users": ["u1"]}),
    ("ltm_request", {"request_id": "r6", "type": "doc_add", "user_id": "u1",
                     "data": {"source": "notes/bees.md", "text": "# Bees\n\nBees dance.", "format": "markdown"}}),
    ("ltm_request", {"request_id": "r7", "type": "doc_search", "user_id": "u1",
                     "data": {"query": "dance", "top_k": 3}}),
    ("ltm_request", {"request_id": "r8", "type": "doc_delete", "user_id": "u1", "data": {"doc_id": "d1"}}),
    ("ltm_request", {"request_id": "r9", "type": "doc_delete", "user_id": "u1", "data": {"all": True}}),
]
BAD: list[tuple[str, dict[str, Any]]] = [
    ("user_input", {"user_id": "u1", "content": "no session"}),
    ("memory_update", {"user_id": "u1", "content": "text", "source": "robot", "timestamp": 1}),
    ("ltm_request", {"request_id": "r1", "type": "no_such_type", "user_id": "u1", "data": {}}),
    ("ltm_request", {"request_id": "r1", "type": "search", "user_id": "u1", "data": {"query": "q", "limit": 0}}),
    ("ltm_request", {"request_id": "r1", "type": "search", "data": {"query": "q"}}),
    ("memory_request", {"request_id": "r1", "type": "get_messages", "user_id": "u1", "data": {}}),
    ("ltm_request", {"request_id": "r1", "type": "doc_add", "user_id": "u1", "data": {"source": "a.txt"}}),
    ("ltm_request", {"request_id": "r1", "type": "doc_add", "user_id": "u1",
                     "data": {"source": "a.txt", "text": "x", "format": "pdf"}}),
    ("ltm_request", {"request_id": "r1", "type": "doc_search", "user_id": "u1", "data": {"query": "q", "top_k": 0}}),
]


def _validator(stem: str) -> jsonschema.protocols.Validator:
    doc = json.loads((wire.DIR / f"{stem}.json").read_text(encoding="utf-8"))
    cls = jsonschema.validators.validator_for(doc)
    cls.check_schema(doc)
    return cls(doc)


def test_committed_schema_is_what_the_models_generate() -> None:
    assert wire.stale() == [], "docs/schema is stale: run `python -m mesh schema --write` and commit it"


@pytest.mark.parametrize(("stem", "message"), GOOD, ids=[f"{s}-{i}" for i, (s, _) in enumerate(GOOD)])
def test_valid_messages_pass_the_schema_and_the_codec(stem: str, message: dict[str, Any]) -> None:
    _validator(stem).validate(message)
    decode(wire.MESSAGES[stem][0], json.dumps(message).encode())


@pytest.mark.parametrize(("stem", "message"), BAD, ids=[f"{s}-{i}" for i, (s, _) in enumerate(BAD)])
def test_broken_messages_fail_the_schema_and_the_codec(stem: str, message: dict[str, Any]) -> None:
    assert not _validator(stem).is_valid(message)
    with pytest.raises(Exception):  # noqa: B017 - DecodeError; the point is that both reject it
        decode(wire.MESSAGES[stem][0], json.dumps(message).encode())


def test_what_the_mesh_emits_matches_its_schema() -> None:
    memory = Memory(memory_id="mem1", type="fact", content="Alice has a dog", score=0.8, similarity=0.7,
                    confidence=0.9, created_at=1.0, last_accessed=2.0, access_count=1, entities=["Alice"],
                    source=MemorySource(message_id="m1", session_id="s1", timestamp=1.0))
    _validator("ltm_response").validate(json.loads(encode(LTMResponse(request_id="r1", user_id="u1",
                                                                      memories=[memory]))))
    failure = LTMResponse.failure("r2", ErrorInfo(code="bad_request", message="limit: too large"))
    _validator("ltm_response").validate(json.loads(encode(failure)))
    reply = AIResponse(message_id="a1", in_reply_to="m1", user_id="u1", session_id="s1", content="hello")
    _validator("ai_response").validate(json.loads(encode(reply)))
    passage = DocPassage(doc_id="d1", chunk_id="c1", chunk=0, source="bees.md", title="Bees", heading=["Bees", "Dance"],
                         text="Bees dance.", score=1.2, similarity=0.6)
    _validator("doc_search_result").validate(json.loads(encode(DocSearchResult(passages=[passage]))))
    _validator("doc_added").validate(json.loads(encode(DocAdded(doc_id="d1", source="bees.md", title="Bees",
                                                                format="markdown", chunks=1, status="created"))))
    _validator("doc_deleted").validate(json.loads(encode(DocDeleted(documents=1, chunks=1, doc_ids=["d1"]))))
