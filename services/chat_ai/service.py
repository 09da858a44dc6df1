"""The chat-ai worker: reads user input, asks ltm (bounded wait), builds the prompt, replies."""

from __future__ import annotations

import asyncio
import time
import uuid

import redis.asyncio as aioredis
import structlog
from pydantic import ValidationError

from services.chat_ai.config import ChatSettings
from services.chat_ai.prompt import MemoryBlock, build_messages, prompt_block
from services.chat_ai.recall_limit import RecallLimit
from services.chat_ai.responder import Reply, llm_reply, offline_reply
from shared.contracts import (
    LTM_RESPONSE,
    USER_INPUT,
    AIResponse,
    AIResponseMeta,
    LTMResponse,
    Memory,
    Names,
    SearchRequest,
    UserInput,
    decode,
    derive_id,
    encode,
    new_id,
)
from shared.contracts.memory_api import MEMORY_RESPONSE, GetStmRequest, MemoryResponse, SessionRef, StmInfo
from shared.contracts.messages import (
    DEFAULT_MAX_CONTENT_BYTES,
    DocPassage,
    DocSearchData,
    DocSearchRequest,
    DocSearchResult,
    LtmStatus,
    PingRequest,
    SearchData,
)
from shared.contracts.ping import CHAT_REQUEST, ChatRequest, PingInfo, PingResponse
from shared.runtime import heap, prom
from shared.runtime.llm import ChatModel, chat_model
from shared.runtime.logging import content, get_logger
from shared.runtime.metrics import Metrics
from shared.runtime.requests import NotSubscribed, RequestServer, RpcClient, Unavailable
from shared.runtime.stm import Stm, Turn, read_stm
from shared.runtime.streams import StreamConsumer, leave_intake

log = get_logger(__name__)


class ChatService:
    def __init__(self, settings: ChatSettings, names: Names, redis: aioredis.Redis,
                 llm: ChatModel | None = None, metrics: Metrics | None = None) -> None:
        self.settings, self.names, self.redis, self.llm = settings, names, redis, llm
        self.metrics = metrics or Metrics(redis, names.metrics("chat_ai"))
        self.instance = uuid.uuid4().hex[:12]
        self.ltm: RpcClient[LTMResponse] = RpcClient(
            redis, queue=names.ltm_requests, reply_channel=names.reply_channel(names.ltm_responses, self.instance),
            adapter=LTM_RESPONSE, metrics=self.metrics,
        )
        # STM rebuilds: memory is the only STM writer, so a reader that finds none asks memory for it.
        self.memory: RpcClient[MemoryResponse] = RpcClient(
            redis, queue=names.memory_requests,
            reply_channel=names.reply_channel(names.memory_responses, self.instance),
            adapter=MEMORY_RESPONSE, metrics=self.metrics,
        )
        self._recall_timeouts = 0  # memory searches in a row that got no reply in time (a reply resets it)
        self.recall_limit = RecallLimit(settings.chat_recall_concurrency, settings.ltm_timeout_ms / 1000)
        self._recalling = 0  # turns waiting for their memory search now
        self.consumer = StreamConsumer(
            redis, stream=names.user_input, group=names.chat_group, consumer=settings.consumer_name,
            handler=self._on_user_input, metrics=self.metrics, concurrency=settings.chat_concurrency,
            claim_idle_ms=settings.claim_idle_ms, max_deliveries=settings.max_deliveries,
            retention_s=settings.stream_retention_s or None, drain_s=settings.shutdown_grace_s, operation="reply",
            intake=self._recall_intake if self._asks_ltm else None,
        )
        # chat_requests: only ``ping``, served once the reply subscriptions are up (mesh up waits for it)
        self.requests: RequestServer[ChatRequest] = RequestServer(
            redis, queue=names.chat_requests, reply_channel=names.chat_responses, adapter=CHAT_REQUEST,
            handler=self._ping, error_reply=PingResponse.failure, metrics=self.metrics,
            max_content_bytes=settings.max_content_bytes, concurrency=2, drain_s=settings.shutdown_grace_s,
            slow_ms=settings.request_slow_ms,
        )
        self.started_at = time.time()
        self._stop = asyncio.Event()
        self.ready = asyncio.Event()  # set once the reply subscriptions are up

    @property
    def _asks_ltm(self) -> bool:
        return self.settings.enable_ltm or self.settings.enable_rag

    def _recall_intake(self) -> int:
        """How many turns may wait for ltm at once: a turn's first stage ends when its memories are in (or its wait
        is over). At most CHAT_RECALL_CONCURRENCY, fewer while ltm answers slowly (services/chat_ai/recall_limit.py).
        While ltm is silent, no limit: queueing turns behind timeouts would only delay them. Silent = the last
        CHAT_RECALL_CONCURRENCY memory searches failed (timed out or found no reply subscription) and nothing at all
        came back from ltm, not even a late reply, for LTM_TIMEOUT_MS; an overloaded ltm still answers, late or to
        the newest requests, and keeps the limit."""
        s = self.settings
        if (self._recall_timeouts >= s.chat_recall_concurrency
                and time.monotonic() - self.ltm.last_reply > s.ltm_timeout_ms / 1000):
            return s.chat_concurrency
        return self.recall_limit.limit

    async def run(self) -> None:
        if self._asks_ltm:
            await self.ltm.start()
        if self.settings.memory_stm_timeout_ms:
            await self.memory.start()
        metrics_task = asyncio.create_task(self.metrics.run(self._stop, self.settings.metrics_flush_s))
        requests_task = asyncio.create_task(self.requests.run(), name="chat_ai.requests")
        heap.freeze_startup()  # what start-up loaded stays out of every garbage collection
        self.ready.set()
        log.info("chat_ai.ready", ltm=self.settings.enable_ltm, model=self.llm.name if self.llm else "offline")
        try:
            await self.consumer.run()
        finally:
            self._stop.set()
            self.requests.stop()
            await requests_task
            await metrics_task
            if self._asks_ltm:
                await self.ltm.close()
            if self.settings.memory_stm_timeout_ms:
                await self.memory.close()

    def stop(self) -> None:
        self._stop.set()
        self.consumer.stop()
        self.requests.stop()

    async def _ping(self, req: PingRequest) -> PingResponse:
        info = PingInfo.now("chat_ai", self.settings.consumer_name, self.llm.name if self.llm else "offline",
                            self.started_at, enable_ltm=self.settings.enable_ltm, enable_rag=self.settings.enable_rag,
                            stm_rebuild=bool(self.settings.memory_stm_timeout_ms))
        return PingResponse(request_id=req.request_id, user_id=req.user_id, data=info.model_dump())

    async def _on_user_input(self, entry_id: str, raw: bytes | str | None) -> None:
        msg = decode(USER_INPUT, raw, max_content_bytes=self.settings.max_content_bytes, entry_id=entry_id)
        structlog.contextvars.bind_contextvars(user_id=msg.user_id, message_id=msg.message_id)
        try:
            await self.answer(msg)
        finally:
            structlog.contextvars.unbind_contextvars("user_id", "message_id")

    async def recall(self, msg: UserInput) -> tuple[list[Memory], LtmStatus]:
        """Ask ltm, waiting at most LTM_TIMEOUT_MS; never fails the turn."""
        if not self.settings.enable_ltm or not msg.user_id:
            return [], "disabled"
        # other sessions only (the STM holds this one), "now" = the turn's own time, results within the
        # block's budget (the block's labels cost a little more; memory_block enforces the exact bound)
        request = SearchRequest(request_id=new_id(), type="search", user_id=msg.user_id, data=SearchData(
            query=msg.content, limit=self.settings.ltm_top_k, exclude_session_id=msg.session_id, now=msg.timestamp,
            max_tokens=self.settings.ltm_prompt_tokens, turn_tokens=self.settings.ltm_turn_tokens, source_turns=True))
        resp = await self._ask_ltm(request, "ltm_error", recall=True)
        if isinstance(resp, str):
            return [], resp
        return resp.memories, ("hit" if resp.memories else "miss")

    async def _ask_ltm(self, request: SearchRequest | DocSearchRequest, event: str,
                       recall: bool = False) -> LTMResponse | LtmStatus:
        """One ltm request within LTM_TIMEOUT_MS: its successful reply, or what the turn records instead
        (``timeout``: no reply in time, or no reply subscription for the whole wait; ``error``: logged as
        ``chat_ai.<event>``); never raises, so the turn goes on without it. ``recall``: the turn's memory search,
        whose failed waits in a row :meth:`_recall_intake` counts (doc_search's are not)."""
        asked = time.monotonic()
        self._recalling += recall
        try:
            resp = await self.ltm.call(request, self.settings.ltm_timeout_ms / 1000)
        except (TimeoutError, NotSubscribed):
            if recall:
                self._recall_timeouts += 1
                self._record_recall(None)
            return "timeout"
        except Unavailable:  # Redis failed the send
            return "error"
        finally:
            self._recalling -= recall
        if recall:
            self._recall_timeouts = 0
            self._record_recall(time.monotonic() - asked, self._recalling + 1)
        if not resp.success:
            log.warning(f"chat_ai.{event}", error=resp.error.model_dump() if resp.error else None)
            return "error"
        return resp

    def _record_recall(self, seconds: float | None, waiting: int = 0) -> None:
        cuts = self.recall_limit.cuts
        self.recall_limit.record(seconds, waiting)
        if self.recall_limit.cuts != cuts:
            self.metrics.incr("recall.limit_cut")
            log.info("chat_ai.recall_limit_cut", limit=self.recall_limit.limit,
                     waited_ms=None if seconds is None else round(seconds * 1000, 1))

    async def recall_docs(self, msg: UserInput) -> tuple[list[DocPassage], LtmStatus]:
        """ENABLE_RAG: the passages of the user's documents for this turn, waiting at most LTM_TIMEOUT_MS (run beside
        :meth:`recall`); never fails the turn, and its failure never costs the memories."""
        if not self.settings.enable_rag or not msg.user_id:
            return [], "disabled"
        request = DocSearchRequest(request_id=new_id(), type="doc_search", user_id=msg.user_id, data=DocSearchData(
            query=msg.content, top_k=self.settings.rag_top_k, max_tokens=self.settings.ltm_prompt_tokens))
        resp = await self._ask_ltm(request, "doc_search_error")
        if isinstance(resp, str):
            return [], resp
        try:
            passages = DocSearchResult.model_validate(resp.data or {}).passages
        except ValidationError:  # a reply of another shape (an older ltm): the memories still go in
            log.warning("chat_ai.doc_search_unreadable")
            return [], "error"
        return passages, ("hit" if passages else "miss")

    async def load_stm(self, msg: UserInput) -> Stm:
        """The session's STM from Redis; if Redis has none, memory's rebuild (bounded wait, never fails the turn)."""
        stm = await read_stm(self.redis, self.names, msg.session_id)
        if not stm.readable_by(msg.user_id):
            # another user's session (or an input without a user naming one): answer as if it were new
            self.metrics.incr("stm.foreign_session")
            log.warning("chat_ai.foreign_session")
            return Stm()
        if stm.exists or not msg.user_id or not self.settings.memory_stm_timeout_ms:
            return stm
        request = GetStmRequest(request_id=new_id(), type="get_stm", user_id=msg.user_id,
                                data=SessionRef(session_id=msg.session_id))
        try:
            resp = await self.memory.call(request, self.settings.memory_stm_timeout_ms / 1000)
        except (TimeoutError, Unavailable):
            self.metrics.incr("stm.rebuild_timeout")
            return stm
        if not resp.success or not resp.data:
            return stm  # not_found: a new session, nothing stored yet
        info = StmInfo.model_validate(resp.data["stm"])
        self.metrics.incr("stm.rebuilt_by_memory")
        return Stm(turns=[Turn(t.message_id, t.role, t.content, t.timestamp) for t in info.turns],
                   summary=info.summary, summary_kind=info.summary_kind, exists=True)

    async def answer(self, msg: UserInput) -> None:
        # per user: another user's input reusing a message id is a different turn (answered, never taken for a
        # redelivery of the first); the reply's id is derived the same way. In the ai_responses stream's slot.
        done_key = self.names.reply_dedup(msg.user_id or "", msg.message_id, "done")
        claim = await self._claim_turn(done_key, msg)
        if claim is None:
            self.metrics.incr("duplicate_inputs")
            return
        try:
            await self._answer(msg, done_key, claim[0])  # the reply's transaction also drops the claim
        except BaseException:  # failed: another delivery of this input may answer it now
            await self._release_turn(claim)
            raise

    async def _claim_turn(self, done_key: str, msg: UserInput) -> tuple[str, str] | None:
        """The right to answer this input, or None when it was answered already. Two deliveries of one input at
        once (a client that sent it twice, a replayed dead letter, in one process or two) must give one reply:
        the first takes ``answering`` with SET NX; the other waits until the reply exists (then skips) or the
        claim is gone (its holder failed: then it answers). The claim expires on its own if its holder dies.
        One round trip when nobody else holds it (EXISTS and SET NX pipelined)."""
        claim_key = self.names.reply_dedup(msg.user_id or "", msg.message_id, "answering")
        token = new_id()
        ttl_ms = int((self.settings.llm_timeout_s + self.settings.ltm_timeout_ms / 1000 + 30) * 1000)
        while True:
            async with self.redis.pipeline(transaction=False) as pipe:
                pipe.exists(done_key)
                pipe.set(claim_key, token, nx=True, px=ttl_ms)
                answered, claimed = await pipe.execute()
            if answered:
                if claimed:
                    await self._release_turn((claim_key, token))
                return None
            if claimed:
                return claim_key, token
            leave_intake()  # waiting for another delivery's answer (its LLM call too) is no wait for ltm
            await asyncio.sleep(0.05)

    async def _release_turn(self, claim: tuple[str, str]) -> None:
        key, token = claim
        try:
            if await self.redis.get(key) == token.encode():
                await self.redis.delete(key)
        except Exception:  # the claim expires on its own
            log.warning("chat_ai.release_failed", exc_info=True)

    async def _answer(self, msg: UserInput, done_key: str, claim_key: str) -> None:
        started = time.perf_counter()
        stm_task = asyncio.create_task(self.load_stm(msg))
        docs_task = asyncio.create_task(self.recall_docs(msg))  # beside the memory search, the same wait
        memories, status = await self.recall(msg)
        ltm_ms = (time.perf_counter() - started) * 1000
        if status != "disabled":  # the wait for long-term memory, as the turn sees it
            prom.RETRIEVAL_MS.labels("chat_ai", status).observe(ltm_ms)
        passages, docs = await docs_task
        leave_intake()  # the wait for ltm is over: the consumer may take the next input in this one's place
        stm = await stm_task
        ready_ms = (time.perf_counter() - started) * 1000  # memories, passages and STM in hand
        s = self.settings
        block = prompt_block(memories, passages, s.ltm_prompt_tokens, s.ltm_turn_tokens, s.rag_prompt_tokens)
        generating = time.perf_counter()
        reply = await self._generate(msg, block, stm)
        llm_ms = (time.perf_counter() - generating) * 1000
        response = AIResponse(
            message_id=derive_id("reply", msg.user_id or "", msg.message_id), in_reply_to=msg.message_id,
            user_id=msg.user_id, session_id=msg.session_id, content=reply.text,
            meta=AIResponseMeta(ltm=status, memories_used=len(block.entries), model=reply.model,
                                latency_ms=round((time.perf_counter() - started) * 1000, 2), docs=docs,
                                passages_used=len(block.passages)),
        )
        async with self.redis.pipeline(transaction=True) as pipe:
            pipe.xadd(self.names.ai_responses, {"data": encode(response)}, maxlen=self.settings.ai_responses_maxlen,
                      approximate=True)
            pipe.set(done_key, response.message_id, ex=self.settings.reply_dedup_ttl_s)
            pipe.delete(claim_key)
            await pipe.execute()
        self.metrics.incr(f"replies.ltm_{status}")
        if docs != "disabled":
            self.metrics.incr(f"replies.docs_{docs}")
        log.info("chat_ai.replied", ltm=status, memories=len(memories), docs=docs, passages=len(block.passages),
                 model=reply.model, latency_ms=response.meta.latency_ms, ltm_ms=round(ltm_ms, 1),
                 ready_ms=round(ready_ms, 1), llm_ms=round(llm_ms, 1), content=content(msg.content))

    async def _generate(self, msg: UserInput, block: MemoryBlock, stm: Stm) -> Reply:
        # the AIResponse is checked against the default limit; readers decode it with MAX_CONTENT_BYTES
        limit = min(self.settings.max_content_bytes, DEFAULT_MAX_CONTENT_BYTES)
        if self.llm is None:
            return offline_reply(msg.content, block, stm, msg.message_id, limit)
        messages = build_messages(self.settings.system_prompt, block, stm, msg.content, msg.message_id)
        try:
            return await llm_reply(self.llm, messages, self.settings.llm_max_tokens)
        except Exception as exc:  # noqa: BLE001 - a failing LLM must not lose the turn
            self.metrics.incr("llm_errors")
            log.warning("chat_ai.llm_failed", error=f"{type(exc).__name__}: {exc}")
            fallback = offline_reply(msg.content, block, stm, msg.message_id, limit)
            return Reply(text=fallback.text, model=f"offline (llm error: {type(exc).__name__})")


async def main(stop: asyncio.Event) -> None:
    from shared.runtime.logging import configure_logging
    from shared.runtime.runner import redis_client, serve_until, tune_process

    settings = ChatSettings()
    configure_logging("chat_ai", settings.log_level, settings.log_format, settings.log_content)
    tune_process(settings)
    names = Names.from_env()
    redis = redis_client(settings.redis_url, settings.redis_cluster)
    llm = chat_model(settings.openai_api_key, settings.openai_base_url, settings.llm_model, settings.llm_timeout_s,
                     service="chat_ai")
    try:
        service = ChatService(settings, names, redis, llm)
        with prom.metrics_endpoint(settings.metrics_port, settings.metrics_host, settings.redis_url, names,
                                   cluster=settings.redis_cluster):
            await serve_until(stop, service.run(), service.stop)
    finally:
        await redis.aclose()
