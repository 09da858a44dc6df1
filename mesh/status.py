"""``python -m mesh status``: is each service up (it answers ``ping``, mesh/ready.py), and how is the bus doing.

A service is *up* when it answers ``ping`` on its request list (``memory_requests``, ``ltm_requests``,
``chat_requests``) within ``--timeout``; it serves that list only once it is ready (ltm: embedding
model and spaCy loaded). The reply (shared/contracts/ping.py) names the version, the backend, the
instance that answered, its uptime and its switches. A list reaches one worker, so ``--pings``
(default 3) concurrent pings go to each list and the instances column lists the distinct copies that
answered: a lower bound when more copies run. ``--json`` also lists the consumers each stream group
has seen (``XINFO CONSUMERS``: name, pending, idle; Redis creates one at its first delivery and keeps
it after its process is gone).

The bus part: for each stream its length and, per consumer group, lag (entries not yet delivered)
and pending (delivered, not acknowledged); the length of each request list; the length of every
dead-letter stream. ``REDIS_URL`` comes from the environment, else from ``<data-dir>/stack.env``.
Exit code 0 when every service answered, 1 otherwise.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
from collections.abc import Sequence
from typing import Any

import redis.asyncio as aioredis
import redis.exceptions
from redis.exceptions import ResponseError

from mesh.infra import redact_url
from mesh.ready import Pinger, request_lists
from mesh.stack import SERVICES, add_data_dir_option
from mesh.stack_files import StackPaths, read_env_file
from shared.contracts import Names
from shared.runtime.runner import redis_client

PING_TIMEOUT_S = 2.0
PINGS = 3  # per service: a list reaches one worker, so each ping may find another copy


def stream_groups(names: Names) -> dict[str, list[tuple[str, str]]]:
    """service -> the (stream, group) pairs it consumes."""
    return {
        "memory": [(names.user_input, names.memory_group), (names.ai_responses, names.memory_group)],
        "ltm": [(names.memory_updates, names.ltm_group)],
        "chat_ai": [(names.user_input, names.chat_group)],
    }


# --------------------------------------------------------------------------- the bus


def _text(value: Any) -> Any:
    return value.decode(errors="replace") if isinstance(value, bytes) else value


def _row(raw: dict[Any, Any]) -> dict[str, Any]:
    return {str(_text(k)): _text(v) for k, v in raw.items()}


async def _groups(redis: aioredis.Redis, stream: str) -> list[dict[str, Any]]:
    try:
        rows = await redis.xinfo_groups(stream)
    except ResponseError:  # no such stream yet
        return []
    return [{"group": r["name"], "consumers": int(r["consumers"]), "pending": int(r["pending"]),
             "lag": None if r.get("lag") is None else int(r["lag"]), "last_delivered_id": r["last-delivered-id"]}
            for r in map(_row, rows)]


async def _consumers(redis: aioredis.Redis, stream: str, group: str) -> list[dict[str, Any]]:
    try:
        rows = await redis.xinfo_consumers(stream, group)
    except ResponseError:  # no such stream or group yet
        return []
    return [{"stream": stream, "group": group, "name": r["name"], "pending": int(r["pending"]),
             "idle_ms": int(r["idle"])} for r in map(_row, rows)]


async def bus_status(redis: aioredis.Redis, names: Names) -> dict[str, Any]:
    streams = [names.user_input, names.ai_responses, names.memory_updates]
    lists = [queue for queue, _ in request_lists(names).values()]
    dead = sorted({Names.dead(name) for name in (*names.all_bus_names(), names.ltm_warm, names.memory_forget)})
    return {
        "streams": [{"stream": s, "length": int(await redis.xlen(s)), "groups": await _groups(redis, s)}
                    for s in streams],
        "queues": [{"queue": q, "length": int(await redis.llen(q))} for q in lists],
        "dead_letters": {d: int(await redis.xlen(d)) for d in dead},
    }


async def service_status(redis: aioredis.Redis, names: Names, services: Sequence[str], timeout: float,
                         pings: int = PINGS) -> dict[str, dict[str, Any]]:
    async with Pinger(redis, names, services) as pinger:
        answers = await pinger.ping_all(timeout, pings)
    out: dict[str, dict[str, Any]] = {}
    groups = stream_groups(names)
    for name in services:
        infos = answers[name]
        entry: dict[str, Any] = {"state": "up" if infos else "down"}
        if infos:
            entry.update(infos[0].model_dump(exclude={"pong", "service"}))
        entry["instances"] = sorted({info.instance for info in infos})
        entry["consumers"] = [c for stream, group in groups[name] for c in await _consumers(redis, stream, group)]
        out[name] = entry
    return out


async def collect(redis_url: str, names: Names, services: Sequence[str], timeout: float,
                  pings: int = PINGS) -> dict[str, Any]:
    redis = redis_client(redis_url)
    try:
        bus = await bus_status(redis, names)  # before pinging: the lists' lengths must not count our pings
        svc = await service_status(redis, names, services, timeout, pings)
    finally:
        await redis.aclose()
    return {"redis_url": redact_url(redis_url), "ok": all(s["state"] == "up" for s in svc.values()),
            "services": svc, **bus}


# --------------------------------------------------------------------------- output


def _table(rows: list[list[str]]) -> str:
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    return "\n".join("  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip() for row in rows)


def _uptime(seconds: float) -> str:
    minutes, secs = divmod(int(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h{minutes:02d}m" if hours else f"{minutes}m{secs:02d}s" if minutes else f"{secs}s"


def render(status: dict[str, Any]) -> str:
    rows = [["service", "state", "version", "backend", "uptime", "instances (answered ping)", "flags"]]
    for name, s in status["services"].items():
        up = s["state"] == "up"
        flags = " ".join(f"{k}={v}" for k, v in s.get("flags", {}).items())
        rows.append([name, s["state"], s.get("version", "-"), s.get("backend", "-"),
                     _uptime(s["uptime_s"]) if up else "-", ",".join(s["instances"]) or "-", flags])
    out = [f"redis {status['redis_url']}", _table(rows), ""]
    rows = [["stream", "length", "group", "lag", "pending", "consumers"]]
    for st in status["streams"]:
        for g in st["groups"] or [{"group": "-", "lag": "-", "pending": "-", "consumers": "-"}]:
            rows.append([st["stream"], str(st["length"]), g["group"], str(g["lag"]), str(g["pending"]),
                         str(g["consumers"])])
    out += [_table(rows), ""]
    out.append("lists: " + ", ".join(f"{q['queue']}={q['length']}" for q in status["queues"]))
    dead = {k: v for k, v in status["dead_letters"].items() if v}
    out.append("dead letters: " + (", ".join(f"{k}={v}" for k, v in dead.items()) if dead else "none"))
    down = [name for name, s in status["services"].items() if s["state"] != "up"]
    if down:
        out.append(f"not answering ping: {', '.join(down)} (their logs: <data-dir>/logs/<service>.log)")
    return "\n".join(out)


def redis_url_for(paths: StackPaths) -> str | None:
    return os.environ.get("REDIS_URL") or read_env_file(paths.env).get("REDIS_URL")


def configure(parser: argparse.ArgumentParser) -> None:
    add_data_dir_option(parser)
    parser.add_argument("--json", action="store_true", help="print JSON")
    parser.add_argument("--timeout", type=float, default=PING_TIMEOUT_S, help="seconds to wait for each ping")
    parser.add_argument("--pings", type=int, default=PINGS,
                        help="pings per service (each may reach another copy of it)")


def run(args: argparse.Namespace) -> int:
    paths = StackPaths.from_arg(args.data_dir)
    url = redis_url_for(paths)
    if not url:
        print(f"mesh status: no REDIS_URL and no {paths.env}; start the mesh with `make up`", file=sys.stderr)
        return 1
    try:
        pinged = [s for s in SERVICES if s in request_lists(Names())]  # the gateway is HTTP: not on the bus
        status = asyncio.run(collect(url, Names.from_env(), pinged, args.timeout, max(1, args.pings)))
    except (redis.exceptions.ConnectionError, redis.exceptions.TimeoutError, OSError) as exc:
        print(f"mesh status: Redis at {redact_url(url)} is not reachable ({exc}); is the mesh up?", file=sys.stderr)
        return 1
    print(json.dumps(status, indent=2) if args.json else render(status), flush=True)
    return 0 if status["ok"] else 1
