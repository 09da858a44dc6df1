"""``mesh replay-dead NAME``: put the dead letters of NAME back where they came from, after a fix.

NAME is the name a service consumes (``user_input_queue``, ``ai_responses``, ``memory_updates``, ``ltm_requests``,
``memory_requests``, ``chat_requests``; ``MESH_KEY_PREFIX`` applies) or its dead-letter stream (``NAME:dead``).
Each dead letter's ``data`` goes back to NAME the way producers send it: ``XADD NAME * data ...`` to a stream
(the ``memory_updates`` channel's dead letters go to the ``memory_updates`` stream, which ltm ingests, since a
publish reaches only who listens at that instant), ``RPUSH`` to a request list. The re-queue and the ``XDEL``
of the dead letter are one MULTI/EXEC, so a replay interrupted half way replays nothing twice, and running it
again finds nothing left: it is idempotent. The services are idempotent by ``message_id`` too, so an entry of a
stream read by two groups (``user_input_queue``: memory and chat-ai), replayed to both, changes nothing for the
group that had handled it. A message that named no id or time got them from its first stream entry (its id's
milliseconds); the replay writes those into it, so its new entry is the same message, not a second one. Only the
dead letters there when the replay starts are replayed: one that fails again is not met twice in one run. A dead
letter whose ``data`` was truncated (over 256 KiB) cannot be replayed and is left in place; one that fails again
is dead-lettered again, with its new reason.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
from collections import Counter
from typing import Any

import redis.asyncio as aioredis

from shared.contracts import MEMORY_UPDATE, USER_INPUT, DecodeError, Names, decode
from shared.contracts.names import DEAD_LETTER_SUFFIX
from shared.runtime.runner import batch

BATCH = 200


def origin_of(names: Names, name: str) -> tuple[str, str]:
    """(where to re-queue, ``stream`` or ``list``) for a consumed name or its dead-letter stream."""
    base = name[: -len(DEAD_LETTER_SUFFIX)] if name.endswith(DEAD_LETTER_SUFFIX) else name
    if base and not base.startswith(names.prefix):
        base = names.prefix + base
    streams = {names.user_input, names.ai_responses, names.memory_updates, names.memory_updates_pubsub}
    lists = {names.ltm_requests, names.memory_requests, names.chat_requests}
    if base in lists:
        return base, "list"
    if base in streams:
        return (names.memory_updates if base == names.memory_updates_pubsub else base), "stream"
    known = sorted(n[len(names.prefix):] for n in streams | lists)
    raise SystemExit(f"{name!r} is not a name the mesh consumes; choose from {', '.join(known)}")


def _as_first_delivered(names: Names, target: str, data: str, entry_id: str | None) -> str:
    """``data`` with the message id and timestamp its first delivery derived (from ``entry_id``, the entry it came
    in) written in, for the streams whose messages may leave them out; unchanged when it names them, or does not
    decode (it is replayed as it was, and refused again with its reason)."""
    if target not in (names.user_input, names.memory_updates):
        return data
    try:
        doc = json.loads(data)
        if not isinstance(doc, dict):
            return data
        if target == names.user_input:
            msg = decode(USER_INPUT, data, max_content_bytes=1 << 30, entry_id=entry_id)
            doc["message_id"], doc["timestamp"] = msg.message_id, msg.timestamp
        else:
            update = decode(MEMORY_UPDATE, data, max_content_bytes=1 << 30, entry_id=entry_id)
            meta = doc.get("meta")
            doc["meta"] = {**(meta if isinstance(meta, dict) else {}), "message_id": update.message_id}
            doc["timestamp"] = update.timestamp
    except (ValueError, RecursionError, DecodeError):
        return data
    return json.dumps(doc, ensure_ascii=False, separators=(",", ":"))


def _text(value: Any) -> str:
    return value.decode("utf-8", "replace") if isinstance(value, bytes) else str(value)


async def replay(redis: aioredis.Redis, names: Names, name: str, *, reason: str | None = None,
                 limit: int | None = None, dry_run: bool = False) -> dict[str, Any]:
    """Re-queue the dead letters of ``name``; returns what was done (counts by reason, skipped, left)."""
    target, kind = origin_of(names, name)
    base = name[: -len(DEAD_LETTER_SUFFIX)] if name.endswith(DEAD_LETTER_SUFFIX) else name
    dead = Names.dead(base if base.startswith(names.prefix) else names.prefix + base)
    replayed: Counter[str] = Counter()
    skipped: Counter[str] = Counter()
    last: Any = await redis.xrevrange(dead, count=1)
    end = _text(last[0][0]) if last else None  # what fails again meanwhile is dead-lettered past it
    cursor = "-"
    done = 0
    while end is not None and (limit is None or done < limit):
        rows: Any = await redis.xrange(dead, min=cursor, max=end, count=BATCH)
        if not rows:
            break
        for entry_id, fields in rows:
            cursor = "(" + _text(entry_id)  # the next page starts after it (it may be deleted by then)
            dead_id = _text(entry_id)
            f = {_text(k): _text(v) for k, v in fields.items()}
            why = f.get("reason", "?")
            if reason is not None and why != reason:
                continue
            if "truncated_from" in f or not f.get("data"):
                skipped["truncated" if "truncated_from" in f else "empty"] += 1
                continue
            if not dry_run:
                async with batch(redis) as pipe:  # a cluster: two slots; a crash between replays it twice
                    if kind == "list":
                        pipe.rpush(target, f["data"])
                    else:
                        pipe.xadd(target, {"data": _as_first_delivered(names, target, f["data"], f.get("entry_id"))})
                    pipe.xdel(dead, dead_id)
                    await pipe.execute()
            replayed[why] += 1
            done += 1
            if limit is not None and done >= limit:
                break
    left = int(await redis.xlen(dead))
    return {"name": base, "dead_letters": dead, "to": target, "kind": kind, "dry_run": dry_run,
            "replayed": sum(replayed.values()), "by_reason": dict(replayed), "skipped": dict(skipped), "left": left}


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("name", help="a consumed name (user_input_queue, memory_updates, ltm_requests, ...) "
                                     "or NAME:dead")
    parser.add_argument("--reason", help="only dead letters with this reason (invalid, max_retries, ...)")
    parser.add_argument("--limit", type=int, help="at most this many")
    parser.add_argument("--dry-run", action="store_true", help="count what would be replayed, change nothing")
    parser.add_argument("--json", action="store_true", help="print the result as JSON")


def run(args: argparse.Namespace) -> int:
    from mesh.client import stack_urls
    from shared.runtime.runner import redis_client

    async def go() -> dict[str, Any]:
        redis = redis_client(stack_urls()["REDIS_URL"])
        try:
            return await replay(redis, Names.from_env(), args.name, reason=args.reason, limit=args.limit,
                                dry_run=args.dry_run)
        finally:
            await redis.aclose()

    result = asyncio.run(go())
    if args.json:
        print(json.dumps(result))
    else:
        verb = "would replay" if result["dry_run"] else "replayed"
        print(f"{verb} {result['replayed']} dead letters of {result['name']} to {result['to']} ({result['kind']}) "
              f"{result['by_reason']}; skipped {result['skipped'] or 0}; {result['left']} left in "
              f"{result['dead_letters']}", file=sys.stdout)
    return 0
