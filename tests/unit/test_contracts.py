"""The contract package: names, env overrides, decoding into typed errors."""

from __future__ import annotations

import json

import pytest

from shared.contracts import (
    LTM_REQUEST,
    MEMORY_UPDATE,
    USER_INPUT,
    DeadLetterReason,
    DecodeError,
    Names,
    SearchRequest,
    decode,
)
from shared.contracts.names import env_var_names


def test_every_name_can_be_renamed_from_the_environment() -> None:
    env = {var: f"custom_{var.lower()}" for var in Names.ENV}
    names = Names.from_env({**env, "MESH_KEY_PREFIX": "p:"})
    assert names.user_input == "p:custom_user_input_stream"
    assert names.ltm_requests == "p:custom_ltm_requests_queue"
    assert names.memory_group == "custom_memory_group"
    assert Names.dead(names.user_input) == "p:custom_user_input_stream:dead"
    assert set(env_var_names()) == {*Names.ENV, "MESH_KEY_PREFIX"}


def test_defaults_are_the_contracts_names() -> None:
    n = Names.from_env({})
    assert (n.user_input, n.ai_responses, n.memory_updates, n.memory_updates_pubsub, n.ltm_requests,
            n.ltm_responses) == ("user_input_queue", "ai_responses", "memory_updates", "memory_updates",
                                 "ltm_requests", "ltm_responses")
    assert (n.memory_group, n.chat_group, n.ltm_group) == ("memory", "chat-ai", "ltm")


def test_search_request_decodes_with_defaults() -> None:
    req = decode(LTM_REQUEST, json.dumps({"request_id": "r", "type": "search", "user_id": "u",
                                          "data": {"query": "q"}, "extra": 1}))
    assert isinstance(req, SearchRequest) and req.data.limit == 5 and req.reply_to is None


@pytest.mark.parametrize(("raw", "reason", "request_id"), [
    (b"\xff", DeadLetterReason.INVALID_JSON, None),
    ("[1]", DeadLetterReason.INVALID, None),
    (json.dumps({"request_id": "r1", "type": "nope", "user_id": "u"}), DeadLetterReason.UNKNOWN_TYPE, "r1"),
    (json.dumps({"request_id": "r2", "type": "search", "data": {"query": "q"}}), DeadLetterReason.INVALID, "r2"),
    (json.dumps({"request_id": "r3", "type": "search", "user_id": "u", "data": {"query": "é" * 20000}}),
     DeadLetterReason.TOO_LARGE, "r3"),
    (json.dumps({"request_id": "r4", "pad": "x" * 200_000}), DeadLetterReason.TOO_LARGE, "r4"),
])
def test_bad_requests_become_typed_errors_that_keep_the_request_id(raw: str | bytes, reason: DeadLetterReason,
                                                                    request_id: str | None) -> None:
    with pytest.raises(DecodeError) as info:
        decode(LTM_REQUEST, raw)
    assert info.value.reason is reason
    assert info.value.request_id == request_id
    assert "é" not in info.value.message  # errors never carry the content


@pytest.mark.parametrize("when", [1.7e12, float("nan"), float("inf"), -1.0, 32_503_680_000.0])
def test_a_timestamp_that_is_not_epoch_seconds_is_refused_at_the_edge(when: float) -> None:
    """Milliseconds (or NaN, infinity, before 1970, after 2999) fail decoding with a clear error, in every message
    that carries a time: not a date conversion deep in a consumer, in a batch with other users' updates."""
    raws = {
        USER_INPUT: {"session_id": "s", "content": "hi", "timestamp": when},
        MEMORY_UPDATE: {"user_id": "u", "content": "hi", "timestamp": when},
        LTM_REQUEST: {"request_id": "r", "type": "search", "user_id": "u", "data": {"query": "q", "now": when}},
    }
    for adapter, raw in raws.items():
        with pytest.raises(DecodeError) as info:
            decode(adapter, json.dumps(raw))  # json.dumps writes NaN and Infinity, as a hostile sender may
        assert info.value.reason is DeadLetterReason.INVALID
        assert "timestamp" in info.value.message or "now" in info.value.message
    ok = decode(USER_INPUT, json.dumps({"session_id": "s", "content": "hi", "timestamp": 1_765_000_000.5}))
    assert ok.timestamp == 1_765_000_000.5


def test_size_limit_is_configurable() -> None:
    raw = json.dumps({"session_id": "s", "content": "x" * 100})
    assert decode(USER_INPUT, raw).content == "x" * 100
    with pytest.raises(DecodeError) as info:
        decode(USER_INPUT, raw, max_content_bytes=50)
    assert info.value.reason is DeadLetterReason.TOO_LARGE


def test_memory_update_without_message_id_gets_a_deterministic_one() -> None:
    raw = json.dumps({"user_id": "u1", "content": "text", "source": "user", "timestamp": 1712345678,
                      "meta": {"session_id": "s1"}})
    first, second = decode(MEMORY_UPDATE, raw), decode(MEMORY_UPDATE, raw)
    assert first.message_id == second.message_id
    other = decode(MEMORY_UPDATE, raw.replace("text", "other"))
    assert other.message_id != first.message_id


def test_user_input_without_message_id_is_stable_per_stream_entry() -> None:
    raw = json.dumps({"session_id": "s", "content": "hi"})
    a = decode(USER_INPUT, raw, entry_id="1-0")
    b = decode(USER_INPUT, raw, entry_id="1-0")
    c = decode(USER_INPUT, raw, entry_id="2-0")
    assert a.message_id == b.message_id != c.message_id
    assert a.user_id is None  # allowed: stored and answered, no long-term memory
