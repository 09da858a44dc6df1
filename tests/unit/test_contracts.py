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


def test_nesting_past_the_limit_is_refused_and_never_raises_past_decode() -> None:
    from shared.contracts.codec import MAX_DEPTH

    def nested(depth: int) -> str:  # a memory update whose meta holds arrays `depth` levels below the message
        arrays = json.loads("[" * (depth - 2) + "]" * (depth - 2))
        return json.dumps({"user_id": "u", "content": "x", "meta": {"k": arrays}})

    assert decode(MEMORY_UPDATE, nested(MAX_DEPTH)).user_id == "u"
    for raw in (nested(MAX_DEPTH + 1), "[" * 5000, '{"a":' * 5000):  # past the limit; past the JSON parser's own
        with pytest.raises(DecodeError) as err:
            decode(MEMORY_UPDATE, raw)
        assert err.value.reason in (DeadLetterReason.INVALID, DeadLetterReason.INVALID_JSON)


def test_a_message_without_id_or_time_is_the_same_message_on_every_delivery() -> None:
    update = '{"user_id": "u", "content": "hello"}'
    ids = {decode(MEMORY_UPDATE, update).message_id, decode(MEMORY_UPDATE, update).message_id,
           decode(MEMORY_UPDATE, update, entry_id="1712345678901-0").message_id}  # the channel's copy, the stream's
    assert len(ids) == 1
    assert decode(MEMORY_UPDATE, update, entry_id="1712345678901-0").timestamp == 1712345678.901
    timed = '{"user_id": "u", "content": "hello", "timestamp": 1712345678.5}'
    assert decode(MEMORY_UPDATE, timed, entry_id="1712345678901-0").timestamp == 1712345678.5
    assert decode(MEMORY_UPDATE, timed).message_id not in ids  # a time given is part of what the message is
    said = '{"user_id": "u", "session_id": "s", "content": "hi"}'
    first, again = (decode(USER_INPUT, said, entry_id="1712345678901-0") for _ in range(2))
    assert (first.message_id, first.timestamp) == (again.message_id, again.timestamp)
    assert first.timestamp == 1712345678.901


def test_reply_keys_of_two_users_never_meet_whatever_their_ids_hold() -> None:
    from fnmatch import fnmatchcase

    from shared.runtime.erase import glob_escape

    names = Names().with_prefix("p:")
    assert names.reply_dedup("a", "b:c", "done") != names.reply_dedup("a:b", "c", "done")
    pattern = glob_escape(names.reply_dedup("org")) + ":*"  # what deleting user "org" removes
    assert fnmatchcase(names.reply_dedup("org", "m1", "done"), pattern)
    assert not fnmatchcase(names.reply_dedup("org:alice", "m1", "done"), pattern)
    assert fnmatchcase(names.reply_dedup("org:alice", "m1", "done"), names.reply_dedup_all())


def test_hostile_json_in_a_stream_or_list_is_not_anyones_and_never_expired() -> None:
    from shared.runtime.erase import _Matcher
    from shared.runtime.requests import _expired

    for junk in ("[" * 5000, '{"user_id":' * 5000):
        assert not _Matcher("u", ["s"]).owns(junk)
        assert not _expired(junk)


def test_a_truncated_dead_letter_still_names_its_user_for_a_deletion() -> None:
    from shared.runtime.deadletter import KEEP_BYTES, dead_letter_fields
    from shared.runtime.erase import _Matcher

    # a doc_add whose client put user_id after a text longer than what a dead letter keeps
    raw = json.dumps({"request_id": "r", "type": "doc_add", "data": {"source": "a.md", "text": "x" * (KEEP_BYTES + 10)},
                      "user_id": "u-big"})
    fields = dead_letter_fields(raw, "too_large", "over the limit")
    assert "u-big" not in fields["data"] and fields["user_id"] == "u-big"
    assert _Matcher("u-big", []).named_in(fields) and not _Matcher("u-other", []).named_in(fields)
    assert "user_id" not in dead_letter_fields(json.dumps({"user_id": "u"}), "invalid", "short")  # data holds it
