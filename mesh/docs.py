"""``mesh docs add|search|delete``: a user's document collection, over the bus (ltm's doc_add, doc_search,
doc_delete on ``ltm_requests``), as any client would use it.

- ``mesh docs add PATH... --user USER``: text, Markdown (.md) and HTML (.html) files, one line each as they are
  stored (created, updated or unchanged, chunks, doc_id); a directory adds its files of those kinds.
- ``mesh docs search --user USER QUERY``: the passages, best first, each with its document, headings and score.
- ``mesh docs delete --user USER DOC_ID`` or ``--all``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
from collections.abc import Awaitable, Callable, Iterable
from pathlib import Path

from mesh.client import LtmRefused, ltm_ok, run_ltm_command
from shared.contracts import LTMResponse, new_id
from shared.contracts.messages import (
    DocAddData,
    DocAdded,
    DocAddRequest,
    DocDeleted,
    DocDeleteData,
    DocDeleteRequest,
    DocPassage,
    DocSearchData,
    DocSearchRequest,
    DocSearchResult,
    RequestEnvelope,
)

SUFFIXES = (".txt", ".text", ".md", ".markdown", ".html", ".htm")
Call = Callable[[RequestEnvelope, float], Awaitable[LTMResponse]]


def _ok(resp: LTMResponse) -> dict[str, object]:
    return dict(ltm_ok(resp).data or {})


def files(paths: Iterable[Path]) -> list[Path]:
    """The files named, and the text, Markdown and HTML files of the directories named (sorted)."""
    out: list[Path] = []
    for path in paths:
        if path.is_dir():
            out.extend(sorted(p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in SUFFIXES))
        else:
            out.append(path)
    return out


async def add(call: Call, user_id: str, path: Path, *, source: str | None = None, timeout: float = 120.0) -> DocAdded:
    text = await asyncio.to_thread(path.read_text, encoding="utf-8")
    data = DocAddData(source=source or str(path), text=text)
    resp = await call(DocAddRequest(request_id=new_id(), type="doc_add", user_id=user_id, data=data), timeout)
    return DocAdded.model_validate(_ok(resp))


async def search(call: Call, user_id: str, query: str, top_k: int = 5, timeout: float = 30.0) -> list[DocPassage]:
    resp = await call(DocSearchRequest(request_id=new_id(), type="doc_search", user_id=user_id,
                                       data=DocSearchData(query=query, top_k=top_k)), timeout)
    return DocSearchResult.model_validate(_ok(resp)).passages


async def delete(call: Call, user_id: str, doc_id: str | None, timeout: float = 30.0) -> DocDeleted:
    data = DocDeleteData(all=True) if doc_id is None else DocDeleteData(doc_id=doc_id)
    resp = await call(DocDeleteRequest(request_id=new_id(), type="doc_delete", user_id=user_id, data=data), timeout)
    return DocDeleted.model_validate(_ok(resp))


def configure(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="docs_command", required=True, metavar="add|search|delete")
    a = sub.add_parser("add", help="add text, Markdown and HTML files (a directory: its files of those kinds)")
    a.add_argument("paths", nargs="+", type=Path, metavar="PATH")
    a.add_argument("--user", required=True, help="the user whose collection it is")
    a.add_argument("--timeout", type=float, default=120.0, help="seconds to wait for each file (default 120)")
    s = sub.add_parser("search", help="the passages of the user's documents that answer QUERY, best first")
    s.add_argument("query", metavar="QUERY")
    s.add_argument("--user", required=True)
    s.add_argument("--top-k", type=int, default=5)
    s.add_argument("--json", action="store_true", help="print the passages as JSON")
    d = sub.add_parser("delete", help="delete one document (DOC_ID) or every document of the user (--all)")
    d.add_argument("doc_id", nargs="?", metavar="DOC_ID")
    d.add_argument("--all", action="store_true", help="every document of the user")
    d.add_argument("--user", required=True)


async def _add_all(call: Call, args: argparse.Namespace) -> int:
    found = files(args.paths)
    if not found:
        print("mesh docs add: no text, Markdown or HTML files there", file=sys.stderr)
        return 1
    failed = chunks = 0
    for i, path in enumerate(found, start=1):
        try:
            added = await add(call, args.user, path, timeout=args.timeout)
        except (OSError, UnicodeDecodeError, LtmRefused, TimeoutError, ValueError) as exc:
            failed += 1
            print(f"[{i}/{len(found)}] {path}: failed: {exc}", flush=True)
            continue
        chunks += added.chunks
        print(f"[{i}/{len(found)}] {path}: {added.status}, {added.chunks} chunks, {added.format}, "
              f"doc_id {added.doc_id}", flush=True)
    print(f"{len(found) - failed} of {len(found)} documents stored for {args.user} ({chunks} chunks)")
    return 1 if failed else 0


async def _run(args: argparse.Namespace) -> int:
    if args.docs_command == "delete" and (args.doc_id is None) == (not args.all):
        print("mesh docs delete: give a DOC_ID or --all", file=sys.stderr)
        return 2

    async def body(call: Call) -> int:
        if args.docs_command == "add":
            return await _add_all(call, args)
        if args.docs_command == "search":
            passages = await search(call, args.user, args.query, args.top_k)
            if args.json:
                print(json.dumps([p.model_dump() for p in passages], indent=1))
            for n, p in enumerate([] if args.json else passages, start=1):
                print(f"{n}. [{p.label}] ({p.source}, score {p.score:.2f}, doc_id {p.doc_id})\n   {p.text}\n")
            if not passages and not args.json:
                print("no passage found")
            return 0
        deleted = await delete(call, args.user, None if args.all else args.doc_id)
        print(f"deleted {deleted.documents} documents ({deleted.chunks} chunks) of {args.user}")
        return 0

    return await run_ltm_command(f"docs {args.docs_command}", body)


def run(args: argparse.Namespace) -> int:
    try:
        return asyncio.run(_run(args))
    except KeyboardInterrupt:
        return 130
