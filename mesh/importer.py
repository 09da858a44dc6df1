"""``python -m mesh import FILE [--user USER] [--batch N] [--timeout S]``: load a chat history into the mesh.

The history of ONE user goes over ``memory_requests`` as ``import_messages`` batches (docs/contract-memory.md):
the memory service stores each turn with its own timestamp, rebuilds each session's STM and emits a MemoryUpdate
per new turn, so ltm learns from it as from live chat. Importing the same file again adds nothing.

FILE is JSON or JSON Lines, in one of three shapes:

- ``{"user_id": "u1", "sessions": [{"session_id": "s1", "date": "2023/05/20 (Sat) 10:01",
  "messages": [{"role": "user", "content": "...", "timestamp": 1684576860.0}, ...]}, ...]}``
- ``{"user_id": "u1", "messages": [<message>, ...]}`` or a plain list ``[<message>, ...]``
- JSON Lines: one ``<message>`` per line.

A message is ``{"session_id", "role": "user"|"assistant" (or "human"|"ai"|"system"), "content",
"timestamp" (epoch seconds) or "date", "message_id"?, "meta"?}``; inside ``sessions`` the session id comes from
the session. ``date`` is ISO 8601 (UTC unless it names a zone) or LongMemEval's ``2023/05/20 (Sat) 10:01``. A turn
with no time of its own gets its session's ``date``/``timestamp`` plus its position in seconds, so turns keep
their order. ``--user`` sets (or overrides) the user. Turns with empty content are skipped and counted.

:func:`import_history` is the same import as a function, for evaluations that load a history per question.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import re
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import redis.asyncio as aioredis
from pydantic import ValidationError

from shared.contracts import MEMORY_RESPONSE, MemoryResponse, Names, new_id
from shared.contracts.memory_api import ImportMessage, ImportMessagesData, ImportMessagesRequest, ImportResult
from shared.runtime.metrics import Metrics
from shared.runtime.requests import RpcClient, Unavailable

DEFAULT_BATCH = 500  # the service's default MEMORY_IMPORT_MAX_BATCH
DEFAULT_MAX_BYTES = 4 * 1024 * 1024  # per request, well under the service's MEMORY_IMPORT_MAX_BYTES (16 MiB)
_LME_DATE = re.compile(r"^(\d{4})/(\d{2})/(\d{2})\s*(?:\([A-Za-z]{3}\))?\s*(\d{1,2}):(\d{2})$")


class ImportFailed(Exception):
    """The memory service refused a batch (``code`` is the contract's error code)."""

    def __init__(self, code: str, message: str, batch: int) -> None:
        super().__init__(f"batch {batch}: {code}: {message}")
        self.code, self.message, self.batch = code, message, batch


@dataclass(slots=True)
class ImportTotals:
    user_id: str
    messages: int = 0  # sent
    imported: int = 0
    duplicates: int = 0
    sessions: int = 0  # distinct sessions sent
    updates_published: int = 0
    batches: int = 0
    skipped: int = 0  # empty turns of the file, not sent (set by the CLI)
    seconds: float = 0.0
    session_ids: set[str] = field(default_factory=set, repr=False)

    @property
    def per_second(self) -> float:
        return self.messages / self.seconds if self.seconds > 0 else 0.0

    def as_dict(self) -> dict[str, Any]:
        out = {k: v for k, v in asdict(self).items() if k != "session_ids"}
        out["messages_per_s"] = round(self.per_second, 1)
        out["seconds"] = round(self.seconds, 3)
        return out


# --------------------------------------------------------------------------- the import
def batches(messages: Sequence[ImportMessage], size: int, max_bytes: int) -> list[list[ImportMessage]]:
    """Batches of at most ``size`` messages and about ``max_bytes`` of JSON, each session whole where it fits.

    Sessions come in the order of their first turn, each one's turns in the given order; a session larger than
    a batch is split into consecutive batches. Whole sessions are rebuilt (STM) once, and a session's turns
    are stored in order even if batches were ever sent concurrently.
    """
    sessions: dict[str, list[ImportMessage]] = {}
    for m in messages:
        sessions.setdefault(m.session_id, []).append(m)
    out: list[list[ImportMessage]] = []
    current: list[ImportMessage] = []
    used = 0
    for turns in sessions.values():
        costs = [len(m.model_dump_json().encode()) + 1 for m in turns]
        if current and (len(current) + len(turns) > size or used + sum(costs) > max_bytes):
            out.append(current)
            current, used = [], 0
        for m, cost in zip(turns, costs, strict=True):
            if current and (len(current) >= size or used + cost > max_bytes):
                out.append(current)
                current, used = [], 0
            current.append(m)
            used += cost
    if current:
        out.append(current)
    return out


async def import_history(redis: aioredis.Redis, names: Names, user_id: str,
                         messages: Sequence[ImportMessage | dict[str, Any]], *, batch: int = DEFAULT_BATCH,
                         timeout: float = 120.0, max_bytes: int = DEFAULT_MAX_BYTES,
                         progress: Callable[[int], object] | None = None,
                         rpc: RpcClient[MemoryResponse] | None = None) -> ImportTotals:
    """Import one user's past turns; returns the totals. Raises :class:`ImportFailed` on a refused batch.

    Messages are sorted by timestamp (stable) and sent in batches of ``batch`` messages at most, one session whole
    per batch where it fits (:func:`batches`).
    Batches already sent stay imported when a later one fails; sending everything again is safe (duplicates are
    skipped by message id). Session ids name sessions of this user: a session id another user holds fails its
    batch, so when loading many users' histories (one per evaluation question), make session ids unique per user.
    ``progress(n)`` is called after each batch with its number of messages. Pass ``rpc`` to reuse a started
    client of ``memory_requests``; otherwise one is made for the call.
    """
    parsed = [m if isinstance(m, ImportMessage) else ImportMessage.model_validate(m) for m in messages]
    parsed.sort(key=lambda m: m.timestamp)
    totals = ImportTotals(user_id=user_id)
    own = rpc is None
    client = rpc or RpcClient(redis, queue=names.memory_requests,
                              reply_channel=names.reply_channel(names.memory_responses, new_id()[:12]),
                              adapter=MEMORY_RESPONSE, metrics=Metrics())
    started = time.perf_counter()
    try:
        if own:
            await client.start()
        for i, chunk in enumerate(batches(parsed, batch, max_bytes)):
            request = ImportMessagesRequest(request_id=new_id(), type="import_messages", user_id=user_id,
                                            data=ImportMessagesData(messages=chunk))
            resp = await client.call(request, timeout)
            if not resp.success:
                err = resp.error
                raise ImportFailed(err.code.value if err else "internal", err.message if err else "no detail", i)
            result = ImportResult.model_validate(resp.data or {})
            totals.batches += 1
            totals.messages += len(chunk)
            totals.imported += result.imported
            totals.duplicates += result.duplicates
            totals.updates_published += result.updates_published
            totals.session_ids.update(m.session_id for m in chunk)
            totals.sessions = len(totals.session_ids)
            if progress is not None:
                progress(len(chunk))
    finally:
        totals.seconds = time.perf_counter() - started
        if own:
            await client.close()
    return totals


# --------------------------------------------------------------------------- the file
def parse_time(value: Any) -> float:
    """Epoch seconds from a number, an ISO 8601 string (UTC unless zoned) or LongMemEval's date."""
    if isinstance(value, bool):
        raise ValueError("a time must be a number or a date string")
    if isinstance(value, int | float):
        return float(value)
    if isinstance(value, str):
        text = value.strip()
        match = _LME_DATE.match(text)
        if match:
            y, mo, d, h, mi = (int(g) for g in match.groups())
            return datetime(y, mo, d, h, mi, tzinfo=UTC).timestamp()
        try:
            parsed = datetime.fromisoformat(text)
        except ValueError:
            raise ValueError(f"unreadable date {text[:40]!r} (ISO 8601 or 'YYYY/MM/DD (Day) HH:MM')") from None
        return (parsed if parsed.tzinfo else parsed.replace(tzinfo=UTC)).timestamp()
    raise ValueError("a time must be a number or a date string")


def _time_of(obj: dict[str, Any]) -> float | None:
    for key in ("timestamp", "date"):
        if obj.get(key) is not None:
            return parse_time(obj[key])
    return None


def load_history(path: Path, user: str | None = None) -> tuple[str, list[ImportMessage], int]:
    """(user_id, messages, empty turns skipped) from a history file (formats in the module doc)."""
    text = path.read_text(encoding="utf-8")
    try:
        doc: Any = json.loads(text)
    except json.JSONDecodeError:
        doc = [json.loads(line) for line in text.splitlines() if line.strip()]  # JSON Lines
    file_user: str | None = None
    raw: list[tuple[dict[str, Any], str | None, float | None, int]] = []  # message, session, session time, position
    if isinstance(doc, dict):
        file_user = doc.get("user_id")
        if isinstance(doc.get("sessions"), list):
            for s in doc["sessions"]:
                if not isinstance(s, dict) or not isinstance(s.get("messages"), list):
                    raise ValueError("each entry of 'sessions' needs a 'messages' list")
                base = _time_of(s)
                raw.extend((m, s.get("session_id"), base, i) for i, m in enumerate(s["messages"]))
        elif isinstance(doc.get("messages"), list):
            raw = [(m, None, None, i) for i, m in enumerate(doc["messages"])]
        else:
            raise ValueError("a JSON object needs 'sessions' or 'messages'")
    elif isinstance(doc, list):
        raw = [(m, None, None, i) for i, m in enumerate(doc)]
    else:
        raise ValueError("the file must hold a JSON object, a JSON list or JSON Lines")
    user_id = user or file_user
    if not user_id:
        raise ValueError("no user: give --user or a top-level 'user_id'")
    out: list[ImportMessage] = []
    skipped = 0
    for n, (m, session_id, base, position) in enumerate(raw):
        if not isinstance(m, dict):
            raise ValueError(f"message {n} is not a JSON object")
        if not user and m.get("user_id") not in (None, user_id):
            raise ValueError(f"message {n} names another user: a file holds one user's history")
        if not str(m.get("content") or "").strip():
            skipped += 1
            continue
        ts = _time_of(m)
        if ts is None:
            if base is None:
                raise ValueError(f"message {n} has no timestamp or date (nor has its session)")
            ts = base + position
        fields = {k: m[k] for k in ("message_id", "role", "content", "meta") if m.get(k) is not None}
        try:
            out.append(ImportMessage.model_validate({**fields, "session_id": m.get("session_id") or session_id,
                                                     "timestamp": ts}))
        except ValidationError as exc:
            problems = "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}"
                                 for e in exc.errors(include_input=False, include_url=False)[:3])
            raise ValueError(f"message {n}: {problems}") from None
    return user_id, out, skipped


# --------------------------------------------------------------------------- the command
def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("file", type=Path, help="history file: JSON or JSON Lines (see `mesh/importer.py`)")
    parser.add_argument("--user", default=None, help="user id (default: the file's user_id)")
    parser.add_argument("--batch", type=int, default=DEFAULT_BATCH,
                        help=f"messages per request (default {DEFAULT_BATCH}, the service's MEMORY_IMPORT_MAX_BATCH)")
    parser.add_argument("--timeout", type=float, default=120.0, help="seconds to wait for each batch (default 120)")


async def _run(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    from mesh.client import stack_urls
    from shared.runtime.runner import redis_client

    try:
        user_id, messages, skipped = load_history(args.file, args.user)
    except (OSError, ValueError) as exc:
        print(f"mesh import: {args.file}: {exc}")
        return 2
    redis = redis_client(stack_urls()["REDIS_URL"])
    bar = tqdm(total=len(messages), desc="import", unit="msg")
    try:
        totals = await import_history(redis, Names.from_env(), user_id, messages, batch=max(1, args.batch),
                                      timeout=args.timeout, progress=bar.update)
    except ImportFailed as exc:
        print(f"mesh import: refused: {exc} (earlier batches are imported; a re-run skips them)")
        return 1
    except (TimeoutError, Unavailable):
        print(f"mesh import: no reply within {args.timeout:.0f}s (is the memory service running? `make up`)")
        return 1
    finally:
        bar.close()
        await redis.aclose()
    totals.skipped = skipped
    print(f"user {user_id}: {totals.imported} messages imported, {totals.duplicates} already there, "
          f"{totals.sessions} sessions, {totals.updates_published} memory updates, {skipped} empty turns skipped "
          f"({totals.per_second:.0f} messages/s)")
    print(json.dumps(totals.as_dict()))
    return 0


def run(args: argparse.Namespace) -> int:
    try:
        return asyncio.run(_run(args))
    except KeyboardInterrupt:
        return 130
