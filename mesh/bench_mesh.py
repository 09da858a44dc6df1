"""The whole mesh as users meet it: ready times, then chat turns, then the memory service's own requests.

- ``ready``: each service started alone (ltm, then memory, then chat_ai; the stores already up), timed
  from process start until it answers ``ping`` on its request list (``ltm_requests``,
  ``memory_requests``, ``chat_requests``; for a chat_ai without that list: until it answers a turn sent
  at its start). Repeated ``ready_reps`` times.
- ``chat``: on the mesh just started, ``chat_sessions`` sessions at once (users holding 1k memories each), each
  sending ``chat_turns`` turns one after another with no pause: a closed loop that keeps 50 turns always in
  flight, i.e. a stress test of how far the mesh falls behind when offered more than two cores can serve. 20 turns
  each, 1,000 in all, about 20 s: long enough for the steady state (4 each showed the first two seconds only; 40
  each lost memory on a third of the turns where 4 lost none). A turn is timed from its ``XADD`` to
  ``user_input_queue`` until its AIResponse arrives on ``ai_responses``. Offline responder, default
  ``LTM_TIMEOUT_MS``; turns whose ``meta.ltm`` is not ``hit`` were answered without memory. Before the timed
  turns, three warm-up turns and one ltm search per user (returning users: nothing a user's first search loads is
  in their turns).
- ``chat_paced``: the same 50 sessions as people chat: each session starts at a random moment within
  ``chat_think_s`` and pauses 0.5-1.5 x ``chat_think_s`` (seeded) between its ``chat_paced_turns`` turns, which
  offers about ``chat_sessions / chat_think_s`` turns per second. Started once ltm has ingested the saturated
  run's backlog (``memory_updates`` lag and pending 0), so it measures the steady state, ingest of its own turns
  included. What the turns added to the seeded users (memories of the bench's sessions) is removed afterwards.
- ``memory``: mesh/bench_memory.py on the same mesh's memory process, through ``memory_requests``.
"""

from __future__ import annotations

import asyncio
import random
import time
from collections import Counter
from typing import Any

import psycopg
from redis.exceptions import ResponseError

from mesh.bench_cpu import CpuMeter
from mesh.bench_procs import REPLY, ServiceProcess, latency, ping_ready, rpc, say
from mesh.bench_seed import SeedPlan, delete_sessions, delete_users
from mesh.bench_spec import Ctx
from shared.contracts import AI_RESPONSE, AIResponse, Names, SearchRequest, UserInput, decode, encode, new_id
from shared.contracts.messages import SearchData

SERVICES = ("ltm", "memory", "chat_ai")
TURN_TIMEOUT_S = 60.0


async def ready_of(ctx: Ctx, names: Names, proc: ServiceProcess) -> tuple[float, str]:
    """Seconds from start to ready, and how readiness was seen."""
    me = proc.env["CONSUMER_NAME"]
    if proc.service == "ltm":
        return await ping_ready(ctx.redis, names.ltm_requests, proc, instance=me), "ping on ltm_requests"
    if proc.service == "memory":
        return await ping_ready(ctx.redis, names.memory_requests, proc, instance=me), "ping on memory_requests"
    queue = getattr(names, "chat_requests", None)
    if isinstance(queue, str):
        return await ping_ready(ctx.redis, queue, proc, instance=me), "ping on chat_requests"
    return await first_reply(ctx, names, proc), "its first AIResponse (this chat_ai has no chat_requests)"


async def first_reply(ctx: Ctx, names: Names, proc: ServiceProcess, timeout: float = 180.0) -> float:
    """Seconds from the chat_ai process's start until a turn sent at its start is answered."""
    last: Any = await ctx.redis.xrevrange(names.ai_responses, count=1)
    cursor: Any = last[0][0] if last else "0-0"
    msg = UserInput(message_id=f"bench-chat-{ctx.run_id}-ready-{proc.pid}", user_id=_chat_user(ctx, 0),
                    session_id=f"bench-chat-{ctx.run_id}-ready", content="Hello, are you there?")
    await ctx.redis.xadd(names.user_input, {"data": encode(msg)})
    while time.monotonic() - proc.started_at < timeout:
        proc.check()
        rows: Any = await ctx.redis.xread({names.ai_responses: cursor}, block=100, count=50)
        for _stream, entries in rows or []:
            for entry_id, fields in entries:
                cursor = entry_id
                if decode(AI_RESPONSE, fields[b"data"]).in_reply_to == msg.message_id:
                    return time.monotonic() - proc.started_at
    raise TimeoutError(f"{proc.label} answered no turn in {timeout:.0f}s")


async def mesh_workload(ctx: Ctx) -> dict[str, Any]:
    spec = ctx.spec
    names = Names().with_prefix(ctx.prefix("chat"))
    samples: dict[str, list[float]] = {s: [] for s in SERVICES}
    probes: dict[str, str] = {}
    out: dict[str, Any] = {}
    running: list[ServiceProcess] = []
    say("ready: each service alone, from process start to its first answer")
    try:
        for rep in range(max(1, spec.ready_reps)):
            ctx.procs.stop(running)
            running = []
            for service in SERVICES:
                proc = ctx.procs.start(service, "chat", names.prefix)
                running.append(proc)
                seconds, probes[service] = await ready_of(ctx, names, proc)
                samples[service].append(seconds)
                say(f"  {service} ready in {seconds:.2f}s ({probes[service]}; round {rep + 1})")
        out["ready"] = {s: {"samples_s": [round(x, 3) for x in samples[s]], "median_s": round(_median(samples[s]), 3),
                            "max_s": round(max(samples[s]), 3), "probe": probes[s]} for s in SERVICES}
        if "chat" in spec.workloads:
            out["chat"] = await chat_turns(ctx, names, running)
            if spec.chat_think_s > 0:
                # the burst's leftover (memory storing its messages, ltm ingesting): how long the mesh needs to
                # catch up after it, and the paced run starts on a quiet mesh
                out["chat_paced_backlog_s"] = await backlog_drained(ctx, names)
                out["chat_paced"] = await chat_turns(ctx, names, running, think_s=spec.chat_think_s)
        if "memory" in spec.workloads:
            from mesh.bench_memory import memory_requests

            out["memory_backlog_s"] = await backlog_drained(ctx, names)
            out["memory"] = await memory_requests(ctx, names, running)
    finally:
        ctx.procs.stop(running)
        await delete_users(ctx.database_url, f"bench-memory-{ctx.run_id}")
        if "chat" in spec.workloads:
            users = sorted({_chat_user(ctx, s) for s in range(spec.chat_sessions + 1)})  # + the warm-up session
            await delete_sessions(ctx.database_url, users, f"bench-chat-{ctx.run_id}-%")
    return out


def _median(values: list[float]) -> float:
    ordered = sorted(values)
    return ordered[len(ordered) // 2]


def _chat_user(ctx: Ctx, session: int) -> str:
    return SeedPlan.filler_user(session % max(1, ctx.spec.seed.filler_users))


async def warm_users(ctx: Ctx, names: Names, users: list[str]) -> None:
    """One ltm search per user before the turns are timed: the mesh has seen these users before (whatever
    a first search of a user costs, caches or indexes, is not in a returning user's turn)."""
    client = await rpc(ctx.redis, names.ltm_requests, REPLY, names.prefix)
    try:
        for user in users:
            await client.call(SearchRequest(request_id=new_id(), type="search", user_id=user,
                                            data=SearchData(query=ctx.queries.next(), limit=5)), 60.0)
    finally:
        await client.close()


async def backlog_drained(ctx: Ctx, names: Names, timeout: float = 300.0) -> float:
    """Seconds until the services' stream groups have nothing unread and nothing pending (ltm's on memory_updates,
    memory's on user_input_queue and ai_responses) and memory has embedded every message it stored. A saturated
    chat run leaves memory storing its messages for a while after the last reply (chat_ai answers without waiting
    for them), and its background job embedding the offline replies (not embedded as they are stored: nothing
    carries their vectors): a workload started before that measured the leftover, not itself
    (message_store_first_turns, p95 0.4-0.9 s behind the burst's stream backlog, 78 ms beside the background
    job's, 25-30 ms alone)."""
    watched = ((names.memory_updates, names.ltm_group), (names.user_input, names.memory_group),
               (names.ai_responses, names.memory_group))
    started = time.monotonic()
    last: Any = None
    while time.monotonic() - started < timeout:
        behind: list[Any] = []  # (stream, its group's lag and pending) of every group not caught up
        for stream, group in watched:
            try:
                groups: Any = await ctx.redis.xinfo_groups(stream)
            except ResponseError:  # no such stream: nothing was sent there
                continue
            behind += [(stream, g.get("lag"), g.get("pending")) for g in groups
                       if g.get("name") in (group, group.encode()) and (g.get("lag"), g.get("pending")) != (0, 0)]
        # memory's background job still embedding what it stored without a vector (the burst's offline replies)
        unembedded = await _unembedded(ctx.database_url)
        last = {"groups behind (stream, lag, pending)": behind, "messages without a vector": unembedded}
        if not behind and not unembedded:
            return round(time.monotonic() - started, 2)
        await asyncio.sleep(0.5)
    raise TimeoutError(f"the services did not catch up with their streams in {timeout:.0f}s; last seen {last}")


async def _unembedded(database_url: str) -> int:
    async with await psycopg.AsyncConnection.connect(database_url, autocommit=True) as conn:
        cur = await conn.execute("SELECT count(*) FROM conversation_messages WHERE embedding IS NULL")
        row = await cur.fetchone()
    return int(row[0]) if row else 0


async def chat_turns(ctx: Ctx, names: Names, procs: list[ServiceProcess], think_s: float = 0.0) -> dict[str, Any]:
    """``think_s`` 0: every session sends its next turn as soon as the last is answered; otherwise each
    pauses 0.5-1.5 x ``think_s`` between turns and starts within ``think_s``."""
    spec = ctx.spec
    tag = "paced-" if think_s > 0 else ""
    turns = spec.chat_paced_turns if think_s > 0 else spec.chat_turns
    waiting: dict[str, asyncio.Future[AIResponse]] = {}
    stop = asyncio.Event()

    async def read_replies() -> None:
        cursor: Any = "0-0"
        while not stop.is_set():
            rows: Any = await ctx.redis.xread({names.ai_responses: cursor}, block=500, count=200)
            for _stream, entries in rows or []:
                for entry_id, fields in entries:
                    cursor = entry_id
                    reply = decode(AI_RESPONSE, fields[b"data"])
                    fut = waiting.pop(reply.in_reply_to, None)
                    if fut is not None and not fut.done():
                        fut.set_result(reply)

    samples: list[float] = []
    server_ms: list[float] = []
    status: Counter[str] = Counter()
    lost = 0

    async def turn(session: int, n: int, record: bool) -> None:
        nonlocal lost
        msg = UserInput(message_id=f"bench-chat-{ctx.run_id}-{tag}{session}-{n}", user_id=_chat_user(ctx, session),
                        session_id=f"bench-chat-{ctx.run_id}-{tag}{session}", content=ctx.queries.next())
        fut: asyncio.Future[AIResponse] = asyncio.get_running_loop().create_future()
        waiting[msg.message_id] = fut
        started = time.perf_counter()
        await ctx.redis.xadd(names.user_input, {"data": encode(msg)})
        try:
            reply = await asyncio.wait_for(fut, TURN_TIMEOUT_S)
        except TimeoutError:
            waiting.pop(msg.message_id, None)
            lost += record
            return
        if record:
            samples.append(time.perf_counter() - started)
            server_ms.append(reply.meta.latency_ms / 1000)
            status[reply.meta.ltm] += 1

    async def session(s: int) -> None:
        pause = random.Random(f"{ctx.run_id}-{s}")
        if think_s > 0:
            await asyncio.sleep(pause.uniform(0, think_s))
        for n in range(turns):
            if n and think_s > 0:
                await asyncio.sleep(pause.uniform(0.5, 1.5) * think_s)
            await turn(s, n, True)

    reader = asyncio.create_task(read_replies())
    try:
        if not think_s:
            for n in range(3):  # warm: the first turns load what every later turn finds ready
                await turn(spec.chat_sessions, n, False)
            await warm_users(ctx, names, sorted({_chat_user(ctx, s) for s in range(spec.chat_sessions)}))
        say(f"chat: {spec.chat_sessions} sessions at once, {turns} turns each"
            + (f", pausing 0.5-1.5 x {think_s:g}s between turns" if think_s else ", no pause"))
        meter = await CpuMeter.of(procs, ctx.redis, ctx.database_url)
        meter.start()
        started = time.perf_counter()
        await asyncio.gather(*(session(s) for s in range(spec.chat_sessions)))
        wall = time.perf_counter() - started
        cpu = meter.stop(wall, len(samples))
    finally:
        stop.set()
        await reader
    for p in procs:
        p.check()
    without = sum(n for s, n in status.items() if s != "hit") + lost
    r: dict[str, Any] = {"sessions": spec.chat_sessions, "turns_per_session": turns, "think_s": think_s,
         "turn": latency(samples),
         "chat_ai_latency": latency(server_ms), "by_ltm_status": dict(status), "no_reply": lost,
         "without_memory": without, "turns_per_s": round(len(samples) / wall, 2), "seconds": round(wall, 2),
         "cpu": cpu}
    say(f"  turn p50 {r['turn']['p50_ms']} ms, p95 {r['turn']['p95_ms']} ms; without memory {without} of "
        f"{spec.chat_sessions * turns} ({dict(status)}, no reply {lost})")
    say("  cores used: " + ", ".join(f"{k} {v:.2f}" for k, v in cpu["cores"].items())
        + f" (total {cpu['cores_total']}); CPU ms a turn: "
        + ", ".join(f"{k} {v:.1f}" for k, v in cpu.get("cpu_ms_per_turn", {}).items()))
    return r
