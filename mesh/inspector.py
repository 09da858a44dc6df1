"""``mesh inspect``: the bus in detail, for debugging: streams and their groups (lag, pending, the oldest pending
entry's idle time, consumers), request lists, and each dead-letter stream (counts by reason, the newest entries
with their error, group and size); ``--tail`` then follows ``memory_updates`` live.

Message text is never printed unless ``--content`` is given (dead letters and updates carry user text); without
it an entry shows its ids, reason and size. ``--json`` prints the same as one JSON object (with ``--tail``: one
JSON line per update). ``REDIS_URL`` comes from the environment, else from ``<data-dir>/stack.env``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
from collections import Counter
from typing import Any

import redis.asyncio as aioredis

from mesh.stack import add_data_dir_option
from mesh.stack_files import StackPaths
from mesh.status import bus_status, redis_url_for
from shared.contracts import Names
from shared.runtime.runner import redis_client


def _text(value: Any) -> str:
    return value.decode("utf-8", "replace") if isinstance(value, bytes) else str(value)


async def pending_detail(redis: aioredis.Redis, stream: str, group: str) -> dict[str, Any]:
    """The group's pending entries: how many, the oldest's id and idle time, per consumer."""
    summary: Any = await redis.xpending(stream, group)
    if not summary or not int(summary.get("pending") or 0):
        return {"pending": 0}
    oldest: Any = await redis.xpending_range(stream, group, min="-", max="+", count=1)
    first = oldest[0] if oldest else {}
    return {"pending": int(summary["pending"]), "oldest_id": _text(first.get("message_id", "")),
            "oldest_idle_ms": int(first.get("time_since_delivered") or 0),
            "oldest_deliveries": int(first.get("times_delivered") or 0),
            "by_consumer": {_text(c["name"]): int(c["pending"]) for c in summary.get("consumers") or []}}


async def dead_detail(redis: aioredis.Redis, dead: str, newest: int, content: bool) -> dict[str, Any]:
    reasons: Counter[str] = Counter()
    async for _entry_id, fields in _scan(redis, dead):
        reasons[_text(fields.get(b"reason", b"?"))] += 1
    rows: Any = await redis.xrevrange(dead, count=newest)
    entries = []
    for entry_id, fields in rows:
        f = {_text(k): _text(v) for k, v in fields.items()}
        entry = {"id": _text(entry_id), "reason": f.get("reason"), "error": f.get("error"),
                 "dead_at": float(f.get("dead_at") or 0), "group": f.get("group"), "entry_id": f.get("entry_id"),
                 "bytes": int(f.get("truncated_from") or len(f.get("data", "").encode()))}
        if content:
            entry["data"] = f.get("data")
        entries.append(entry)
    return {"length": int(await redis.xlen(dead)), "by_reason": dict(reasons), "newest": entries}


async def _scan(redis: aioredis.Redis, stream: str, batch: int = 500) -> Any:
    cursor = "-"
    while True:
        rows: Any = await redis.xrange(stream, min=cursor, count=batch)
        if cursor != "-":
            rows = rows[1:]
        if not rows:
            return
        for entry_id, fields in rows:
            yield entry_id, fields
        cursor = _text(rows[-1][0])


async def inspect_bus(redis: aioredis.Redis, names: Names, *, newest: int = 5, content: bool = False) -> dict[str, Any]:
    bus = await bus_status(redis, names)
    for stream in bus["streams"]:
        for group in stream["groups"]:
            group.update(await pending_detail(redis, stream["stream"], _text(group["group"])))
    bus["dead_letters"] = {dead: await dead_detail(redis, dead, newest, content)
                           for dead, n in bus["dead_letters"].items() if n}
    return bus


async def tail_updates(redis: aioredis.Redis, names: Names, *, count: int | None, content: bool,
                       out: Any = sys.stdout, as_json: bool = False, ready: asyncio.Event | None = None) -> int:
    """Print ``memory_updates`` entries appended from now on (``count`` of them, or until cancelled)."""
    last: Any = await redis.xrevrange(names.memory_updates, count=1)
    cursor: Any = _text(last[0][0]) if last else "0-0"
    if ready is not None:
        ready.set()
    seen = 0
    while count is None or seen < count:
        rows: Any = await redis.xread({names.memory_updates: cursor}, block=1000, count=100)
        for _stream, entries in rows or []:
            for entry_id, fields in entries:
                cursor = _text(entry_id)
                try:
                    body = json.loads(_text(fields.get(b"data", b"")))
                except ValueError:
                    body = {}
                meta = body.get("meta") or {}
                line = {"id": cursor, "user_id": body.get("user_id"), "source": body.get("source"),
                        "session_id": meta.get("session_id"), "message_id": meta.get("message_id"),
                        "chars": len(body.get("content") or "")}
                if content:
                    line["content"] = body.get("content")
                print(json.dumps(line) if as_json else "  ".join(f"{k}={v}" for k, v in line.items()), file=out,
                      flush=True)
                seen += 1
                if count is not None and seen >= count:
                    return seen
    return seen


def render(bus: dict[str, Any]) -> str:
    lines = []
    for s in bus["streams"]:
        lines.append(f"stream {s['stream']}: {s['length']} entries")
        for g in s["groups"]:
            oldest = f", oldest pending {g['oldest_id']} idle {g['oldest_idle_ms']} ms" if g.get("pending") else ""
            lines.append(f"  group {g['group']}: lag {g['lag']}, pending {g['pending']}{oldest}, "
                         f"{g['consumers']} consumers")
    lines += [f"list {q['queue']}: {q['length']} waiting" for q in bus["queues"]]
    for dead, d in bus["dead_letters"].items():
        lines.append(f"dead letters {dead}: {d['length']} {d['by_reason']}")
        lines += [f"  {e['id']} {e['reason']} ({e['bytes']} bytes, group {e['group']}): {e['error']}"
                  for e in d["newest"]]
    if not bus["dead_letters"]:
        lines.append("no dead letters")
    return "\n".join(lines)


def configure(parser: argparse.ArgumentParser) -> None:
    add_data_dir_option(parser)
    parser.add_argument("--json", action="store_true", help="print JSON")
    parser.add_argument("--newest", type=int, default=5, help="dead letters shown per stream (newest first)")
    parser.add_argument("--content", action="store_true", help="also print message text (it is user data)")
    parser.add_argument("--tail", action="store_true", help="then follow memory_updates live (Ctrl-C stops)")
    parser.add_argument("--count", type=int, help="with --tail: stop after this many updates")


def run(args: argparse.Namespace) -> int:
    url = redis_url_for(StackPaths.from_arg(args.data_dir))
    if not url:
        print("mesh inspect: no REDIS_URL and no stack.env; start the mesh with `make up`", file=sys.stderr)
        return 1

    async def go() -> None:
        redis = redis_client(url)
        names = Names.from_env()
        try:
            bus = await inspect_bus(redis, names, newest=args.newest, content=args.content)
            print(json.dumps(bus, indent=None if args.tail else 2) if args.json else render(bus), flush=True)
            if args.tail:
                if not args.json:
                    print(f"following {names.memory_updates} (Ctrl-C stops)", flush=True)
                await tail_updates(redis, names, count=args.count, content=args.content, as_json=args.json)
        finally:
            await redis.aclose()

    try:
        asyncio.run(go())
    except KeyboardInterrupt:
        pass
    return 0
