"""Issue 2 promises that need the whole bus: bounded LTM wait, catch-up exactly once, bad input, flags, isolation."""

from __future__ import annotations

import json
import time

import pytest

from shared.contracts import MemoryUpdate, encode
from shared.contracts.messages import MemoryUpdateMeta
from tests.helpers import Mesh, ltm_replies, ltm_request, running, wait_until


async def _ingested(mesh: Mesh, user_id: str) -> int:
    return await mesh.count("SELECT count(*) FROM ltm_ingested WHERE user_id = %s", user_id)


async def test_ltm_down_replies_time_out_then_updates_are_ingested_exactly_once(mesh: Mesh) -> None:
    timeout_ms = 300
    async with running(mesh.memory()), running(mesh.chat(ltm_timeout_ms=timeout_ms)):
        sent = []
        for i, text in enumerate(["I have a dog called Rex.", "My sister lives in Porto.", "I play the cello."]):
            start = time.monotonic()
            msg = await mesh.send(text, user_id="u-down", session_id=f"s{i}")
            reply = await mesh.reply_to(msg)
            elapsed_ms = (time.monotonic() - start) * 1000
            assert reply.meta.ltm == "timeout"
            assert reply.meta.latency_ms < timeout_ms + 150, reply.meta.latency_ms
            assert elapsed_ms < timeout_ms + 1500  # includes the stream hops and the test's polling
            sent.append(msg)
        # every input was published while ltm was down (offline replies are never memories)
        await wait_until(lambda: _xlen(mesh, mesh.names.memory_updates, 3), message="3 updates queued")
    assert await _ingested(mesh, "u-down") == 0
    async with running(mesh.ltm()):
        await wait_until(lambda: _ingested_eq(mesh, "u-down", 3), message="3 updates ingested")
    # redelivery of the same updates changes nothing
    rows = await mesh.redis.xrange(mesh.names.memory_updates)
    for _, fields in rows:
        await mesh.redis.xadd(mesh.names.memory_updates, fields)
    async with running(mesh.ltm()) as ltm:
        await wait_until(lambda: ltm.metrics.get("ingest_duplicates") >= 3, message="duplicates seen")  # type: ignore[attr-defined]
    assert await _ingested(mesh, "u-down") == 3
    assert await mesh.count("SELECT count(*) FROM ltm_memories WHERE user_id = %s AND type = 'episodic'",
                            "u-down") == 3


async def _xlen(mesh: Mesh, stream: str, n: int) -> bool:
    return int(await mesh.redis.xlen(stream)) >= n


async def _ingested_eq(mesh: Mesh, user_id: str, n: int) -> bool:
    return await _ingested(mesh, user_id) == n


async def test_updates_read_by_a_killed_worker_are_claimed_and_ingested(mesh: Mesh) -> None:
    names = mesh.names
    for i in range(5):
        update = MemoryUpdate(user_id="u-kill", content=f"fact number {i} about gardening", source="user",
                              meta=MemoryUpdateMeta(session_id="s", message_id=f"m{i}"))
        await mesh.redis.xadd(names.memory_updates, {"data": encode(update)})
    # a worker reads them and dies before acknowledging anything
    await mesh.redis.xgroup_create(names.memory_updates, names.ltm_group, id="0", mkstream=True)
    taken = await mesh.redis.xreadgroup(names.ltm_group, "dead-worker", {names.memory_updates: ">"}, count=10)
    assert len(taken[0][1]) == 5
    async with running(mesh.ltm(claim_idle_ms=300)) as ltm:
        await wait_until(lambda: _ingested_eq(mesh, "u-kill", 5), message="claimed updates ingested")
        await wait_until(lambda: _nothing_pending(mesh), message="nothing left pending")
        assert ltm.metrics.get("claimed") == 5  # type: ignore[attr-defined]


async def _nothing_pending(mesh: Mesh) -> bool:
    info = await mesh.redis.xpending(mesh.names.memory_updates, mesh.names.ltm_group)
    return int(info["pending"]) == 0


async def test_bad_input_is_dead_lettered_everywhere_and_the_next_good_message_is_served(mesh: Mesh) -> None:
    names = mesh.names
    big = "x" * 40_000
    async with running(mesh.memory()), running(mesh.ltm(ltm_accept_pubsub=True)) as ltm, running(mesh.chat()):
        # streams: not JSON, not an object, missing fields, oversize, no data field
        bad_stream_entries = [{"data": "{not json"}, {"data": "[1,2]"}, {"data": json.dumps({"content": "hi"})},
                              {"data": json.dumps({"session_id": "s", "content": big})}, {"other": "x"},
                              {"data": b"\xff\xfe"}]
        for fields in bad_stream_entries:
            await mesh.redis.xadd(names.user_input, fields)
            await mesh.redis.xadd(names.ai_responses, fields)
            await mesh.redis.xadd(names.memory_updates, fields)
        n = len(bad_stream_entries)
        # user_input_queue is read by two groups: each dead-letters every bad entry
        dead_inputs = await wait_until(lambda: _dead_count(mesh, names.user_input, 2 * n), message="inputs dead")
        assert {d["group"] for d in dead_inputs} == {names.memory_group, names.chat_group}
        assert {d["reason"] for d in dead_inputs} >= {"invalid_json", "invalid", "too_large"}
        await wait_until(lambda: _dead_count(mesh, names.ai_responses, n), message="ai responses dead")
        await wait_until(lambda: _dead_count(mesh, names.memory_updates, n), message="updates dead")
        # nothing stays pending: bad input is acknowledged once dead-lettered
        for stream, group in ((names.user_input, names.memory_group), (names.user_input, names.chat_group),
                              (names.ai_responses, names.memory_group), (names.memory_updates, names.ltm_group)):
            assert int((await mesh.redis.xpending(stream, group))["pending"]) == 0, (stream, group)

        # the pub/sub mirror (LTM_ACCEPT_PUBSUB): bad JSON is dead-lettered, a good update ingested
        await wait_until(lambda: _subscribers(mesh, names.memory_updates_pubsub), message="pubsub listener")
        await mesh.redis.publish(names.memory_updates_pubsub, "nope")
        good = MemoryUpdate(user_id="u-pub", content="I collect vintage stamps.", source="user",
                            meta=MemoryUpdateMeta(session_id="s", message_id="pub-1"))
        await mesh.redis.publish(names.memory_updates_pubsub, encode(good))
        await wait_until(lambda: _ingested_eq(mesh, "u-pub", 1), message="pubsub update ingested")
        assert ltm.metrics.get("pubsub.rejected.invalid_json") == 1  # type: ignore[attr-defined]
        # an update the channel brought whose ingest fails is kept as a dead letter (a channel redelivers nothing)
        failing = MemoryUpdate(user_id="u-pub", content="I also collect old maps.", source="user",
                               meta=MemoryUpdateMeta(session_id="s", message_id="pub-2"))
        real_ingest = ltm.ingest_update  # type: ignore[attr-defined]

        async def store_down(update: MemoryUpdate) -> None:
            raise OSError("the store went away")

        ltm.ingest_update = store_down  # type: ignore[attr-defined]
        await mesh.redis.publish(names.memory_updates_pubsub, encode(failing))
        kept = await wait_until(lambda: _dead_count(mesh, names.memory_updates_pubsub, n + 2),
                                message="the failed pub/sub update dead-lettered")
        assert any(d["reason"] == "handler_error" and "old maps" in d["data"] for d in kept)
        ltm.ingest_update = real_ingest  # type: ignore[attr-defined]

        # ltm_requests: error replies where a request_id is readable, nothing where it is not
        async with ltm_replies(mesh) as replies:
            unknown = ltm_request("teleport", "u1")
            oversize = ltm_request("search", "u1", {"query": big})
            invalid = ltm_request("search", None, {"query": "hello"})  # user_id missing
            expired = ltm_request("ping", None, deadline=time.time() - 5)
            for raw in ("{{{", "[]", unknown, oversize, invalid, expired):
                await mesh.redis.rpush(names.ltm_requests, raw)
            assert (await replies.get(json.loads(unknown)["request_id"])).error.code == "unknown_type"  # type: ignore[union-attr]
            too_big = await replies.get(json.loads(oversize)["request_id"])
            assert not too_big.success and too_big.error and too_big.error.code == "bad_request"
            bad = await replies.get(json.loads(invalid)["request_id"])
            assert not bad.success and bad.error and "user_id" in bad.error.message
            # the next good request is served
            ping = ltm_request("ping", None)
            await mesh.redis.rpush(names.ltm_requests, ping)
            pong = await replies.get(json.loads(ping)["request_id"])
            assert pong.success and pong.data and (pong.data["pong"], pong.data["backend"]) == (True, "native")
            assert json.loads(expired)["request_id"] not in replies.seen
            assert ltm.metrics.get("expired") == 1  # type: ignore[attr-defined]
        dead_requests = await mesh.dead(names.ltm_requests)
        assert sorted(d["reason"] for d in dead_requests) == sorted(
            ["invalid_json", "invalid", "unknown_type", "too_large", "invalid"])

        # and the mesh still answers
        msg = await mesh.send("Still there?", user_id="u-ok", session_id="s-ok")
        assert (await mesh.reply_to(msg)).in_reply_to == msg.message_id


async def _dead_count(mesh: Mesh, name: str, n: int) -> list[dict[str, str]] | None:
    rows = await mesh.dead(name)
    return rows if len(rows) >= n else None


async def _subscribers(mesh: Mesh, channel: str) -> bool:
    counts = await mesh.redis.pubsub_numsub(channel)
    return bool(counts and counts[0][1] > 0)


@pytest.mark.parametrize("enable_ltm", [False, True])
async def test_enable_ltm_false_sends_no_request(mesh: Mesh, enable_ltm: bool) -> None:
    """With ENABLE_LTM=false a running ltm serves nothing for the turn; the same turn with it on is served (so the
    count the test reads is the one a request would move)."""
    ltm = mesh.ltm()
    async with running(mesh.memory()), running(ltm), running(mesh.chat(enable_ltm=enable_ltm)):
        await mesh.reply_to(await mesh.send("I like jazz.", user_id="u-f", session_id="s0"))
        msg = await mesh.send("Remember that I like jazz.", user_id="u-f", session_id="s")
        reply = await mesh.reply_to(msg)
        served = ltm.metrics.get("served")
    if enable_ltm:
        assert reply.meta.ltm in ("hit", "miss") and served >= 2
    else:
        assert reply.meta.ltm == "disabled" and reply.meta.memories_used == 0
        assert served == 0, f"ltm served {served} requests of a chat_ai with ENABLE_LTM=false"


async def test_enable_ltm_publish_false_emits_no_update(mesh: Mesh) -> None:
    async with running(mesh.memory(enable_ltm_publish=False)), running(mesh.chat(enable_ltm=False)):
        msg = await mesh.send("I like jazz.", user_id="u-p", session_id="s")
        await mesh.reply_to(msg)
        await wait_until(lambda: _stored(mesh, "s", 2), message="both turns stored")
    assert await mesh.redis.xlen(mesh.names.memory_updates) == 0


async def _stored(mesh: Mesh, session_id: str, n: int) -> bool:
    return await mesh.count("SELECT count(*) FROM conversation_messages WHERE session_id = %s", session_id) >= n


async def test_another_users_search_never_returns_this_users_memory(mesh: Mesh) -> None:
    async with running(mesh.memory()), running(mesh.ltm()), running(mesh.chat()):
        secret = await mesh.send("My bank PIN is 4921 and I live in Lisbon.", user_id="alice", session_id="a1")
        await mesh.reply_to(secret)
        await wait_until(lambda: _ingested_eq(mesh, "alice", 1), message="alice ingested")
        question = await mesh.send("Where do I live? What is my PIN?", user_id="mallory", session_id="m1")
        reply = await mesh.reply_to(question)
        assert "Lisbon" not in reply.content and "4921" not in reply.content
        assert reply.meta.ltm in ("miss", "hit")
        async with ltm_replies(mesh) as replies:
            for query in ("Lisbon", "bank PIN 4921", "where does alice live"):
                raw = ltm_request("search", "mallory", {"query": query, "limit": 50})
                await mesh.redis.rpush(mesh.names.ltm_requests, raw)
                resp = await replies.get(json.loads(raw)["request_id"])
                assert resp.success
                assert all("4921" not in m.content and "Lisbon" not in m.content for m in resp.memories)
            # deleting alice removes everything of hers from ltm
            raw = ltm_request("delete_user", "alice")
            await mesh.redis.rpush(mesh.names.ltm_requests, raw)
            assert (await replies.get(json.loads(raw)["request_id"])).success
    for table in ("ltm_memories", "ltm_ingested"):
        assert await mesh.count(f"SELECT count(*) FROM {table} WHERE user_id = %s", "alice") == 0



async def test_a_slow_ltm_never_delays_a_reply_and_its_late_replies_are_dropped(mesh: Mesh) -> None:
    """An ltm that answers after LTM_TIMEOUT_MS: every turn is answered on time without memory, each late reply
    is counted and dropped, and chat_ai's pending map is empty afterwards (nothing accumulates)."""
    import asyncio

    from shared.contracts import LTM_REQUEST, LTMResponse
    from shared.runtime import heap
    from shared.runtime.metrics import Metrics
    from shared.runtime.requests import RequestServer

    timeout_ms, delay_s, turns = 200, 0.6, 12
    answered: list[str] = []

    async def slow(req) -> LTMResponse:  # type: ignore[no-untyped-def]
        await asyncio.sleep(delay_s)
        answered.append(req.request_id)
        return LTMResponse(request_id=req.request_id, user_id=getattr(req, "user_id", None), memories=[])

    server = RequestServer(mesh.redis, queue=mesh.names.ltm_requests, reply_channel=mesh.names.ltm_responses,
                           adapter=LTM_REQUEST, handler=slow, error_reply=LTMResponse.failure, metrics=Metrics(),
                           max_content_bytes=32768, concurrency=32)
    chat = mesh.chat(ltm_timeout_ms=timeout_ms)
    async with running(mesh.memory()), running(server), running(chat):
        # one turn first, not measured: the first turns of freshly started services pay their own start-up (on a
        # loaded machine 0.5 s and more), which is not what this test is about
        await mesh.reply_to(await mesh.send("Warm-up turn.", user_id="u-slow", session_id="slow-warm"), timeout=20)
        with heap.timed_pauses() as pauses:
            msgs = [await mesh.send(f"Turn {i}: I like plums.", user_id="u-slow", session_id=f"slow-{i}")
                    for i in range(turns)]
            replies = [await mesh.reply_to(m, timeout=20) for m in msgs]
        assert all(r.meta.ltm == "timeout" for r in replies), [r.meta.ltm for r in replies]
        assert max(r.meta.latency_ms for r in replies) < timeout_ms + 250, (
            [r.meta.latency_ms for r in replies], f"longest GC pauses meanwhile (s, by generation): {pauses}")
        await wait_until(lambda: len(answered) >= turns + 1, timeout=30,
                         message="the slow ltm answered every search")
        await wait_until(lambda: chat.ltm.metrics.get("rpc.late_reply") >= turns + 1, timeout=10,
                         message="every late reply seen and dropped")
        assert chat.ltm._pending == {}, f"{len(chat.ltm._pending)} entries left in the pending map"


def _fake_ltm(mesh: Mesh, delay_s: float, concurrency: int):  # type: ignore[no-untyped-def]
    """An ltm that answers every search after ``delay_s``, ``concurrency`` at a time, finding nothing."""
    import asyncio

    from shared.contracts import LTM_REQUEST, LTMResponse
    from shared.runtime.metrics import Metrics
    from shared.runtime.requests import RequestServer

    async def answer(req) -> LTMResponse:  # type: ignore[no-untyped-def]
        await asyncio.sleep(delay_s)
        return LTMResponse(request_id=req.request_id, user_id=getattr(req, "user_id", None), memories=[])

    return RequestServer(mesh.redis, queue=mesh.names.ltm_requests, reply_channel=mesh.names.ltm_responses,
                         adapter=LTM_REQUEST, handler=answer, error_reply=LTMResponse.failure, metrics=Metrics(),
                         max_content_bytes=32768, concurrency=concurrency)


async def test_a_burst_waits_for_memory_in_the_stream_not_past_its_timeout(mesh: Mesh) -> None:
    """16 turns at once against an ltm that serves one search at a time in 0.1 s: asked all at once, the last ones
    would wait 1.6 s for their memories and give up at LTM_TIMEOUT_MS (1 s). With CHAT_RECALL_CONCURRENCY 2 only two
    wait for ltm at once, the others in user_input_queue before their clock starts: every turn gets its answer."""
    turns = 16
    async with running(mesh.memory()), running(_fake_ltm(mesh, 0.1, 1)), \
            running(mesh.chat(ltm_timeout_ms=1000, chat_recall_concurrency=2)):
        msgs = [await mesh.send(f"Turn {i}: I like plums.", user_id="u-burst", session_id=f"burst-{i}")
                for i in range(turns)]
        replies = [await mesh.reply_to(m, timeout=30) for m in msgs]
    assert [r.meta.ltm for r in replies] == ["miss"] * turns


async def test_a_sustained_burst_finds_how_many_turns_may_wait_for_ltm(mesh: Mesh) -> None:
    """60 turns at once against an ltm that serves one search at a time in 50 ms, at the default
    CHAT_RECALL_CONCURRENCY (16): 16 waiting at once would each wait 0.8 s, past LTM_TIMEOUT_MS (0.5 s), turn after
    turn. chat_ai starts low, grows the number waiting only while replies come back fast and cuts it while they come
    back slowly (services/chat_ai/recall_limit.py), and ltm's list, newest first while congested, drains its
    expired bottom (shared/runtime/requests.py): every turn gets its memories."""
    turns = 60
    chat = mesh.chat(ltm_timeout_ms=500)
    assert chat.settings.chat_recall_concurrency == 16
    async with running(mesh.memory()), running(_fake_ltm(mesh, 0.05, 1)), running(chat):
        msgs = [await mesh.send(f"Turn {i}: I like plums.", user_id="u-sustained", session_id=f"sus-{i}")
                for i in range(turns)]
        replies = [await mesh.reply_to(m, timeout=60) for m in msgs]
    statuses = "".join("m" if r.meta.ltm == "miss" else "T" for r in replies)
    assert statuses == "m" * turns and chat.recall_limit.limit < 16, statuses


async def test_recall_intake_is_lifted_while_ltm_is_silent_not_while_it_is_slow(mesh: Mesh) -> None:
    """While ltm is down every turn would wait LTM_TIMEOUT_MS in its recall stage: once CHAT_RECALL_CONCURRENCY
    searches in a row failed and nothing came back from ltm for LTM_TIMEOUT_MS, chat_ai stops limiting that stage
    (turns are not queued behind timeouts); an ltm that answers, even late, keeps the limit; the first answer in
    time puts it back."""
    chat = mesh.chat(ltm_timeout_ms=200, chat_recall_concurrency=3, chat_concurrency=20)
    async with running(mesh.memory()), running(chat):
        async with running(_fake_ltm(mesh, 0.0, 4)):
            first = await mesh.send("Hello there.", user_id="u-lift", session_id="lift-0")
            assert (await mesh.reply_to(first)).meta.ltm == "miss"
        assert chat._recall_intake() == 3
        async with running(_fake_ltm(mesh, 0.3, 4)):  # alive but late: every search times out
            slow = [await mesh.send(f"Slow {i}?", user_id="u-lift", session_id=f"lift-s{i}") for i in range(3)]
            assert [(await mesh.reply_to(m)).meta.ltm for m in slow] == ["timeout"] * 3
            await wait_until(lambda: chat.ltm.metrics.get("rpc.late_reply") >= 3, message="the late replies heard")
            assert chat._recall_intake() == chat.recall_limit.limit < 3  # it answers: overloaded (fewer), not down
        # down: the failures in a row stand and nothing comes back any more
        await wait_until(lambda: chat._recall_intake() == 20, timeout=5, message="the limit lifted")
        down = [await mesh.send(f"Are you there {i}?", user_id="u-lift", session_id=f"lift-{i + 1}") for i in range(3)]
        assert [(await mesh.reply_to(m)).meta.ltm for m in down] == ["timeout"] * 3
        assert chat._recall_intake() == 20
        async with running(_fake_ltm(mesh, 0.0, 4)):
            back = await mesh.send("Back again.", user_id="u-lift", session_id="lift-9")
            assert (await mesh.reply_to(back)).meta.ltm == "miss"
        assert chat._recall_intake() == chat.recall_limit.limit < 3  # limited again; fast replies raise it
