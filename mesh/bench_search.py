"""Search workloads: ltm ``search`` round trips through ``ltm_requests`` and a private reply channel.

- ``search``: one native ltm process; one requester at each size (p50/p95/p99), then 1, 2, 4, 8
  concurrent requesters at each size (searches/s and p95); then a second ltm process on the same
  lists, 8 requesters at ``scale_size``; then one requester on a quiet mesh and again while a
  backlog of LoCoMo updates is being ingested by that same process (ratio of p95).
- ``mem0``: one ltm process with ``LTM_BACKEND=mem0`` on its own prefix and table, seeded through its
  own ingest path (``memory_updates``, the same texts as the native user of that size), then the
  same searches; ratios to native, and how many searches returned fewer than ``limit`` results.

Latency is the client's: from the RPUSH to the reply on the reply channel (query embedding included).
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

from mesh.bench_procs import ServiceProcess, consumed, latency, ping_ready, rpc, say, wait_consumed
from mesh.bench_seed import SeedPlan, delete_users, user_texts
from mesh.bench_spec import Ctx
from shared.contracts import LTM_RESPONSE, MemoryUpdate, Names, encode, new_id
from shared.contracts.messages import MemoryUpdateMeta, SearchData, SearchRequest, StatsRequest
from shared.runtime.requests import RpcClient

SEARCH_TIMEOUT_S = 30.0


async def searches(ctx: Ctx, clients: list[RpcClient[Any]], user: str, per_client: int,
                   stop: asyncio.Event | None = None) -> dict[str, Any]:
    """``per_client`` searches from each client at once; latency, throughput, short answers."""
    samples: list[float] = []
    counts: list[int] = []
    failures = {"errors": 0, "timeouts": 0}
    limit = ctx.spec.limit

    async def requester(client: RpcClient[Any]) -> None:
        for k in range(per_client):
            if k and stop is not None and stop.is_set():  # every requester makes one search at least
                return
            request = SearchRequest(request_id=new_id(), type="search", user_id=user,
                                    data=SearchData(query=ctx.queries.next(), limit=limit))
            started = time.perf_counter()
            try:
                reply = await client.call(request, SEARCH_TIMEOUT_S)
            except TimeoutError:
                failures["timeouts"] += 1
                continue
            elapsed = time.perf_counter() - started
            if not reply.success:
                failures["errors"] += 1
                continue
            samples.append(elapsed)
            counts.append(len(reply.memories))

    started = time.perf_counter()
    await asyncio.gather(*(requester(c) for c in clients))
    wall = time.perf_counter() - started
    return {**latency(samples), "requesters": len(clients), "qps": round(len(samples) / wall, 2) if wall else None,
            "seconds": round(wall, 2), **failures, "mean_results": round(sum(counts) / len(counts), 2) if counts else 0,
            "fewer_than_limit": sum(1 for c in counts if c < limit)}


async def clients_for(ctx: Ctx, names: Names, n: int) -> list[RpcClient[Any]]:
    return [await rpc(ctx.redis, names.ltm_requests, LTM_RESPONSE, names.prefix) for _ in range(n)]


async def close_all(clients: list[RpcClient[Any]]) -> None:
    for c in clients:
        await c.close()


async def memories_of(client: RpcClient[Any], user: str) -> int:
    reply = await client.call(StatsRequest(request_id=new_id(), type="stats", user_id=user), 120.0)
    if not reply.success:
        raise RuntimeError(f"stats failed for {user}: {reply.error}")
    return int((reply.data or {}).get("memories", 0))


def _line(label: str, r: dict[str, Any]) -> None:
    say(f"  {label}: p50 {r['p50_ms']} ms, p95 {r['p95_ms']} ms, p99 {r['p99_ms']} ms, {r['qps']}/s "
        f"(n {r['n']}, errors {r['errors']}, timeouts {r['timeouts']}, fewer than limit {r['fewer_than_limit']})")


async def start_ltm(ctx: Ctx, workload: str, names: Names, **env: str) -> tuple[ServiceProcess, float]:
    """An ltm process, once it answers ping itself (not another copy on the same list), and how long that took."""
    proc = ctx.procs.start("ltm", workload, names.prefix, **env)
    ready = await ping_ready(ctx.redis, names.ltm_requests, proc, instance=proc.env["CONSUMER_NAME"])
    say(f"  {proc.label} ready in {ready:.1f}s")
    return proc, ready


# --------------------------------------------------------------------------- native
async def search_workload(ctx: Ctx) -> dict[str, Any]:
    spec = ctx.spec
    names = Names().with_prefix(ctx.prefix("search"))
    out: dict[str, Any] = {"single": {}, "concurrency": {}, "processes": {}}
    say("search: native ltm, through ltm_requests")
    ltm1, _ = await start_ltm(ctx, "search", names)
    clients = await clients_for(ctx, names, max(spec.concurrency))
    try:
        for size in spec.seed.sizes:
            user = SeedPlan.size_user(size)
            held = await memories_of(clients[0], user)
            if held < size:
                raise RuntimeError(f"{user} holds {held} memories, not {size}: reseed with --force-seed")
            await searches(ctx, clients[:1], user, 5)  # warm: connections, caches, this user's pages
            out["single"][str(size)] = r = await searches(ctx, clients[:1], user, spec.single_searches)
            r["memories"] = held
            _line(f"{size} memories, 1 requester", r)
        for size in spec.seed.sizes:
            out["concurrency"][str(size)] = {}
            for n in spec.concurrency:
                r = await searches(ctx, clients[:n], SeedPlan.size_user(size), spec.searches_per_requester)
                out["concurrency"][str(size)][str(n)] = r
                _line(f"{size} memories, {n} requesters", r)
        top = max(spec.concurrency)
        user = SeedPlan.size_user(spec.scale_size)
        extra: list[ServiceProcess] = []
        for n in spec.search_processes:
            while 1 + len(extra) < n:
                extra.append((await start_ltm(ctx, "search", names))[0])
                await searches(ctx, clients[:top], user, 2)  # warm the new copy too (not counted)
            r = await searches(ctx, clients[:top], user, spec.searches_per_requester)
            out["processes"][str(n)] = r
            _line(f"{spec.scale_size} memories, {top} requesters, {n} ltm processes", r)
        ctx.procs.stop(extra)
        out["ingesting"] = await _while_ingesting(ctx, names, clients[0], ltm1)
    finally:
        await close_all(clients)
        ctx.procs.stop([ltm1])
        await delete_users(ctx.database_url, f"bench-ingesting-{ctx.run_id}-%")
    return out


async def _while_ingesting(ctx: Ctx, names: Names, client: RpcClient[Any], ltm: ServiceProcess) -> dict[str, Any]:
    """One requester on a quiet mesh, then while the same ltm process ingests a backlog."""
    spec = ctx.spec
    user = SeedPlan.size_user(spec.scale_size)
    quiet = await searches(ctx, [client], user, spec.ingesting_searches)
    _line("quiet mesh", quiet)
    backlog = [MemoryUpdate(user_id=f"bench-ingesting-{ctx.run_id}-{t.conversation}", content=t.content,
                            source="user", timestamp=t.timestamp,
                            meta=MemoryUpdateMeta.model_validate({"session_id": t.session, "speaker": t.speaker,
                                                                  "message_id": f"{ctx.run_id}-ingesting-{i}"}))
               for i, t in enumerate(ctx.corpus.short_turns[:spec.ingesting_backlog])]
    async with ctx.redis.pipeline(transaction=False) as pipe:
        for u in backlog:
            pipe.xadd(names.memory_updates, {"data": encode(u)})
        ids = await pipe.execute()
    stop = asyncio.Event()

    async def watch() -> None:  # stop searching once the backlog is gone: only loaded searches count
        while not stop.is_set():
            if await consumed(ctx.redis, names.memory_updates, names.ltm_group, ids) >= len(ids):
                stop.set()
            await asyncio.sleep(0.2)

    watcher = asyncio.create_task(watch())
    try:
        loaded = await searches(ctx, [client], user, spec.ingesting_searches, stop)
    finally:
        stop.set()
        await watcher
    left = len(ids) - await consumed(ctx.redis, names.memory_updates, names.ltm_group, ids)
    _line(f"while ingesting ({left} of {len(ids)} updates still queued at the end)", loaded)
    ltm.check()  # what is left of the backlog goes with the process, its users with the clean-up
    ratio = round(loaded["p95_ms"] / quiet["p95_ms"], 3) if loaded["p95_ms"] and quiet["p95_ms"] else None
    seconds = loaded["seconds"] or 0
    return {"size": spec.scale_size, "backlog": len(ids), "queued_at_end": left,
            "ingested_meanwhile": len(ids) - left,  # ingest that yields to search shows here: few or none
            "ingest_per_s_meanwhile": round((len(ids) - left) / seconds, 2) if seconds else None,
            "quiet": quiet, "ingesting": loaded, "p95_ratio": ratio}


# --------------------------------------------------------------------------- mem0
async def mem0_workload(ctx: Ctx) -> dict[str, Any]:
    spec = ctx.spec
    names = Names().with_prefix(ctx.prefix("mem0"))
    say("mem0: an ltm process with LTM_BACKEND=mem0 (its own table, bench_mem0)")
    proc, _ = await start_ltm(ctx, "mem0", names, LTM_BACKEND="mem0", LTM_MEM0_COLLECTION="bench_mem0")
    clients = await clients_for(ctx, names, max(spec.concurrency))
    out: dict[str, Any] = {"seeding": {}, "single": {}, "concurrency": {}}
    try:
        for size in spec.mem0_sizes:
            user = f"bench-mem0-{size}"
            out["seeding"][str(size)] = await _seed_mem0(ctx, names, clients[0], proc, user, size)
            await searches(ctx, clients[:1], user, 5)
            out["single"][str(size)] = r = await searches(ctx, clients[:1], user, spec.mem0_searches)
            _line(f"mem0, {size} memories, 1 requester", r)
            top = max(spec.concurrency)
            out["concurrency"][str(size)] = r = await searches(ctx, clients[:top], user, spec.searches_per_requester)
            _line(f"mem0, {size} memories, {top} requesters", r)
    finally:
        await close_all(clients)
        ctx.procs.stop([proc])
    return out


async def _seed_mem0(ctx: Ctx, names: Names, client: RpcClient[Any], proc: ServiceProcess, user: str,
                     size: int) -> dict[str, Any]:
    """The texts of the native user of this size, through mem0's add path (kept for the next run)."""
    held = await memories_of(client, user)
    if held >= size:
        say(f"  mem0 {user}: {held} memories already (kept from an earlier run)")
        return {"reused": True, "memories": held}
    texts = await user_texts(ctx.database_url, SeedPlan.size_user(size))
    updates = [MemoryUpdate(user_id=user, content=content, source="user", timestamp=ts,
                            meta=MemoryUpdateMeta(session_id=session, message_id=f"{user}:m{i}"))
               for i, (content, session, ts) in enumerate(texts)]
    say(f"  mem0 {user}: ingesting {len(updates)} memories through memory_updates (mem0 add, infer=False)")
    async with ctx.redis.pipeline(transaction=False) as pipe:
        for u in updates:
            pipe.xadd(names.memory_updates, {"data": encode(u)})
        ids = await pipe.execute()
    done, seconds = await wait_consumed(ctx.redis, names.memory_updates, names.ltm_group, ids, [proc],
                                        timeout=7200, label=f"mem0 seed {user}")
    held = await memories_of(client, user)
    say(f"  mem0 {user}: {held} memories ({done / seconds:.1f} adds/s)")
    return {"reused": False, "memories": held, "seconds": round(seconds, 1), "adds_per_s": round(done / seconds, 2)}
