"""``mesh memories USER``: one user's long-term memories, over the bus (ltm's ``list``, ``search``, ``stats``,
``delete`` and ``delete_user`` on ``ltm_requests``), as any client would reach them.

- ``mesh memories USER`` (or ``list``): a page of them, newest first (``--limit``, ``--offset``, ``--type``);
- ``mesh memories USER search QUERY``: the ranked search chat_ai makes (``--limit``);
- ``mesh memories USER stats``: counts by type;
- ``mesh memories USER delete MEMORY_ID`` or ``delete --all`` (every long-term memory of the user: ltm's
  ``delete_user``; ``mesh delete-user`` also removes the conversation store).

``--json`` prints the reply's data for scripts.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
from typing import Any

from mesh.client import LtmCall, ltm_ok, run_ltm_command
from shared.contracts import LTMResponse, Memory, new_id
from shared.contracts.messages import (
    DeleteData,
    DeleteRequest,
    DeleteUserRequest,
    ListData,
    ListRequest,
    RequestEnvelope,
    SearchData,
    SearchRequest,
    StatsRequest,
)

Call = LtmCall


async def _ask(call: Call, request: RequestEnvelope, timeout: float = 30.0) -> LTMResponse:
    return ltm_ok(await call(request, timeout))


async def memories_page(call: Call, user_id: str, limit: int = 20, offset: int = 0,
                        types: list[str] | None = None) -> list[Memory]:
    data = ListData.model_validate({"limit": limit, "offset": offset, "types": types})
    return (await _ask(call, ListRequest(request_id=new_id(), type="list", user_id=user_id, data=data))).memories


async def memories_search(call: Call, user_id: str, query: str, limit: int = 10) -> list[Memory]:
    data = SearchData(query=query, limit=limit)
    return (await _ask(call, SearchRequest(request_id=new_id(), type="search", user_id=user_id, data=data))).memories


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("user", help="the user id")
    parser.add_argument("action", nargs="?", default="list", choices=["list", "search", "stats", "delete"])
    parser.add_argument("arg", nargs="?", default=None, help="search: the query; delete: the memory id")
    parser.add_argument("--all", action="store_true", help="delete: every long-term memory of the user")
    parser.add_argument("--limit", type=int, default=20)
    parser.add_argument("--offset", type=int, default=0)
    parser.add_argument("--type", action="append", dest="types", default=None,
                        help="list: only this type (repeatable): preference, fact, commitment, ...")
    parser.add_argument("--json", action="store_true", help="print the reply's data as JSON")


def _line(m: Memory) -> str:
    src = m.source
    where = f"session {src.session_id}, message {src.message_id}" if src and src.session_id else "added"
    return f"{m.memory_id}  [{m.type}] {m.content}\n    ({where}; confidence {m.confidence:.2f})"


async def _run(args: argparse.Namespace) -> int:
    if args.action == "search" and not args.arg:
        print("mesh memories USER search QUERY: give a query", file=sys.stderr)
        return 2
    if args.action == "delete" and (args.arg is None) == (not args.all):
        print("mesh memories USER delete: give a MEMORY_ID or --all", file=sys.stderr)
        return 2

    async def body(call: Call) -> int:
        out: Any
        if args.action in ("list", "search"):
            found = (await memories_page(call, args.user, args.limit, args.offset, args.types)
                     if args.action == "list" else await memories_search(call, args.user, args.arg, args.limit))
            out = [m.model_dump() for m in found]
            text = "\n".join(_line(m) for m in found) or "no memories"
        elif args.action == "stats":
            out = (await _ask(call, StatsRequest(request_id=new_id(), type="stats", user_id=args.user))).data
            text = json.dumps(out, indent=1)
        elif args.all:
            out = (await _ask(call, DeleteUserRequest(request_id=new_id(), type="delete_user", user_id=args.user),
                              60.0)).data
            text = f"deleted every long-term memory of {args.user}: {json.dumps((out or {}).get('deleted'))}"
        else:
            out = (await _ask(call, DeleteRequest(request_id=new_id(), type="delete", user_id=args.user,
                                                  data=DeleteData(memory_id=args.arg)))).data
            text = f"deleted {args.arg}"
        print(json.dumps(out, indent=1, default=str) if args.json else text)
        return 0

    return await run_ltm_command(f"memories {args.action}", body)


def run(args: argparse.Namespace) -> int:
    return asyncio.run(_run(args))
