"""``mesh delete-user USER``: one entry point that deletes a user everywhere the mesh keeps anything.

1. ``delete_user`` on ``memory_requests``: conversation store rows, STM, cache and dedup keys, and every stream
   entry of the user or of the user's sessions (services/memory/erase.py);
2. ``delete_user`` on ``ltm_requests``: every long-term-memory table (mem0's rows with LTM_BACKEND=mem0),
   the search-index entries and text caches of every ltm process, stream entries (services/ltm/service.py);
3. a turn memory was storing or ltm was ingesting at that instant could still commit after steps 1-2: once
   their groups have nothing pending (at most ``settle_s``), both run again, and the streams are swept once more.

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

from shared.contracts import LTM_RESPONSE, LTMResponse, Names, new_id
from shared.contracts.memory_api import MEMORY_RESPONSE, MemoryDeleteUserRequest, MemoryResponse
from shared.contracts.messages import DeleteUserRequest, UserDeletion
from shared.runtime.erase import erase_entries, mesh_streams
from shared.runtime.metrics import Metrics
from shared.runtime.requests import RpcClient, Unavailable


class DeletionFailed(RuntimeError):
    pass


async def _pending(redis: aioredis.Redis, stream: str, group: str) -> int:
    try:
        groups = await redis.xinfo_groups(stream)
    except Exception:  # noqa: BLE001 - no stream yet: nothing pending
        return 0
    for g in groups:
        name = g.get("name")
        if (name.decode() if isinstance(name, bytes) else name) == group:
            return int(g.get("pending") or 0)
    return 0


async def _settle(redis: aioredis.Redis, names: Names, seconds: float) -> bool:
    """Until memory and ltm have nothing pending (what they were working on is committed), at most ``seconds``."""
    groups = ((names.user_input, names.memory_group), (names.ai_responses, names.memory_group),
              (names.memory_updates, names.ltm_group))
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if not any([await _pending(redis, s, g) for s, g in groups]):
            return True
        await asyncio.sleep(0.2)
    return False


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
