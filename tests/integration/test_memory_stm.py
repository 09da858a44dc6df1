"""Short-term memory on the real servers: window, progressive summary under budget, rehydration after FLUSHALL."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Mapping, Sequence
from dataclasses import replace
from typing import Any

import psycopg
import pytest

from services.memory.config import MemorySettings
from services.memory.service import MemoryService
from services.memory.store import ConversationStore, NotFound, StoredMessage
from services.memory.summary import LlmSummariser, SummaryState
from services.memory.tokens import default_counter
from shared.contracts.memory_api import ImportMessage
from shared.runtime.llm import chat_model
from shared.runtime.stm import Turn, read_stm
from tests.fake_llm import fake_llm
from tests.helpers import Mesh, common, running, wait_until

FACT = "I live in Lisbon and I work as a marine biologist at the Oceanario."
BASE = 1_750_000_000.0


def turn_text(i: int) -> str:
    if i == 0:
        return FACT
    topics = ["the garden", "a trip to Kyoto", "the budget for 2025", "my cat Miso", "the Rust rewrite"]
    return (f"Turn {i}: we talked about {topics[i % len(topics)]} and what to do next week. "
            f"It matters because the deadline is on {1 + i % 28} May. ok.")


async def seed(svc: MemoryService, session_id: str, user_id: str, n: int, start: int = 0) -> None:
    for i in range(start, start + n):
        await svc.api.record(StoredMessage(message_id=f"{session_id}-{i}", session_id=session_id, user_id=user_id,
                                           role="human" if i % 2 == 0 else "ai", content=turn_text(i),
                                           timestamp=BASE + i))
    await svc.stm.drain()  # summary catch-ups run in the background


async def test_window_and_progressive_summary_stay_under_budget(mesh: Mesh) -> None:
    svc = mesh.memory(stm_max_messages=10, stm_max_tokens=200)
    folded: list[tuple[int, int]] = []  # (turns the summary covered before, turns given to this fold)
    summariser = svc.stm.summariser
    original = summariser.fold

    async def recording_fold(state: SummaryState, turns: Sequence[Turn],
                             scores: Mapping[str, float] | None = None) -> SummaryState:
        folded.append((state.turns, len(turns)))
        return await original(state, turns, scores)

    summariser.fold = recording_fold  # type: ignore[method-assign]
    await seed(svc, "s1", "u1", 30)  # seed() waits for the background catch-ups
    await seed(svc, "s1", "u1", 30, start=30)
    stm = await read_stm(mesh.redis, mesh.names, "s1")
    assert [t.message_id for t in stm.turns] == [f"s1-{i}" for i in range(50, 60)]
    assert stm.summary_kind == "extractive" and stm.summary.startswith("Extractive summary of 50 earlier turns")
    assert default_counter().count(stm.summary) <= 200
    assert "Lisbon" in stm.summary  # the salient first-person fact of turn 0 survived 50 folds
    # progressive: each fold starts from the previous summary and is given only turns not folded before
    assert len(folded) >= 2 and sum(n for _, n in folded) == 50
    assert all(before == sum(n for _, n in folded[:i]) for i, (before, _) in enumerate(folded))
    # the durable copy in PostgreSQL matches Redis
    state = await svc.store.load_summary("u1", "s1")
    assert state.text == stm.summary and state.turns == 50 and state.covered_until == BASE + 49
    hash_tokens = await mesh.redis.hget(mesh.names.stm_summary("s1"), "tokens")
    assert int(hash_tokens or 0) == default_counter().count(stm.summary)


async def test_rehydration_after_flushall_of_a_1000_turn_session(mesh: Mesh) -> None:
    svc = mesh.memory()
    await seed(svc, "long", "u1", 1000)
    before = await read_stm(mesh.redis, mesh.names, "long")
    assert len(before.turns) == 15 and before.summary
    await mesh.redis.flushall()
    assert not (await read_stm(mesh.redis, mesh.names, "long")).exists
    started = time.perf_counter()
    info = await svc.api.get_stm("u1", "long")
    elapsed = time.perf_counter() - started
    assert info.rehydrated and elapsed < 0.5, f"rehydration took {elapsed:.3f}s"
    after = await read_stm(mesh.redis, mesh.names, "long")
    assert after.turns == before.turns
    assert after.summary == before.summary and after.summary_kind == "extractive"
    assert [t.message_id for t in info.turns] == [t.message_id for t in before.turns]
    again = await svc.api.get_stm("u1", "long")
    assert not again.rehydrated  # the second access reads Redis


async def test_a_write_after_flushall_rebuilds_first(mesh: Mesh) -> None:
    svc = mesh.memory(stm_max_messages=5)
    await seed(svc, "s", "u1", 30)
    summary_before = (await read_stm(mesh.redis, mesh.names, "s")).summary
    await mesh.redis.flushall()
    await seed(svc, "s", "u1", 1, start=30)
    stm = await read_stm(mesh.redis, mesh.names, "s")
    assert [t.message_id for t in stm.turns] == [f"s-{i}" for i in range(26, 31)]
    assert stm.summary.startswith("Extractive summary of 26 earlier turns")  # 25 before + turn 25 folded now
    assert summary_before.startswith("Extractive summary of 25 earlier turns")


async def test_a_rebuild_that_fails_is_made_again_by_the_retry(mesh: Mesh) -> None:
    """The write that finds no STM adds its turn (and the meta) before rebuilding; a rebuild that fails (PostgreSQL
    gone for a moment) once left that meta, so the retry found an STM and the session's window was that one turn."""
    svc = mesh.memory(stm_max_messages=5)
    await seed(svc, "s", "u1", 10)
    await mesh.redis.flushall()
    original = svc.stm.store.unfolded_turns
    failures = [psycopg.OperationalError("server closed the connection")]

    async def flaky(*args: Any, **kwargs: Any) -> Any:
        if failures:
            raise failures.pop()
        return await original(*args, **kwargs)

    svc.stm.store.unfolded_turns = flaky  # type: ignore[method-assign]
    with pytest.raises(psycopg.OperationalError):
        await seed(svc, "s", "u1", 1, start=10)
    assert not (await read_stm(mesh.redis, mesh.names, "s")).exists  # no STM is taken for the session's
    await seed(svc, "s", "u1", 1, start=10)  # the redelivery
    stm = await read_stm(mesh.redis, mesh.names, "s")
    assert [t.message_id for t in stm.turns] == [f"s-{i}" for i in range(6, 11)]


async def test_a_message_id_used_again_with_other_text_adds_only_what_is_stored(mesh: Mesh) -> None:
    """A duplicate's turn and update are written again (a redelivery after a crash), but as PostgreSQL holds the
    message: a client reusing an id with other text or another session once put text the store never held into
    the STM and on memory_updates (for long-term memory)."""
    from shared.contracts import MEMORY_UPDATE, decode

    svc = mesh.memory()
    first = StoredMessage(message_id="dup-1", session_id="s", user_id="u1", role="human", content="I drink tea.",
                          timestamp=BASE)
    assert await svc.api.record(first)
    assert not await svc.api.record(replace(first, content="I drink coffee."))
    assert not await svc.api.record(replace(first, session_id="s2", content="My PIN is 1234."))
    assert [t.content for t in (await read_stm(mesh.redis, mesh.names, "s")).turns] == ["I drink tea."]
    assert not (await read_stm(mesh.redis, mesh.names, "s2")).turns
    sent = [decode(MEMORY_UPDATE, f[b"data"]).content for _, f in await mesh.redis.xrange(mesh.names.memory_updates)]
    assert sent and set(sent) == {"I drink tea."}, sent
    # a client's retry of the same message with another timestamp: still one member for it in the window
    assert not await svc.api.record(replace(first, timestamp=BASE + 5))
    members = await mesh.redis.zrange(mesh.names.stm_turns("s"), 0, -1)
    assert len(members) == 1, members


async def test_a_write_rebuilding_the_stm_shows_readers_no_window_of_its_turn_alone(mesh: Mesh) -> None:
    """A write that finds the session's STM missing rebuilds it from PostgreSQL: it once marked the STM present
    first, and a reader during the rebuild (or after it failed) took the new turn alone for the session's window."""
    svc = mesh.memory(stm_max_messages=5)
    await seed(svc, "s", "u1", 8)
    await mesh.redis.flushall()
    original, release = svc.stm.store.unfolded_turns, asyncio.Event()
    fail = [psycopg.OperationalError("server closed the connection")]

    async def slow(*args: Any, **kwargs: Any) -> Any:
        await release.wait()
        if fail:
            raise fail.pop()
        return await original(*args, **kwargs)

    svc.stm.store.unfolded_turns = slow  # type: ignore[method-assign]
    for attempt in range(2):  # the first rebuild fails, the retry (the redelivery) succeeds
        release.clear()
        writing = asyncio.create_task(seed(svc, "s", "u1", 1, start=8))

        async def added() -> bool:
            return any(b"s-8" in m for m in await mesh.redis.zrange(mesh.names.stm_turns("s"), 0, -1))

        await wait_until(added, message="the write added its turn")
        stm = await read_stm(mesh.redis, mesh.names, "s")
        assert not stm.exists and not stm.turns, (attempt, stm)
        release.set()
        if attempt == 0:
            with pytest.raises(psycopg.OperationalError):
                await writing
            assert not (await read_stm(mesh.redis, mesh.names, "s")).exists
        else:
            await writing
    stm = await read_stm(mesh.redis, mesh.names, "s")
    assert [t.message_id for t in stm.turns] == [f"s-{i}" for i in range(4, 9)]


async def test_writes_that_wait_for_one_rebuild_do_not_each_rebuild_again(mesh: Mesh) -> None:
    """Writes to a session whose STM is being rebuilt wait for the session's lock: once they have it, the STM is
    there (their turns were added before the rebuild wrote the window) and none of them rebuilds it again."""
    svc = mesh.memory(stm_max_messages=5)
    await seed(svc, "s", "u1", 8)
    await mesh.redis.flushall()
    original_rows, original_add, release = svc.stm.store.unfolded_turns, svc.stm._add, asyncio.Event()
    rebuilds: list[str] = []

    async def slow(*args: Any, **kwargs: Any) -> Any:
        await release.wait()
        return await original_rows(*args, **kwargs)

    async def counting_add(session_id: str, user_id: str | None, turns: Any, rehydrated_at: float | None = None,
                           also: Any = None) -> Any:
        if rehydrated_at is not None:
            rebuilds.append(session_id)
        return await original_add(session_id, user_id, turns, rehydrated_at=rehydrated_at, also=also)

    svc.stm.store.unfolded_turns = slow  # type: ignore[method-assign]
    svc.stm._add = counting_add  # type: ignore[method-assign]
    writes = [asyncio.create_task(svc.api.record(StoredMessage(
        message_id=f"s-{i}", session_id="s", user_id="u1", role="human", content=turn_text(i), timestamp=BASE + i)))
        for i in (8, 9)]

    async def both_added() -> bool:
        return await mesh.redis.zcard(mesh.names.stm_turns("s")) == 2

    await wait_until(both_added, message="both writes added their turns")
    release.set()
    await asyncio.gather(*writes)
    await svc.stm.drain()
    assert rebuilds == ["s"], rebuilds
    stm = await read_stm(mesh.redis, mesh.names, "s")
    assert [t.message_id for t in stm.turns] == [f"s-{i}" for i in range(5, 10)]


async def test_rehydration_folds_turns_that_were_never_summarised(mesh: Mesh) -> None:
    """Messages written straight to PostgreSQL (an import, a lost fold): the rebuild summarises the backlog."""
    svc = mesh.memory(stm_max_messages=5)
    store: ConversationStore = svc.store
    for i in range(40):
        await store.store_message(StoredMessage(message_id=f"imp-{i}", session_id="imp", user_id="u1",
                                                role="human", content=turn_text(i), timestamp=BASE + i))
    info = await svc.api.get_stm("u1", "imp")
    assert info.rehydrated and [t.message_id for t in info.turns] == [f"imp-{i}" for i in range(35, 40)]
    assert info.summary.startswith("Extractive summary of 35 earlier turns") and "Lisbon" in info.summary
    assert info.summary_tokens <= 500
    assert (await store.load_summary("u1", "imp")).turns == 35


async def test_llm_summary_from_an_openai_compatible_server(mesh: Mesh) -> None:
    long_answer = " ".join(f"Sentence {i} of a summary that goes on about Lisbon." for i in range(200))

    def respond(body: dict[str, object]) -> str:
        return "The user lives in Lisbon. " + long_answer

    with fake_llm(respond) as (url, seen):
        llm = chat_model(None, url, "fake-summariser", timeout_s=5)
        settings = MemorySettings(**common(mesh.redis_url, mesh.database_url), stm_max_messages=4, stm_max_tokens=120)
        svc = MemoryService(settings, mesh.names, mesh.redis, ConversationStore(mesh.pool), llm=llm)
        assert isinstance(svc.stm.summariser, LlmSummariser)
        for i in range(6):
            await seed(svc, "s", "u1", 1, start=i)  # one turn at a time: each eviction is its own fold
    stm = await read_stm(mesh.redis, mesh.names, "s")
    assert stm.summary_kind == "llm:fake-summariser"
    assert stm.summary.startswith("The user lives in Lisbon.")
    assert default_counter().count(stm.summary) <= 120  # the model overran; the summary was cut to the budget
    assert len(seen) == 2  # one call per turn that left the window
    prompt = seen[1]["messages"][1]["content"]  # type: ignore[index]
    assert "Current summary:\nThe user lives in Lisbon." in prompt and turn_text(1) in prompt  # progressive


async def test_llm_failure_falls_back_to_extractive_and_says_so(mesh: Mesh) -> None:
    with fake_llm(lambda body: "unused", status=500) as (url, _):
        llm = chat_model(None, url, "broken", timeout_s=5)
        settings = MemorySettings(**common(mesh.redis_url, mesh.database_url), stm_max_messages=4)
        svc = MemoryService(settings, mesh.names, mesh.redis, ConversationStore(mesh.pool), llm=llm)
        await seed(svc, "s", "u1", 6)
    stm = await read_stm(mesh.redis, mesh.names, "s")
    assert stm.summary_kind == "extractive" and "Lisbon" in stm.summary


class PromptRecorder:
    """A chat model that records the prompts it is given (the chat service's LLM seam, not a store)."""

    name = "recorder"

    def __init__(self) -> None:
        self.prompts: list[list[dict[str, str]]] = []

    async def complete(self, messages: list[dict[str, str]], **_: object) -> str:
        self.prompts.append(messages)
        return "noted"


async def test_chat_ai_gets_the_rebuilt_stm_after_flushall(mesh: Mesh) -> None:
    """chat-ai finds no STM and asks memory (get_stm), which rebuilds it from PostgreSQL.

    This memory service does not consume user input (its stream is renamed), so the rebuild the prompt
    shows can only have come from chat-ai's request, not from memory storing the new message first.
    """
    recorder = PromptRecorder()
    memory = mesh.memory(stm_max_messages=4)
    await seed(memory, "s-chat", "u-chat", 12)
    await mesh.redis.flushall()
    server = MemoryService(memory.settings, replace(mesh.names, user_input_stream="not-consumed"), mesh.redis,
                           memory.store)
    chat = mesh.chat(llm=recorder, enable_ltm=False)
    async with running(server), running(chat):
        msg = await mesh.send("What did we talk about?", user_id="u-chat", session_id="s-chat")
        await mesh.reply_to(msg)
    assert chat.metrics.get("stm.rebuilt_by_memory") == 1
    prompt = "\n".join(m["content"] for m in recorder.prompts[-1])
    assert "Summary of the conversation so far:\nExtractive summary of" in prompt
    assert "Lisbon" in prompt  # from the summary: turn 0 left the window long ago
    assert turn_text(11) in prompt  # the newest stored turn, from the rebuilt window
    await mesh.redis.delete(server.names.user_input)  # the renamed stream is this test's own (no bound)


async def test_stm_without_a_session_owner_is_not_served(mesh: Mesh) -> None:
    svc = mesh.memory()
    await svc.api.record(StoredMessage(message_id="anon-1", session_id="anon", user_id=None, role="human",
                                       content="no user here", timestamp=BASE))
    assert len((await read_stm(mesh.redis, mesh.names, "anon")).turns) == 1  # STM is kept for the chat
    with pytest.raises(NotFound):
        await svc.api.get_stm("someone", "anon")


async def test_a_deleted_users_stm_left_behind_is_never_anothers(mesh: Mesh) -> None:
    """A deletion that raced a write can leave a session's STM in Redis after its rows are gone; when another user
    then takes the session id, neither their turn nor a read of theirs shows the deleted user's turns (the write
    once relabelled the STM to the new user, keeping the old turns)."""
    svc = mesh.memory()
    names = mesh.names
    for session, first in (("shared-1", "write"), ("shared-2", "read")):
        old = Turn(f"{session}-old", "human", "my pin is 4417", BASE)
        await mesh.redis.zadd(names.stm_turns(session), {old.member(): old.timestamp})
        await mesh.redis.hset(names.stm_meta(session), mapping={"user_id": "deleted-user"})
        await mesh.redis.hset(names.stm_summary(session), mapping={"text": "the pin is 4417", "tokens": 5})
        for key in (names.stm_turns(session), names.stm_meta(session), names.stm_summary(session)):
            await mesh.redis.expire(key, 3600)
        if first == "write":
            await svc.api.record(StoredMessage(message_id=f"{session}-new", session_id=session, user_id="new-user",
                                               role="human", content="hello", timestamp=BASE + 10))
        else:  # the session's rows are the new user's, its STM keys the old one's
            await svc.store.store_message(StoredMessage(message_id=f"{session}-new", session_id=session,
                                                        user_id="new-user", role="human", content="hello",
                                                        timestamp=BASE + 10))
            info = await svc.api.get_stm("new-user", session)
            assert [t.message_id for t in info.turns] == [f"{session}-new"] and "4417" not in info.summary
        stm = await read_stm(mesh.redis, names, session)
        assert stm.owner == "new-user", first
        assert [t.message_id for t in stm.turns] == [f"{session}-new"], first
        assert "4417" not in stm.summary, first


async def test_concurrent_writers_of_one_session_fold_every_turn_once(mesh: Mesh) -> None:
    """Two services (as two replicas would) write one session at once: indexes stay unique, no turn is lost."""
    first, second = mesh.memory(stm_max_messages=5), mesh.memory(stm_max_messages=5)
    await first.api.create_session("u1", "busy")
    messages = [StoredMessage(message_id=f"busy-{i}", session_id="busy", user_id="u1", role="human",
                              content=turn_text(i), timestamp=BASE + i) for i in range(40)]
    await asyncio.gather(*((first if i % 2 else second).api.record(m) for i, m in enumerate(messages)))
    await first.stm.drain()
    await second.stm.drain()
    indexes = await mesh.count("SELECT count(DISTINCT message_index) FROM conversation_messages"
                               " WHERE session_id = 'busy'")
    assert indexes == 40 and (await first.api.get_session("u1", "busy")).message_count == 40
    stm = await read_stm(mesh.redis, mesh.names, "busy")
    assert [t.message_id for t in stm.turns] == [f"busy-{i}" for i in range(35, 40)]
    state = await first.store.load_summary("u1", "busy")
    assert state.turns == 35 and state.covered_until == BASE + 34
    assert stm.summary == state.text and "Lisbon" in state.text


LATE = "My sister Beatriz lives in Porto and teaches violin at the conservatory."


async def summary_of(svc: MemoryService, session_id: str) -> SummaryState:
    state = await svc.store.load_summary("u1", session_id)
    cached = SummaryState.from_redis(await svc.stm.redis.hgetall(svc.stm.names.stm_summary(session_id)))
    assert cached is not None and cached.text == state.text and cached.turns == state.turns, "Redis and PostgreSQL"
    return state


async def test_a_turn_stored_late_with_an_older_time_is_folded_once(mesh: Mesh) -> None:
    """A turn whose timestamp is older than turns the summary already folded (a client's clock, a replay, two
    writers racing) leaves the window at once; the summary folds it all the same, and a redelivery adds nothing."""
    svc = mesh.memory(stm_max_messages=5)
    await seed(svc, "s", "u1", 30)
    before = await summary_of(svc, "s")
    assert before.turns == 25 and before.covered_until == BASE + 24 and before.folded_through == 24
    late = StoredMessage(message_id="late", session_id="s", user_id="u1", role="human", content=LATE,
                         timestamp=BASE - 10)
    assert await svc.api.record(late)
    await svc.stm.drain()
    stm = await read_stm(mesh.redis, mesh.names, "s")
    assert [t.message_id for t in stm.turns] == [f"s-{i}" for i in range(25, 30)]  # the window is the newest 5
    state = await summary_of(svc, "s")
    assert state.turns == 26 and "Beatriz" in state.text, state.text
    assert (state.folded_through, state.not_folded) == (30, [25, 26, 27, 28, 29])  # 25-29: in the window
    assert not await svc.api.record(late)  # a redelivery: not stored again, not folded again
    await svc.stm.drain()
    assert (await summary_of(svc, "s")).turns == 26
    await seed(svc, "s", "u1", 5, start=30)  # turns 25-29 leave the window: the fold point closes the gap
    state = await summary_of(svc, "s")
    assert state.turns == 31 and (state.folded_through, state.not_folded) == (30, [])
    assert "Beatriz" in state.text and "Lisbon" in state.text


async def test_turns_imported_into_a_live_session_are_folded_into_its_summary(mesh: Mesh) -> None:
    svc = mesh.memory(stm_max_messages=5)
    await seed(svc, "s", "u1", 30)
    result = await svc.api.import_messages("u1", [
        ImportMessage(session_id="s", role="user", content=LATE, timestamp=BASE - 20),
        ImportMessage(session_id="s", role="assistant", content="Porto has a fine conservatory.", timestamp=BASE - 19),
    ])
    assert result.imported == 2
    await svc.stm.drain()
    state = await summary_of(svc, "s")
    assert state.turns == 27 and "Beatriz" in state.text, state.text
    stm = await read_stm(mesh.redis, mesh.names, "s")
    assert [t.message_id for t in stm.turns] == [f"s-{i}" for i in range(25, 30)]
    await mesh.redis.flushall()  # a rebuild from PostgreSQL folds nothing twice
    info = await svc.api.get_stm("u1", "s")
    assert info.rehydrated and info.summary == state.text
    assert (await svc.store.load_summary("u1", "s")).turns == 27


async def test_a_summary_saved_before_fold_points_is_converted_and_goes_on(mesh: Mesh) -> None:
    """A state written by an earlier version (no fold point: it covered every turn up to covered_until) is
    converted by the next catch-up or rebuild, and saved at once."""
    svc = mesh.memory(stm_max_messages=5)
    await seed(svc, "s", "u1", 30)

    async def saved_by_an_earlier_version() -> None:
        async with svc.store.pool.connection() as conn:
            await conn.execute("UPDATE conversation_sessions SET summary_state = summary_state - 'folded_through'"
                               " - 'not_folded' WHERE session_id = 's'")
        assert (await svc.store.load_summary("u1", "s")).folded_through is None

    await saved_by_an_earlier_version()
    await mesh.redis.delete(mesh.names.stm_summary("s"))  # the catch-up reads PostgreSQL's copy
    await seed(svc, "s", "u1", 1, start=30)  # turn 25 leaves the window: converted (up to 24), then folded
    state = await summary_of(svc, "s")
    assert state.turns == 26 and (state.folded_through, state.not_folded) == (25, [])
    await saved_by_an_earlier_version()
    await mesh.redis.delete(*(key("s") for key in (mesh.names.stm_turns, mesh.names.stm_meta, mesh.names.stm_summary)))
    assert (await svc.api.get_stm("u1", "s")).rehydrated  # nothing to fold: converted and saved all the same
    state = await summary_of(svc, "s")
    assert state.turns == 26 and (state.folded_through, state.not_folded) == (25, [])
    assert await svc.api.record(StoredMessage(message_id="late", session_id="s", user_id="u1", role="human",
                                              content=LATE, timestamp=BASE - 10))
    await svc.stm.drain()
    state = await summary_of(svc, "s")
    assert state.turns == 27 and "Beatriz" in state.text
    assert (state.folded_through, state.not_folded) == (31, [26, 27, 28, 29, 30])


async def test_a_failed_catch_up_is_made_good_by_the_next_write(mesh: Mesh) -> None:
    svc = mesh.memory(stm_max_messages=3)
    summariser = svc.stm.summariser
    working = summariser.fold
    failures = [RuntimeError("summariser crashed")]

    async def flaky(state: SummaryState, turns: Sequence[Turn],
                    scores: Mapping[str, float] | None = None) -> SummaryState:
        if failures:
            raise failures.pop()
        return await working(state, turns, scores)

    summariser.fold = flaky  # type: ignore[method-assign]
    await seed(svc, "s", "u1", 4)  # turn 0 leaves the window; its fold fails
    assert svc.stm.failures == 1
    # the session's STM dropped for a rebuild: all of it, so no turn or summary is left without its owner
    assert not await mesh.redis.exists(mesh.names.stm_meta("s"), mesh.names.stm_turns("s"),
                                       mesh.names.stm_summary("s"))
    await seed(svc, "s", "u1", 1, start=4)  # the next write rebuilds: turns 0 and 1 are folded
    state = await svc.store.load_summary("u1", "s")
    assert state.turns == 2 and "Lisbon" in state.text
    stm = await read_stm(mesh.redis, mesh.names, "s")
    assert [t.message_id for t in stm.turns] == ["s-2", "s-3", "s-4"] and stm.summary == state.text


async def test_a_fold_ending_after_its_session_was_dropped_leaves_no_summary(mesh: Mesh) -> None:
    """A catch-up still folding when the session's STM is dropped (its deletion, or its keys expiring) writes the
    durable copy but no summary in Redis: a summary without its meta has no owner a reader could be checked
    against."""
    svc = mesh.memory(stm_max_messages=3)
    summariser = svc.stm.summariser
    working = summariser.fold

    async def dropped_meanwhile(state: SummaryState, turns: Sequence[Turn],
                                scores: Mapping[str, float] | None = None) -> SummaryState:
        await svc.stm.forget_session("s")
        return await working(state, turns, scores)

    summariser.fold = dropped_meanwhile  # type: ignore[method-assign]
    await seed(svc, "s", "u1", 4)  # turn 0 leaves the window and is folded while the STM is dropped
    assert svc.stm.failures == 0
    assert not await mesh.redis.exists(mesh.names.stm_summary("s"))
    assert not (await read_stm(mesh.redis, mesh.names, "s")).exists
    assert "Lisbon" in (await svc.store.load_summary("u1", "s")).text  # the fold itself is kept in PostgreSQL
    summariser.fold = working  # type: ignore[method-assign]
    info = await svc.api.get_stm("u1", "s")  # and the rebuild serves it
    assert info.rehydrated and "Lisbon" in info.summary and [t.message_id for t in info.turns] == ["s-1", "s-2", "s-3"]


async def test_with_stm_salience_the_summary_is_given_the_stored_scores(mesh: Mesh) -> None:
    """STM_SALIENCE_WEIGHT > 0: each stored message is scored with the salience model in its forward pass (on the
    write path with MEMORY_CARRY_VECTORS, the default; else in the background pass), the score is stored on the
    message, and every fold is given the scores of its turns; a deletion of the user clears the model's per-session
    state. Both ways store the same scores. (What the scores change: test_memory_summary.)"""
    texts = ["My passport number ends in 4471 and it expires in March.",
             "Sure, I will remember your passport details for the trip.",
             "We watched a film about a lighthouse keeper and his dog on Sunday evening.",
             "That sounds like a lovely and relaxing weekend at home.", "ok", "thanks", "bye"]
    stored_scores = []
    for carry in (True, False):
        user, sess = f"u-sal-{carry}", f"sal-{carry}"
        svc = mesh.memory(stm_max_messages=3, stm_max_tokens=60, stm_salience_weight=2.0, memory_carry_vectors=carry)
        assert svc.api.salience is not None and (svc.api.carrier is not None) == carry
        given: list[tuple[list[str], dict[str, float]]] = []
        original = svc.stm.summariser.fold

        async def recording_fold(state: SummaryState, turns: Sequence[Turn],
                                 scores: Mapping[str, float] | None = None,
                                 given: list[tuple[list[str], dict[str, float]]] = given,
                                 original: Any = original) -> SummaryState:
            given.append(([t.message_id for t in turns], dict(scores or {})))
            return await original(state, turns, scores)

        svc.stm.summariser.fold = recording_fold  # type: ignore[method-assign]
        for i, text in enumerate(texts):
            await svc.api.record(StoredMessage(message_id=f"{sess}-{i}", session_id=sess, user_id=user,
                                               role="human" if i % 2 == 0 else "ai", content=text, timestamp=BASE + i))
            # scored as stored (carry: by the write itself), long before the turn leaves the window
            assert await svc._embed_pending() == (0 if carry else 1)
        await svc.stm.drain()
        stored = await svc.store.unfolded_turns(user, sess, SummaryState())
        assert set(stored.scores) == {f"{sess}-{i}" for i in range(len(texts))}  # every message scored
        assert all(0.0 <= v <= 1.0 for v in stored.scores.values()) and len(set(stored.scores.values())) > 1
        folded = [m for ids, _ in given for m in ids]
        assert folded == [f"{sess}-{i}" for i in range(len(texts) - 3)]
        assert all(scores == {m: stored.scores[m] for m in ids} for ids, scores in given), given
        assert (await svc.store.load_summary(user, sess)).turns == len(texts) - 3
        assert len(svc.api.salience.states) == 1
        await svc.api.delete_user(user)
        assert len(svc.api.salience.states) == 0
        stored_scores.append([stored.scores[f"{sess}-{i}"] for i in range(len(texts))])
    carried, background = stored_scores
    assert all(abs(a - b) < 1e-5 for a, b in zip(carried, background, strict=True)), stored_scores


async def test_without_stm_salience_nothing_is_scored(mesh: Mesh) -> None:
    svc = mesh.memory()  # STM_SALIENCE_WEIGHT=0, the default
    assert svc.settings.stm_salience_weight == 0 and svc.api.salience is None
    await svc.api.record(StoredMessage(message_id="ns-0", session_id="ns", user_id="u-ns", role="human",
                                       content="My passport number ends in 4471.", timestamp=BASE))
    assert await svc._embed_pending() == 0  # embedded as stored (MEMORY_CARRY_VECTORS)
    assert await mesh.count("SELECT count(*) FROM conversation_messages WHERE user_id = 'u-ns'"
                            " AND embedding IS NOT NULL") == 1
    assert (await svc.store.unfolded_turns("u-ns", "ns", SummaryState())).scores == {}
