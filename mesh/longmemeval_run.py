"""The run behind ``mesh eval longmemeval`` (mesh/eval_longmemeval.py says what is measured).

Stores (reused or started), the recording server, the service processes; then, in one event loop: readiness
over the bus, the import of every haystack, the wait for ingest, and the questions one at a time.
"""

from __future__ import annotations

import asyncio
import json
import os
import time
from collections.abc import Awaitable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from mesh.eval_longmemeval import Question, memory_block, score
from mesh.procs import ServiceProcesses
from mesh.recorder import RecordingServer
from shared.contracts import Names, derive_id, new_id
from shared.contracts.messages import DeleteUserRequest

T = TypeVar("T")
READY_TIMEOUT_S = 300.0
IMPORT_TIMEOUT_S = 600.0
DEFAULT_UPSTREAM = "https://api.openai.com/v1"


@dataclass(frozen=True)
class RunOptions:
    data: Path
    backend: str
    ltm_workers: int
    run_id: str | None
    run_dir: Path | None
    reply_timeout: float
    judge_model: str | None
    use_llm: bool
    memory_embed: bool
    keep: bool
    progress: bool
    prompts: Path
    concurrency: int = 1  # questions in flight at once (each its own user): people asking at the same time


def user_of(q: Question, run_id: str) -> str:
    return f"lme-{q.question_id}-{run_id}"


def import_messages(q: Question, user: str) -> list[dict[str, Any]]:
    """The question's haystack as import_messages entries (ids derived from user, session and turn)."""
    return [{"message_id": derive_id("longmemeval", user, t.session_key, t.index),
             "session_id": f"{user}:{t.session_key}", "role": t.role, "content": t.content,
             "timestamp": t.timestamp, "meta": {}} for t in q.turns]


def service_envs(redis_url: str, database_url: str, prefix: str, recorder_url: str, run_dir: Path,
                 options: RunOptions) -> dict[str, dict[str, str]]:
    """Per service: the environment; memory and ltm never see OPENAI_* (they stay offline)."""
    base = {k: v for k, v in os.environ.items() if not k.startswith("OPENAI_")}
    base.update(REDIS_URL=redis_url, DATABASE_URL=database_url, MESH_KEY_PREFIX=prefix, PYTHONUNBUFFERED="1",
                LOG_FORMAT=os.environ.get("LOG_FORMAT", "json"))
    memory = {**base, "MEMORY_ENCRYPTION_KEY_FILE": str(run_dir / "memory-encryption.key")}
    if not options.memory_embed:
        memory["MEMORY_EMBED_MESSAGES"] = "false"
    return {
        "memory": memory,
        "ltm": {**base, "LTM_BACKEND": options.backend},
        "chat_ai": {**base, "OPENAI_BASE_URL": recorder_url, "OPENAI_API_KEY": "recording-server"},
    }


def evaluate(questions: list[Question], options: RunOptions) -> tuple[list[dict[str, Any]], dict[str, Any],
                                                                      dict[str, Any]]:
    """Run everything; returns (per-question rows, config, ingest figures)."""
    from mesh.eval_locomo import stores
    from mesh.infra import redact_url
    from services.chat_ai.config import ChatSettings
    from services.ltm.config import LtmSettings

    run_id = options.run_id or new_id()[:8]
    run_dir = options.run_dir or Path(".data") / "eval-longmemeval" / run_id
    run_dir.mkdir(parents=True, exist_ok=True)
    llm_env = {k: os.environ[k] for k in ("OPENAI_API_KEY", "OPENAI_BASE_URL") if os.environ.get(k)}
    proxy = options.use_llm and bool(llm_env)
    upstream = llm_env.get("OPENAI_BASE_URL", DEFAULT_UPSTREAM) if proxy else None
    chat, ltm = ChatSettings(openai_api_key=None, openai_base_url=None), LtmSettings()
    judge_model = (options.judge_model or chat.llm_model) if proxy else None
    prefix = f"lme:{run_id}:"
    names = Names.from_env().with_prefix(prefix)
    config: dict[str, Any] = {
        "data": str(options.data), "backend": options.backend, "ltm_workers": options.ltm_workers, "run_id": run_id,
        "run_dir": str(run_dir), "questions": len(questions), "key_prefix": prefix,
        "llm": "proxy" if proxy else "recording", "upstream": upstream, "model": chat.llm_model,
        "judge_model": judge_model, "memory_embed_messages": options.memory_embed, "concurrency": options.concurrency,
        "chat_ai": {k: v for k, v in chat.model_dump().items() if k.startswith(("ltm_", "enable_ltm", "memory_stm"))},
        "ltm": {k: v for k, v in ltm.model_dump().items()
                if k in ("ltm_rank_profile", "ltm_context_turns", "ltm_result_tokens", "ltm_min_similarity",
                         "ltm_extraction", "ltm_ingest_batch", "ltm_ingest_concurrency")},
        "import_batch": _import_batch(),
        "token_unit": "all-MiniLM-L6-v2 WordPiece",
    }
    with stores(f"mesh_lme_{run_id}", options.keep) as (redis_url, database_url), \
            RecordingServer(upstream, llm_env.get("OPENAI_API_KEY")) as rec:
        config["redis_url"], config["database_url"] = redact_url(redis_url), redact_url(database_url)
        envs = service_envs(redis_url, database_url, prefix, rec.url, run_dir, options)
        procs = ServiceProcesses(run_dir)
        try:
            procs.start("memory", "services.memory", envs["memory"])
            for i in range(options.ltm_workers):
                procs.start(f"ltm-{i + 1}", "services.ltm", envs["ltm"])
            procs.start("chat_ai", "services.chat_ai", envs["chat_ai"])
            judge = None
            if proxy:
                from mesh.longmemeval_judge import Judge

                judge = Judge(llm_env.get("OPENAI_API_KEY"), llm_env.get("OPENAI_BASE_URL"), str(judge_model))
            drive = Drive(questions, names, redis_url, procs, rec, options, run_id, judge)
            rows, ingest, pings = asyncio.run(drive.run())
            config["services"] = pings
        finally:
            procs.stop()
            if not options.keep:
                _drop_keys(redis_url, prefix)
    return rows, config, ingest


def _import_batch() -> int:
    try:
        return max(1, int(os.environ.get("MEMORY_IMPORT_MAX_BATCH") or 500))
    except ValueError:
        return 500


def _drop_keys(redis_url: str, prefix: str) -> None:
    """Delete the run's bus names and keys (everything under its prefix)."""
    import redis

    client = redis.Redis.from_url(redis_url)
    try:
        batch = []
        for key in client.scan_iter(match=f"{prefix}*", count=1000):
            batch.append(key)
            if len(batch) >= 500:
                client.delete(*batch)
                batch.clear()
        if batch:
            client.delete(*batch)
    finally:
        client.close()


class Drive:
    """The part of the run that talks over the bus."""

    def __init__(self, questions: list[Question], names: Names, redis_url: str, procs: ServiceProcesses,
                 rec: RecordingServer, options: RunOptions, run_id: str, judge: Any) -> None:
        self.questions, self.names, self.redis_url, self.procs = questions, names, redis_url, procs
        self.rec, self.options, self.run_id, self.judge = rec, options, run_id, judge

    async def run(self) -> tuple[list[dict[str, Any]], dict[str, Any], dict[str, Any]]:
        from mesh.client import MeshClient
        from shared.contracts.memory_api import MEMORY_RESPONSE, MemoryResponse
        from shared.runtime.metrics import Metrics
        from shared.runtime.requests import RpcClient
        from shared.runtime.runner import redis_client

        self.redis = redis_client(self.redis_url)
        self.client = MeshClient(self.redis, self.names)
        self.memory: RpcClient[MemoryResponse] = RpcClient(
            self.redis, queue=self.names.memory_requests,
            reply_channel=self.names.reply_channel(self.names.memory_responses, f"lme-{new_id()[:12]}"),
            adapter=MEMORY_RESPONSE, metrics=Metrics())
        await self.client.ltm.start()
        await self.memory.start()
        try:
            pings = await self.wait_ready()
            ingest = await self.load()
            rows = await self.ask_all()
            if not self.options.keep:
                await self.cleanup()
            return rows, ingest, pings
        finally:
            if self.judge is not None:
                await self.judge.close()
            await self.memory.close()
            await self.client.close()

    async def guarded(self, aw: Awaitable[T]) -> T:
        """Await ``aw``, failing at once (with the service's log) if a service process exits meanwhile."""
        task = asyncio.ensure_future(aw)
        try:
            while True:
                done, _ = await asyncio.wait({task}, timeout=1.0)
                if done:
                    return task.result()
                self.procs.check()
        finally:
            if not task.done():
                task.cancel()
                await asyncio.gather(task, return_exceptions=True)

    # ------------------------------------------------------------------ readiness
    async def wait_ready(self) -> dict[str, Any]:
        """Until memory, chat_ai and every ltm worker (distinct ``instance``) have answered a ping (mesh/ready.py)."""
        import sys

        from mesh.ready import NotReady, Pinger, wait_ready

        def give_up(waiting: list[str]) -> str | None:
            try:
                self.procs.check()
            except RuntimeError as exc:
                return str(exc)
            return None

        print(f"waiting for memory, {self.options.ltm_workers} ltm and chat_ai (logs in {self.procs.log_dir})",
              file=sys.stderr, flush=True)
        try:
            first = await wait_ready(self.redis_url, self.names, ["memory", "ltm", "chat_ai"], READY_TIMEOUT_S,
                                     give_up)
        except NotReady as exc:
            raise RuntimeError(f"services not ready: {exc}") from None
        ltm = {first["ltm"].instance: first["ltm"]}
        deadline = time.monotonic() + READY_TIMEOUT_S
        async with Pinger(self.redis, self.names, ["ltm"]) as pinger:
            while len(ltm) < self.options.ltm_workers:  # blocked workers take turns: N pings reach N copies
                if (reason := give_up([])) or time.monotonic() > deadline:
                    raise RuntimeError(f"{len(ltm)} of {self.options.ltm_workers} ltm workers answered ping: "
                                       f"{reason or 'timed out'}")
                for info in (await pinger.ping_all(2.0, pings=self.options.ltm_workers))["ltm"]:
                    ltm[info.instance] = info
        return {"memory": first["memory"].model_dump(), "chat_ai": first["chat_ai"].model_dump(),
                "ltm": [info.model_dump() for info in ltm.values()]}

    # ------------------------------------------------------------------ import and ingest
    async def load(self) -> dict[str, Any]:
        from tqdm import tqdm

        from mesh.importer import ImportFailed, import_history

        batch = _import_batch()
        total = sum(len(q.turns) for q in self.questions)
        baseline = await self._group_state()
        started = time.perf_counter()
        sums = {"imported": 0, "duplicates": 0, "sessions": 0, "updates_published": 0}
        bar = tqdm(total=total, desc="import", unit="msg", disable=not self.options.progress)
        for q in self.questions:
            user = user_of(q, self.run_id)
            try:
                totals = await self.guarded(import_history(
                    self.redis, self.names, user, import_messages(q, user), batch=batch, timeout=IMPORT_TIMEOUT_S,
                    progress=bar.update, rpc=self.memory))
            except ImportFailed as exc:
                raise RuntimeError(f"import_messages failed for question {q.question_id}: {exc}") from None
            for key in sums:
                sums[key] += int(getattr(totals, key))
        bar.close()
        imported_s = time.perf_counter() - started
        await self.wait_ingested(sums["updates_published"], baseline)
        ingest_s = time.perf_counter() - started
        dead = await self.redis.xlen(Names.dead(self.names.memory_updates))
        return {
            "haystack_turns": total, **sums, "import_s": round(imported_s, 1),
            "import_per_s": round(sums["imported"] / imported_s, 1) if imported_s else 0.0,
            "ingest_s": round(ingest_s, 1),
            "ingest_per_s": round(sums["updates_published"] / ingest_s, 2) if ingest_s else 0.0,
            "ingest_dead_letters": int(dead),
        }

    async def _group_state(self, stream: str | None = None, group: str | None = None) -> dict[str, Any]:
        """XINFO GROUPS of ``stream`` for ``group`` (default: the ltm group on memory_updates); {} if none yet."""
        import redis.exceptions

        stream, group = stream or self.names.memory_updates, group or self.names.ltm_group
        try:
            groups = await self.redis.xinfo_groups(stream)
        except redis.exceptions.ResponseError:
            return {}
        return next((g for g in groups if _text(g.get("name")) == group), {})

    async def drained(self, stream: str, group: str) -> tuple[bool, dict[str, Any]]:
        """Whether ``group`` has read everything in ``stream`` (lag 0) and acknowledged it (pending 0)."""
        state = await self._group_state(stream, group)
        if not state or int(state.get("pending") or 0):
            return False, state
        lag = state.get("lag")
        if lag is not None:
            return int(lag) == 0, state
        info = await self.redis.xinfo_stream(stream)  # Redis < 7, or a lag it cannot tell
        return _entry(state.get("last-delivered-id")) >= _entry(info.get("last-generated-id")), state

    async def wait_ingested(self, expected: int, baseline: dict[str, Any]) -> None:
        """Until the ltm group has read everything (lag 0) and acknowledged it (pending 0); a progress bar."""
        from tqdm import tqdm

        start_read = int(baseline.get("entries-read") or 0)
        bar = tqdm(total=expected, desc="ingest", unit="update", disable=not self.options.progress)
        while True:
            self.procs.check()
            done, group = await self.drained(self.names.memory_updates, self.names.ltm_group)
            pending = int(group.get("pending") or 0)
            bar.update(min(expected, max(0, int(group.get("entries-read") or 0) - start_read - pending)) - bar.n)
            if done:
                break
            await asyncio.sleep(0.5)
        bar.update(expected - bar.n)
        bar.close()

    async def settle(self, timeout: float = 120.0) -> None:
        """Until memory has stored the questions and replies and ltm has ingested what memory published of them."""
        n = self.names
        deadline = time.monotonic() + timeout
        for stream, group in ((n.user_input, n.memory_group), (n.ai_responses, n.memory_group),
                              (n.memory_updates, n.ltm_group)):
            while not (await self.drained(stream, group))[0]:
                self.procs.check()
                if time.monotonic() > deadline:
                    raise TimeoutError(f"group {group} on {stream} still busy after {timeout:.0f}s")
                await asyncio.sleep(0.2)

    # ------------------------------------------------------------------ questions
    async def ask_all(self) -> list[dict[str, Any]]:
        from tqdm import tqdm

        bar = tqdm(total=len(self.questions), desc="questions", unit="q", disable=not self.options.progress)
        at_once = asyncio.Semaphore(self.options.concurrency)

        same_text: dict[str, asyncio.Lock] = {}  # a prompt is found by its question: one such question at a time

        async def one(q: Question) -> tuple[dict[str, Any], str]:
            # a closed loop: the next question is asked as soon as one is answered
            async with same_text.setdefault(q.question, asyncio.Lock()), at_once:
                asked = await self.ask(q)
            bar.update()
            return asked

        asked = await asyncio.gather(*(one(q) for q in self.questions))
        bar.close()
        with self.options.prompts.open("w", encoding="utf-8") as prompts:  # in question order, however answered
            prompts.writelines(line for _, line in asked)
        return [row for row, _ in asked]

    async def ask(self, q: Question) -> tuple[dict[str, Any], str]:
        """The question's row and its prompts.jsonl line."""
        user = user_of(q, self.run_id)
        since = self.rec.count()
        started = time.perf_counter()
        try:
            reply = await self.guarded(self.client.say(q.question, user_id=user, session_id=f"{user}:question",
                                                       timestamp=q.asked_at, timeout=self.options.reply_timeout))
        except TimeoutError:
            reply = None
        wall_ms = round((time.perf_counter() - started) * 1000, 1)
        record = self.rec.find(q.question, since)
        block = memory_block(record.messages) if record else None
        row: dict[str, Any] = {
            "question_id": q.question_id, "question_type": q.question_type, "question": q.question,
            "answer": q.answer, "question_date": q.question_date, "user_id": user, "haystack_turns": len(q.turns),
            **score(q, block), "prompt_recorded": record is not None,
            "ltm": reply.meta.ltm if reply else "no_reply", "memories_used": reply.meta.memories_used if reply else 0,
            "model": reply.meta.model if reply else None, "latency_ms": reply.meta.latency_ms if reply else None,
            "wall_ms": wall_ms if reply else None, "reply": reply.content if reply else None,
        }
        if self.judge is not None and reply is not None:
            verdict = await self.judge.grade(q.question_id, q.question_type, q.question, q.answer, reply.content)
            row["judge"] = {"correct": verdict.correct, "raw": verdict.raw, "error": verdict.error}
        line = json.dumps({
            "question_id": q.question_id, "question_type": q.question_type,
            "messages": record.messages if record else None, "model_reply": record.reply if record else None,
            "status": record.status if record else None, "upstream": record.upstream if record else None,
            "error": record.error if record else None}) + "\n"
        return row, line

    # ------------------------------------------------------------------ cleanup
    async def cleanup(self) -> None:
        """Delete the run's users: long-term memory (delete_user) and their sessions in the conversation store."""
        from shared.contracts.memory_api import DeleteSessionRequest, SessionRef

        await self.settle()  # what the questions set off (stored turns, their updates) must not come back after
        for q in self.questions:
            user = user_of(q, self.run_id)
            await self.guarded(self.client.ltm.call(
                DeleteUserRequest(request_id=new_id(), type="delete_user", user_id=user), 60.0))
            for session in [*q.sessions, "question"]:
                await self.guarded(self.memory.call(DeleteSessionRequest(
                    request_id=new_id(), type="delete_session", user_id=user,
                    data=SessionRef(session_id=f"{user}:{session}")), 60.0))


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def _entry(value: Any) -> tuple[int, int]:
    ms, _, seq = _text(value or "0-0").partition("-")
    try:
        return int(ms), int(seq or 0)
    except ValueError:
        return 0, 0
