"""The stream consumer on a real Redis: live work is never stolen, poison ends in the dead-letter, blips retry."""

from __future__ import annotations

import asyncio

import pytest
import redis.asyncio as aioredis

from shared.contracts import Names
from shared.runtime.errors import TransientError
from shared.runtime.metrics import Metrics
from shared.runtime.streams import StreamConsumer, leave_intake
from tests.helpers import running, wait_until


def consumer(redis: aioredis.Redis, stream: str, name: str, handler, **kw) -> StreamConsumer:  # type: ignore[no-untyped-def]
    return StreamConsumer(redis, stream=stream, group="g", consumer=name, handler=handler, metrics=Metrics(),
                          block_ms=100, **kw)


async def test_a_slow_handler_keeps_its_entry_while_alive(redis: aioredis.Redis, names: Names) -> None:
    stream = names.user_input
    calls: list[str] = []
    release = asyncio.Event()

    async def slow(entry_id: str, raw: bytes | str | None) -> None:
        calls.append(entry_id)
        await release.wait()

    await redis.xadd(stream, {"data": "x"})
    a = consumer(redis, stream, "a", slow, claim_idle_ms=200)
    b = consumer(redis, stream, "b", slow, claim_idle_ms=200)
    async with running(a):
        await wait_until(lambda: calls, message="a started")
        async with running(b):
            # b runs several claim rounds, each after the entry would have gone idle without a heartbeat
            await wait_until(lambda: b.metrics.get("claim_runs") >= 6, message="b claim rounds")
            assert len(calls) == 1
            release.set()
            await wait_until(lambda: a.metrics.get("processed") == 1, message="a done")
    assert len(calls) == 1 and b.metrics.get("claimed") == 0
    assert int((await redis.xpending(stream, "g"))["pending"]) == 0


async def test_a_failing_message_is_retried_then_dead_lettered(redis: aioredis.Redis, names: Names) -> None:
    stream = names.user_input
    attempts: list[str] = []

    async def broken(entry_id: str, raw: bytes | str | None) -> None:
        attempts.append(entry_id)
        raise ValueError("a bug in the handler")

    await redis.xadd(stream, {"data": '{"poison": true}'})
    c = consumer(redis, stream, "c", broken, claim_idle_ms=100, max_deliveries=3)
    async with running(c):
        await wait_until(lambda: c.metrics.get("dead_lettered") == 1, message="dead-lettered")
    assert len(attempts) == 3
    dead = await redis.xrange(Names.dead(stream))
    assert len(dead) == 1 and dead[0][1][b"reason"] == b"max_retries" and dead[0][1][b"data"] == b'{"poison": true}'
    assert int((await redis.xpending(stream, "g"))["pending"]) == 0


async def test_a_passing_failure_is_retried_in_place_not_dead_lettered(redis: aioredis.Redis, names: Names) -> None:
    stream = names.user_input
    attempts: list[str] = []

    async def flaky(entry_id: str, raw: bytes | str | None) -> None:
        attempts.append(entry_id)
        if len(attempts) < 4:
            raise TransientError("the store is restarting")

    await redis.xadd(stream, {"data": "ok"})
    c = consumer(redis, stream, "c", flaky, claim_idle_ms=60_000, max_deliveries=2)
    async with running(c):
        await wait_until(lambda: c.metrics.get("processed") == 1, message="processed after retries")
    assert len(attempts) == 4 and c.metrics.get("transient_errors") == 3
    assert await redis.xlen(Names.dead(stream)) == 0


async def test_a_passing_failure_only_one_entry_has_is_that_entrys_own(
        redis: aioredis.Redis, names: Names, monkeypatch: pytest.MonkeyPatch) -> None:
    """A "transient" failure of one entry while the others go through (a dependency that fails on this input only)
    is not an outage: after a few attempts in place the entry is left pending, claimed again and dead-lettered after
    max_deliveries, instead of retried in place for good."""
    import shared.runtime.streams as streams

    monkeypatch.setattr(streams, "OWN_TRANSIENT_AFTER", 1)
    stream = names.user_input
    handled: list[bytes | str | None] = []

    async def picky(entry_id: str, raw: bytes | str | None) -> None:
        if raw in (b"bad", "bad"):
            raise TransientError("the embedding server answers 503 to this input")
        handled.append(raw)

    await redis.xadd(stream, {"data": "bad"})
    c = consumer(redis, stream, "c", picky, claim_idle_ms=100, max_deliveries=2, concurrency=4)
    async with running(c):
        for i in range(200):  # other entries keep going through while it fails
            await redis.xadd(stream, {"data": f"good-{i}"})
            if c.metrics.get("dead_lettered"):
                break
            await asyncio.sleep(0.02)  # a steady trickle of other work, not a wait for a condition
        await wait_until(lambda: c.metrics.get("dead_lettered") == 1, message=lambda: (
            f"the bad entry dead-lettered ({len(handled)} others handled, {c.metrics.get('transient_own')} given up)"))
    dead = await redis.xrange(Names.dead(stream))
    assert len(dead) == 1 and dead[0][1][b"data"] == b"bad" and dead[0][1][b"reason"] == b"max_retries"
    assert c.metrics.get("transient_own") >= 1 and len(handled) >= 2


async def test_old_entries_every_group_has_acknowledged_are_trimmed(
        redis: aioredis.Redis, names: Names, monkeypatch: pytest.MonkeyPatch) -> None:
    """The streams hold message text: an entry leaves once it is older than the retention and every group has
    read and acknowledged it; an entry another group has not read yet (or holds pending) stays."""
    import shared.runtime.streams as streams

    monkeypatch.setattr(streams, "TRIM_EVERY_S", 0.05)
    stream = names.user_input
    await redis.xgroup_create(stream, "slow-group", id="0", mkstream=True)  # a second group, behind
    ids = [await redis.xadd(stream, {"data": f"m{i}"}) for i in range(6)]
    done: list[str] = []

    async def handle(entry_id: str, raw: bytes | str | None) -> None:
        done.append(entry_id)

    fast = consumer(redis, stream, "fast", handle, retention_s=0.0)
    async with running(fast):
        await wait_until(lambda: len(done) == 6, message="the fast group handled all six")
        # the slow group has read (and acknowledged) the first three, and holds the fourth pending
        await redis.xreadgroup("slow-group", "c", {stream: ">"}, count=4)
        await redis.xack(stream, "slow-group", *ids[:3])

        async def trimmed() -> bool:
            return await redis.xlen(stream) == 3

        await wait_until(trimmed, message="the three entries both groups acknowledged trimmed")
        left = [entry_id for entry_id, _ in await redis.xrange(stream)]
        assert left == ids[3:]
        assert fast.metrics.get("trimmed") == 3
    # with the retention, nothing young is trimmed whatever the groups did
    await redis.xreadgroup("slow-group", "c", {stream: ">"})
    await redis.xack(stream, "slow-group", *ids[3:])
    keep = consumer(redis, stream, "keeper", handle, retention_s=3600.0)
    started = keep._last_trim
    async with running(keep):
        await wait_until(lambda: keep._last_trim > started, message="a trim pass of the keeper")
        await wait_until(lambda: keep._last_trim > started + 0.1, message="a second trim pass")
    assert await redis.xlen(stream) == 3


async def test_consumers_idle_long_with_nothing_pending_leave_the_group(
        redis: aioredis.Redis, names: Names, monkeypatch: pytest.MonkeyPatch) -> None:
    from shared.runtime import streams

    stream = names.user_input
    await redis.xgroup_create(stream, "g", id="0", mkstream=True)
    await redis.xgroup_createconsumer(stream, "g", "ghost")  # a copy that stopped long ago
    await redis.xadd(stream, {"data": "x"})
    await redis.xreadgroup("g", "holder", {stream: ">"}, count=1)  # a killed copy with an entry pending
    monkeypatch.setattr(streams, "CONSUMER_IDLE_S", 0.05)

    async def idle_enough() -> bool:
        return all(int(c["idle"]) > 60 for c in await redis.xinfo_consumers(stream, "g"))

    await wait_until(idle_enough, message="both consumers idle")
    me = consumer(redis, stream, "me", lambda *_: asyncio.sleep(0))
    await redis.xgroup_createconsumer(stream, "g", "me")
    await me._reap_consumers()
    left = {c["name"].decode() for c in await redis.xinfo_consumers(stream, "g")}
    assert left == {"holder", "me"}, left  # the ghost went; the one with a pending entry stays for _claim
    assert me.metrics.get("consumers_reaped") == 1


async def test_a_task_that_fails_outside_its_handler_is_counted_and_logged(
        redis: aioredis.Redis, names: Names) -> None:
    stream = names.user_input

    async def ok(entry_id: str, raw: bytes | str | None) -> None:
        return None

    c = consumer(redis, stream, "a", ok)

    async def broken_ack(op) -> None:  # type: ignore[no-untyped-def]
        raise RuntimeError("the ack path broke")

    c._retry_redis = broken_ack  # type: ignore[method-assign]
    await redis.xadd(stream, {"data": "x"})
    async with running(c):
        await wait_until(lambda: c.metrics.get("task_errors") == 1, message="the failed task seen")
    assert int((await redis.xpending(stream, "g"))["pending"]) == 1  # not acked: claimed again later


async def test_intake_bounds_the_first_stage_not_the_entries_in_flight(redis: aioredis.Redis, names: Names) -> None:
    """With ``intake``, a consumer reads a new entry only while fewer than intake() handlers are in their first
    stage; one that has called leave_intake() stays in flight (acked when done) without holding back the next."""
    stream = names.user_input
    started: list[str] = []
    passed = {raw: asyncio.Event() for raw in (b"0", b"1", b"2", b"3", b"4")}  # end of each one's first stage
    finish = asyncio.Event()

    async def staged(entry_id: str, raw: bytes | str | None) -> None:
        assert isinstance(raw, bytes)
        started.append(raw.decode())
        await passed[raw].wait()
        leave_intake()
        leave_intake()  # a second call changes nothing
        await finish.wait()

    for i in range(5):
        await redis.xadd(stream, {"data": str(i)})
    c = consumer(redis, stream, "c", staged, concurrency=4, intake=lambda: 2, claim_idle_ms=200)
    async with running(c):
        await wait_until(lambda: len(started) == 2, message=lambda: f"started {started}")
        await wait_until(lambda: c.metrics.get("claim_runs") >= 3, message="a few loop rounds")
        assert started == ["0", "1"]  # two in their first stage: nothing more is read
        passed[b"0"].set()
        await wait_until(lambda: len(started) == 3, message=lambda: f"started {started}")
        passed[b"1"].set()
        passed[b"2"].set()
        await wait_until(lambda: len(started) == 4, message=lambda: f"started {started}")
        passed[b"3"].set()
        await wait_until(lambda: c.metrics.get("claim_runs") >= 6, message="a few more rounds")
        assert started == ["0", "1", "2", "3"]  # four in flight: concurrency still bounds them all
        finish.set()
        passed[b"4"].set()
        await wait_until(lambda: c.metrics.get("processed") == 5,
                         message=lambda: f"processed {c.metrics.get('processed')}")
    assert int((await redis.xpending(stream, "g"))["pending"]) == 0


async def test_leave_intake_frees_nothing_in_a_consumer_without_intake(redis: aioredis.Redis, names: Names) -> None:
    """Without ``intake`` a handler's leave_intake() is a no-op (outside a consumer too): ``concurrency`` alone
    bounds what is read, one at a time here."""
    leave_intake()  # outside any consumer
    stream = names.user_input
    started: list[str] = []
    release = asyncio.Event()

    async def leaving(entry_id: str, raw: bytes | str | None) -> None:
        started.append(entry_id)
        leave_intake()
        await release.wait()

    for i in range(3):
        await redis.xadd(stream, {"data": str(i)})
    c = consumer(redis, stream, "c", leaving, concurrency=1, claim_idle_ms=200)
    async with running(c):
        await wait_until(lambda: c.metrics.get("claim_runs") >= 3, message="a few loop rounds")
        assert len(started) == 1
        release.set()
        await wait_until(lambda: c.metrics.get("processed") == 3,
                         message=lambda: f"processed {c.metrics.get('processed')}")
