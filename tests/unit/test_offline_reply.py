"""The offline responder's reply always fits the bus's content limit, whatever it quotes."""

from __future__ import annotations

import pytest

from services.chat_ai.prompt import prompt_block
from services.chat_ai.responder import ELLIPSIS, clip_utf8, offline_reply
from shared.contracts.messages import DEFAULT_MAX_CONTENT_BYTES, AIResponse
from shared.runtime.stm import Stm, Turn

EMPTY = prompt_block([], [], 1500, 200)


def size(text: str) -> int:
    return len(text.encode("utf-8"))


def answer(text: str) -> AIResponse:
    """What chat_ai sends: the AIResponse enforces the limit (a ValidationError was a turn never answered)."""
    return AIResponse(message_id="r", in_reply_to="m", session_id="s", content=text)


def test_clip_utf8_cuts_on_a_character_boundary_with_an_ellipsis() -> None:
    assert clip_utf8("short", 10) == "short"
    for text in ("a" * 50, "é" * 50, "日本語" * 20, "🙂" * 20, "a日🙂é" * 20):
        for limit in range(3, 40):
            clipped = clip_utf8(text, limit)
            assert size(clipped) <= limit and clipped.endswith(ELLIPSIS)
            assert text.startswith(clipped.removesuffix(ELLIPSIS))  # whole characters of the start only
    assert clip_utf8("日本語", 3) == ELLIPSIS and clip_utf8("日本語", 2) == ""


def test_an_input_near_the_limit_gets_an_answer_within_it() -> None:
    text = "日本語🙂é" * 2180  # 32,700 bytes, under 32 KiB: the bus took it
    assert size(text) == 32_700 <= DEFAULT_MAX_CONTENT_BYTES
    reply = offline_reply(text, EMPTY, Stm())
    assert size(reply.text) <= DEFAULT_MAX_CONTENT_BYTES
    answer(reply.text)
    assert reply.text.endswith(f'{ELLIPSIS}"') and 'You just said: "日本語🙂é' in reply.text
    ascii_text = "x" * 32_700
    assert size(answer(offline_reply(ascii_text, EMPTY, Stm()).text).content) <= DEFAULT_MAX_CONTENT_BYTES


def test_two_long_messages_in_a_row_both_quoted_within_the_limit() -> None:
    first, second = "Первое сообщение. " * 510, "第二条消息。" * 950  # about 17 KB each
    assert 16_000 < size(first) < 32_768 and 16_000 < size(second) < 32_768
    stm = Stm(turns=[Turn("m1", "user", first, 1.0), Turn("m2", "user", second, 2.0)], summary="s" * 20_000,
              exists=True)
    reply = offline_reply(second, EMPTY, stm, "m2")
    answer(reply.text)
    lines = reply.text.split("\n")
    assert lines[-2].startswith('Your last message before this one was: "Первое сообщение.')
    assert lines[-1].startswith('You just said: "第二条消息。') and lines[-1].endswith(f'{ELLIPSIS}"')
    # the quotes share the room: neither squeezes the other out
    assert size(lines[-2]) > 8_000 and size(lines[-1]) > 8_000


@pytest.mark.parametrize("limit", [2048, 200, 64, 10])
def test_a_smaller_configured_limit_is_kept_too(limit: int) -> None:
    stm = Stm(turns=[Turn("m1", "user", "é" * 3000, 1.0)], exists=True)
    reply = offline_reply("ü" * 3000, EMPTY, stm, "m2", max_bytes=limit)
    assert size(reply.text) <= limit


def test_a_short_reply_is_unchanged() -> None:
    stm = Stm(turns=[Turn("m1", "user", "I like tea.", 1.0)], exists=True)
    reply = offline_reply("Hello there", EMPTY, stm, "m2")
    assert reply.text.endswith('Your last message before this one was: "I like tea."\nYou just said: "Hello there"')
    assert ELLIPSIS not in reply.text
