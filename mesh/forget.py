"""``mesh delete-user USER``: one entry point that deletes a user everywhere the mesh keeps anything.

1. ``delete_user`` on ``memory_requests``: conversation store rows, STM, cache and dedup keys, and every stream
   entry of the user or of the user's sessions (services/memory/erase.py);
2. ``delete_user`` on ``ltm_requests``: every long-term-memory table (mem0's rows with LTM_BACKEND=mem0),
   the search-index entries and text caches of every ltm process, stream entries (services/ltm/service.py);
3. a turn chat_ai was answering, memory storing or ltm ingesting at that instant could still commit after steps
   1-2 (chat_ai's reply is stored by memory after it, and becomes an update ltm ingests): once each of those groups
   has handled what its stream held by then, stage by stage in that order (at most ``settle_s`` in all), both run
   again, and the streams are swept once more.

``--rewrite-aof`` then asks Redis for BGREWRITEAOF, so the append-only file stops holding the deleted entries
(otherwise they stay in it until Redis rewrites it on its own). Deleting twice is harmless: everything counts 0.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import time
from typing import Any

import redis.asyncio as aioredis
from redis.exceptions import ResponseError

from shared.contracts import LTM_RESPONSE, LTMResponse, Names, new_id
from shared.contracts.memory_api import MEMORY_RESPONSE, MemoryDeleteUserRequest, MemoryResponse
from shared.contracts.messages import DeleteUserRequest, UserDeletion
from shared.runtime.erase import erase_entries, mesh_streams
from shared.runtime.metrics import Metrics
from shared.runtime.requests import RpcClient, Unavailable


class DeletionFailed(RuntimeError):
    pass


LIVE_MS = 30_000
"""A group's consumer that read within this long is a running copy of its service (an idle one reads every
second); a group with none is not waited for."""


def _id(entry_id: Any) -> tuple[int, int]:
    text = entry_id.decode() if isinstance(entry_id, bytes) else str(entry_id)
    ms, _, seq = text.partition("-")
    return int(ms), int(seq or 0)


async def _handled_through(redis: aioredis.Redis, stream: str, group: str, top: tuple[int, int]) -> bool:
    """Whether ``group`` has read and acknowledged every entry of ``stream`` up to ``top``; also when there is no
    such group, or no running copy of its service reads it (:data:`LIVE_MS`)."""
    try:
        groups: Any = await redis.xinfo_groups(stream)
    except ResponseError:  # no stream
        return True
    info = next((g for g in groups if (g.get("name") or b"").decode() == group), None)
    if info is None:
        return True
    consumers: Any = await redis.xinfo_consumers(stream, group)
    if not any(int(c.get("idle") or 0) < LIVE_MS for c in consumers):
        return True  # no copy of the service reads it now (stopped, or never started): nothing would come of a wait
    if _id(info.get("last-delivered-id") or "0-0") < top:
        return False
    pending: Any = await redis.xpending(stream, group)
    return not pending["pending"] or _id(pending["min"]) > top


async def _stage_top(redis: aioredis.Redis, stream: str, group: str) -> tuple[int, int] | None:
    """What ``group`` must have handled: the stream's newest entry (XINFO STREAM, which the gateway's ACL user has;
    not its last generated id, which may be an entry the first pass deleted, never to be delivered), and every entry
    the group was given already: one the first pass deleted after a consumer read it is still being handled (ltm
    ingesting it once made the user's rows after both passes). None: nothing to wait for."""
    try:
        last = (await redis.xinfo_stream(stream)).get("last-entry")
        groups: Any = await redis.xinfo_groups(stream)
    except ResponseError:  # no stream
        return None
    info = next((g for g in groups if (g.get("name") or b"").decode() == group), None)
    delivered = _id(info.get("last-delivered-id") or "0-0") if info is not None else (0, 0)
    top = max(_id(last[0]) if last else (0, 0), delivered)
    return None if top == (0, 0) else top


async def _settle(redis: aioredis.Redis, names: Names, seconds: float) -> bool:
    """Until what chat_ai, memory and ltm had taken or were yet to take when this is called is handled, stage by
    stage: the turns chat_ai was answering (their replies are in ai_responses then), what memory had to store of
    them and of the input (its updates are in memory_updates then), what ltm had to ingest. Entries added later are
    not waited for (a busy mesh is never idle). At most ``seconds``; False if that ran out."""
    stages = ((names.user_input, names.chat_group), (names.user_input, names.memory_group),
              (names.ai_responses, names.memory_group), (names.memory_updates, names.ltm_group))
    deadline = time.monotonic() + seconds
    for stream, group in stages:
        top = await _stage_top(redis, stream, group)
        if top is None:
            continue
        while not await _handled_through(redis, stream, group, top):
            if time.monotonic() >= deadline:
                return False
            await asyncio.sleep(0.1)
    return True


def _deletion(resp: MemoryResponse | LTMResponse, service: str) -> UserDeletion:
    if not resp.success:
        err = resp.error
        raise DeletionFailed(f"{service}: {err.code if err else '?'}: {err.message if err else ''}")
    return UserDeletion.model_validate((resp.data or {}).get("deletion") or {})


async def forget_user(redis: aioredis.Redis, names: Names, user_id: str, *, timeout: float = 60.0,
                      settle_s: float = 10.0, rewrite_aof: bool = False, sweep: bool = True) -> dict[str, Any]:
    """Delete ``user_id`` everywhere; what went, per service and pass (raises DeletionFailed, TimeoutError,
    Unavailable). The second pass runs once memory and ltm have nothing pending: a turn one of them was storing
    or ingesting at the instant of the first pass is committed by then, and goes too. Each pass has the services
    XDEL the user's stream entries; ``sweep`` then looks through every stream once more itself (it needs XRANGE
    and XDEL on them: the operator's user; the gateway's has neither and leaves it to the services' passes)."""
    tag = new_id()[:12]
    memory: RpcClient[MemoryResponse] = RpcClient(
        redis, queue=names.memory_requests, reply_channel=names.reply_channel(names.memory_responses, f"forget-{tag}"),
        adapter=MEMORY_RESPONSE, metrics=Metrics())
    ltm: RpcClient[LTMResponse] = RpcClient(
        redis, queue=names.ltm_requests, reply_channel=names.reply_channel(names.ltm_responses, f"forget-{tag}"),
        adapter=LTM_RESPONSE, metrics=Metrics())
    await memory.start()
    await ltm.start()
    try:
        started = time.perf_counter()
        passes: list[dict[str, Any]] = []
        settled = True
        for n in range(2):
            if n:
                settled = await _settle(redis, names, settle_s)
            m = _deletion(await memory.call(MemoryDeleteUserRequest(
                request_id=new_id(), type="delete_user", user_id=user_id), timeout), "memory")
            lt = _deletion(await ltm.call(DeleteUserRequest(
                request_id=new_id(), type="delete_user", user_id=user_id), timeout), "ltm")
            passes.append({"memory": m, "ltm": lt})
        swept = await erase_entries(redis, mesh_streams(names), user_id) if sweep else {}
        if rewrite_aof:
            await redis.bgrewriteaof()
        total = sum(d.total for p in passes for d in p.values()) + sum(swept.values())
        return {"memory": passes[0]["memory"].model_dump(), "ltm": passes[0]["ltm"].model_dump(),
                "second_pass": {k: d.model_dump() for k, d in passes[1].items()},
                "second_pass_total": sum(d.total for d in passes[1].values()),
                "settled": settled, "swept": swept, "total": total, "aof_rewrite": rewrite_aof,
                "seconds": round(time.perf_counter() - started, 3)}
    finally:
        await ltm.close()
        await memory.close()


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("user", help="the user id to delete everywhere")
    parser.add_argument("--timeout", type=float, default=60.0, help="seconds to wait for each service (default 60)")
    parser.add_argument("--rewrite-aof", action="store_true",
                        help="then BGREWRITEAOF, so Redis's append-only file drops the deleted entries now")
    parser.add_argument("--json", action="store_true", help="print the counts as JSON only")


async def _run(args: argparse.Namespace) -> int:
    from mesh.client import stack_urls
    from shared.runtime.runner import redis_client

    redis = redis_client(stack_urls()["REDIS_URL"])
    try:
        result = await forget_user(redis, Names.from_env(), args.user, timeout=args.timeout,
                                   rewrite_aof=args.rewrite_aof)
    except DeletionFailed as exc:
        print(f"mesh delete-user: refused: {exc}")
        return 1
    except (TimeoutError, Unavailable):
        print(f"mesh delete-user: no reply within {args.timeout:.0f}s (are memory and ltm running? `make up`)")
        return 1
    finally:
        await redis.aclose()
    if not args.json:
        mem, lt = result["memory"], result["ltm"]
        print(f"deleted: memory {sum(mem['rows'].values())} rows, {mem['keys']} keys, "
              f"{sum(mem['stream_entries'].values())} stream entries; ltm {sum(lt['rows'].values())} rows, "
              f"{sum(lt['stream_entries'].values())} stream entries; {result['total']} in all "
              f"({result['seconds']:.2f} s)")
    print(json.dumps(result))
    return 0


def run(args: argparse.Namespace) -> int:
    try:
        return asyncio.run(_run(args))
    except KeyboardInterrupt:
        return 130
