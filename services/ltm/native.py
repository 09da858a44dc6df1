"""The native backend: PostgreSQL + pgvector, local embeddings."""

from __future__ import annotations

import asyncio
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Any

import numpy as np
import redis.asyncio as aioredis
from psycopg import AsyncConnection

from services.ltm.backend import NotFound, Unsupported
from services.ltm.config import LtmSettings
from services.ltm.documents import Documents
from services.ltm.extraction import Batcher, Extracted, Extraction, LlmExtractor, RuleExtractor, Turn, ground_dates
from services.ltm.graph import Provenance, TurnKnowledge, entity_names, norm_name, search_entities, write_knowledge
from services.ltm.ingest import VectorCache, from_cache
from services.ltm.lifecycle import Lifecycle, LifecycleConfig
from services.ltm.profile import build_profile
from services.ltm.retrieval import RetrievalConfig, clear_token_cache, token_counts
from services.ltm.salience.infer import SalienceModel, SessionStates, TextTurn, session_key
from services.ltm.store import IngestWrite, LtmStore, MemoryKey, NewMemory, content_hash
from shared.contracts import Memory, MemoryUpdate, Names
from shared.contracts.messages import (
    OFFLINE_REPLY_PREFIX,
    AddData,
    DocAddData,
    DocAdded,
    DocDeleted,
    DocDeleteData,
    DocPassage,
    DocSearchData,
    ListData,
    SearchData,
    SearchEntitiesData,
)
from shared.runtime.carried import Refused, model_id, vector_of
from shared.runtime.embedding import Embedder, SyncEmbedder, dedicated_model
from shared.runtime.errors import is_transient
from shared.runtime.llm import chat_model
from shared.runtime.logging import get_logger
from shared.runtime.metrics import Metrics
from shared.runtime.passes import embed_in_steps, steps, tokens
from shared.runtime.priority import Foreground, background_executor
from shared.runtime.text import is_question

log = get_logger(__name__)

MAX_SPEAKER_CHARS = 200  # a speaker is a name: a longer one is cut (it becomes an entity, and index keys are bounded)


def speaker_of(update: MemoryUpdate) -> str:
    """``meta.speaker``, trimmed and cut to MAX_SPEAKER_CHARS ("" when absent)."""
    return str((update.meta.model_extra or {}).get("speaker") or "").strip()[:MAX_SPEAKER_CHARS].strip()

VECTOR_CACHE = 20_000


def build_extraction(settings: LtmSettings) -> Extraction | None:
    """LTM_EXTRACTION: auto = the LLM when one is configured, else the rules; off = episodic memories only."""
    if settings.ltm_extraction == "off":
        return None
    rules = RuleExtractor()
    llm = None
    if settings.ltm_extraction in ("auto", "llm"):
        model = chat_model(settings.openai_api_key, settings.openai_base_url, settings.llm_model,
                           settings.llm_timeout_s, service="ltm")
        if model is not None:
            llm = LlmExtractor(model, rules, retries=settings.ltm_llm_retries)
        elif settings.ltm_extraction == "llm":
            log.warning("ltm.extraction_llm_unconfigured", using="rules")
    return Extraction(rules, llm, max_batch=settings.ltm_extract_batch,
                      executor=background_executor(settings.background_nice))


def lifecycle_config(settings: LtmSettings) -> LifecycleConfig:
    return LifecycleConfig(
        half_life_days=settings.ltm_decay_half_life_days, consolidate_similarity=settings.ltm_consolidate_similarity,
        consolidate_max=settings.ltm_consolidate_max, memory_budget=settings.ltm_memory_budget,
        cleanup_batch=settings.ltm_cleanup_batch, optimize_interval_s=settings.ltm_optimize_interval_s,
        users_per_run=settings.ltm_optimize_users_per_run, lock_ms=settings.ltm_optimize_lock_ms,
        salience_first=settings.ltm_salience_cleanup, deletions_keep_s=settings.ltm_search_deletions_keep_s,
    )


@dataclass(slots=True)
class Staged:
    """An update between the extraction and the embedding stage of ingest."""

    update: MemoryUpdate
    turn: Turn
    items: list[Extracted]


class NativeBackend:
    name = "native"

    def __init__(self, store: LtmStore, embedder: Embedder, *, settings: LtmSettings | None = None,
                 redis: aioredis.Redis | None = None, names: Names | None = None,
                 extraction: Extraction | None = None, ingest_embedder: Embedder | None = None,
                 query_embedder: Embedder | None = None, foreground: Foreground | None = None) -> None:
        """``redis`` and ``names`` give ``optimize`` and the periodic lifecycle job their lock; without them
        ``optimize`` is refused and the periodic job does not run. ``embedder``: the float model, of every vector
        stored unless LTM_INGEST_INT8; ``query_embedder`` (LTM_QUERY_INT8: its int8 copy) embeds search queries,
        else ``embedder`` does."""
        if getattr(embedder.model, "quantized", False):
            raise ValueError("embedder must be the float model; int8 storage is LTM_INGEST_INT8's (with int8 queries)")
        self.store, self.embedder = store, embedder
        settings = settings or LtmSettings()
        self.query_embedder = query_embedder or embedder
        self.ingest_embedder = ingest_embedder or embedder
        # LTM_INGEST_MODEL=own: in start(), ingest gets a model no search waits for: ``embedder`` itself when queries
        # have their own (int8) model, else a second copy. A remote model (EMBEDDING_MODEL) has no CPU here to share.
        self._own_model = (ingest_embedder is None and settings.ltm_ingest_model == "own"
                           and not settings.embedding_remote)
        # LTM_INGEST_INT8: what ingest (and add) stores comes from the int8 copy, like the queries
        self._ingest_int8 = (self._own_model and settings.ingest_int8
                             and getattr(self.query_embedder.model, "quantized", False))
        self._settings = settings
        self.retrieval = RetrievalConfig.from_settings(settings)
        # chunks are embedded with ingest's model (its passes run beside a search's, services/ltm/ingest.py)
        self.documents = Documents(store.pool, lambda: self.ingest_embedder, self.retrieval,
                                   settings.ltm_doc_chunk_tokens, settings.ltm_doc_chunk_overlap)
        self._queries: OrderedDict[str, np.ndarray] = OrderedDict()  # query text -> embedding (search)
        self._embedding: dict[str, asyncio.Future[np.ndarray]] = {}  # query text -> its pass in flight
        self.reused_query_vectors = 0  # ingested turns whose vector came from the query cache
        self._metrics: Metrics | None = None  # bind_metrics
        self._refusals_logged: set[str] = set()
        self._query_cache = settings.ltm_query_cache
        self._warm_rows = settings.ltm_search_index_warm_rows
        self._warm_task: asyncio.Task[None] | None = None
        self.extraction = extraction if extraction is not None else build_extraction(settings)
        lock_names = names or Names()
        self.lifecycle = Lifecycle(store.pool, lifecycle_config(settings), redis,
                                   lambda user_id: lock_names.lock("ltm", "optimize", user_id))
        self.step_tokens = settings.ltm_ingest_step_tokens
        # extraction's steps: small where searches share the process (a step holds its GIL), larger in an ingest child
        self.extract_step_tokens = self.step_tokens if settings.serves_requests else settings.ltm_extract_step_tokens
        self._background = background_executor(settings.background_nice)  # ingest's threads (BACKGROUND_NICE)
        # requests first: LtmService's request server marks what it serves, ingest steps aside between its steps
        # (``foreground``: one that also tells the ingest children, or, in a child, also waits for the parent)
        self.foreground = foreground or Foreground(settings.ltm_ingest_yield_ms / 1000)
        store.index.warming_turn = self.foreground.turn  # warming the search index steps aside for requests too
        # LTM_SALIENCE: the salience model (numpy) and each session's state, for the local model's token vectors
        self.salience = SalienceModel.load() if settings.ltm_salience and not settings.embedding_remote else None
        self._salience_states = SessionStates(settings.ltm_salience_sessions)
        self._names = VectorCache(VECTOR_CACHE)  # entity name vectors, by normalised name
        self._texts = VectorCache(VECTOR_CACHE)  # vectors of extracted memories' texts ("Caroline (person)"...)
        self._extract_stage: Batcher[MemoryUpdate, Staged | None] = Batcher(self._extract_batch,
                                                                             settings.ltm_ingest_batch)
        self._embed_stage: Batcher[Staged, IngestWrite] = Batcher(self._embed_batch, settings.ltm_ingest_batch)
        self._write: Batcher[IngestWrite, bool | BaseException] = Batcher(self._write_batch, settings.ltm_ingest_batch)

    @property
    def _reuse_queries(self) -> bool:
        """Whether a query's vector may be stored for the same text ingested next: only when queries and ingest
        use one model (both float, or both the int8 copy with LTM_INGEST_INT8)."""
        return self.query_embedder is self.embedder or self._ingest_int8

    def _ingest_copy(self) -> SyncEmbedder:
        return dedicated_model("ingest", self._settings, int8=self._ingest_int8)

    async def start(self) -> None:
        """Load spaCy (now, not on the first message) and ingest's own model, side by side."""
        loads = []
        settings = self._settings
        if self.extraction is not None and settings.ingests:  # LTM_ROLE=requests: no ingest, no spaCy
            loads.append(asyncio.to_thread(lambda: self.extraction.rules.nlp if self.extraction else None))
        # ingest needs a copy of its own exactly when it would otherwise share the searches' model (a second float
        # one, or with LTM_INGEST_INT8 a second int8 one); with int8 queries and float storage it takes ``embedder``,
        # which no search uses; in a process that serves no search (an ingest child) it takes the model of what is
        # stored: ``embedder``, or with LTM_INGEST_INT8 the int8 copy (``query_embedder``, loaded for ingest there)
        copy = self._own_model and self._reuse_queries and settings.serves_requests  # (no searches: no need)
        if copy:
            loads.append(asyncio.to_thread(self._ingest_copy))
        await asyncio.gather(*loads)
        if self._own_model:  # its passes at background priority: a search's embedding gets the CPU first
            stored = self.query_embedder if self._ingest_int8 else self.embedder
            self.ingest_embedder = Embedder(self._ingest_copy() if copy else stored.model, executor=self._background)
        if self._warm_rows and settings.serves_requests:  # LTM_ROLE=ingest serves no search
            self._warm_task = asyncio.create_task(self._warm_recent(), name="ltm.index_warm")

    async def _warm_recent(self) -> None:
        try:
            await self.store.index.warm_recent(self._warm_rows)
        except Exception:  # only a head start: searches load their users anyway
            log.warning("ltm.index_warm_failed", exc_info=True)

    def warm(self, user_ids: Sequence[str]) -> None:
        if not self._settings.serves_requests:  # it serves no search: nothing to get ready
            return
        for user_id in user_ids:
            self.store.index.warm(user_id)

    def forget(self, user_ids: Sequence[str]) -> None:
        """Drop the users' index entries and their sessions' salience states (the other users' sessions keep theirs:
        clearing every state made each session's next turns score as if the session had just begun); the caches
        keyed by text (query vectors, extracted texts and entity names, token counts) cannot tell whose a text was,
        so they are emptied (they refill as searches and ingest run)."""
        for user_id in user_ids:
            self.store.index.drop(user_id)
        self._salience_states.drop_users(user_ids)
        self._queries.clear()
        self._names.clear()
        self._texts.clear()
        clear_token_cache()

    async def close(self) -> None:
        if self._warm_task is not None:
            self._warm_task.cancel()
            await asyncio.gather(self._warm_task, return_exceptions=True)
        await self.store.flush_access()

    async def ingest(self, update: MemoryUpdate) -> bool:
        """Ingest one update. Concurrent calls go through three stages in batches, each stage working on its batch
        while the next works on the one before: extraction (spaCy or the LLM), embeddings, the transaction."""
        if update.source == "ai" and update.content.lstrip().startswith(OFFLINE_REPLY_PREFIX):
            return False  # the offline responder only repeats memories: indexing it would echo them back
        extracted = await self._extract_stage.submit(update)
        if extracted is None:
            return False  # a redelivery: skipped before extraction and embedding
        stored = await self._write.submit(await self._embed_stage.submit(extracted))
        if isinstance(stored, BaseException):
            raise stored
        return stored

    def _turn(self, update: MemoryUpdate) -> Turn:
        named = speaker_of(update)
        subject = named or ("User" if update.source == "user" else "Assistant")
        return Turn(update.content, update.timestamp, subject, update.source)

    async def _extract_batch(self, updates: list[MemoryUpdate]) -> list[Staged | None]:
        """The updates not ingested yet (one query), extracted in steps of LTM_INGEST_STEP_TOKENS (an ingest child:
        LTM_EXTRACT_STEP_TOKENS)."""
        done = await self.store.ingested([(u.user_id, u.message_id) for u in updates])
        todo = [u for u in updates if (u.user_id, u.message_id) not in done]
        out: dict[tuple[str, str], Staged] = {}
        for step in steps([(u, self._turn(u)) for u in todo], lambda ut: tokens(ut[0].content),
                          self.extract_step_tokens):
            await self.foreground.turn()  # requests first
            for (u, turn), items in zip(step, await asyncio.gather(*(self._extract(t) for _, t in step)), strict=True):
                out[(u.user_id, u.message_id)] = Staged(u, turn, items)
        return [out.get((u.user_id, u.message_id)) for u in updates]

    async def _embed_batch(self, staged: list[Staged]) -> list[IngestWrite]:
        """Every vector the updates need in passes of LTM_INGEST_STEP_TOKENS, and their rows."""
        todo = [s.update for s in staged]
        turns = [s.turn for s in staged]
        items_of = [s.items for s in staged]
        mentioned_of = [[(n, k) for it in items if it.type == "entity" for n, k in it.entities] for items in items_of]
        names_of = [{norm_name(n): n for n, _ in [*entity_names(items, t.speaker), *mentioned] if norm_name(n)}
                    for items, t, mentioned in zip(items_of, turns, mentioned_of, strict=True)]
        # cached vectors first (the same text always has the same vector), then one stepped pass over the rest
        texts = from_cache(self._texts, {it.content: it.content for items in items_of for it in items})
        names = from_cache(self._names, {key: name for ns in names_of for key, name in ns.items()})
        salient = self.salience is not None and getattr(self.ingest_embedder.model, "has_tokens", False)
        # a turn whose publisher sent its vector (memory embeds every message it stores) is not embedded again
        carried = {i: got for i, u in enumerate(todo) if (got := self._carried(u, salient)) is not None}
        own = [u for i, u in enumerate(todo) if i not in carried]
        # a user's turn was usually searched for a moment ago (chat_ai's query is the turn itself): its vector is
        # in the query cache, and embedding it again would cost the most expensive step of ingest once more; only
        # when that vector is the stored vectors' model's (not with int8 queries and float storage, the default)
        searched = {u.content: vec for u in own
                    if self._reuse_queries and (vec := self._queries.get(u.content)) is not None}
        turn_tokens: dict[str, np.ndarray] = {}
        vectors = await embed_in_steps(self.ingest_embedder, [*(u.content for u in own if u.content not in searched),
                                                              *texts.missing.values(), *names.missing.values()],
                                       self.step_tokens, self.foreground.turn,
                                       with_tokens={u.content for u in own} if salient else None,
                                       tokens_out=turn_tokens)
        vectors.update(searched)
        if searched:
            self.reused_query_vectors += len(searched)
        texts.fill(self._texts, vectors)
        names.fill(self._names, vectors)
        turn_vectors = [carried[i][0] if i in carried else vectors[u.content] for i, u in enumerate(todo)]
        scores: list[float | None] = [carried[i][1] if i in carried else None for i in range(len(todo))]
        if salient and own:  # a carried score came from the publisher's state of the session; the rest from ours
            computed = iter(await asyncio.get_running_loop().run_in_executor(
                self._background, self._salience, own, vectors, turn_tokens))
            scores = [s if i in carried else next(computed) for i, s in enumerate(scores)]
        return [self._write_of(u, t, items, mentioned, ns, vec, texts.found, names.found, sal)
                for u, t, items, mentioned, ns, vec, sal in zip(todo, turns, items_of, mentioned_of, names_of,
                                                                turn_vectors, scores, strict=True)]

    def _carried(self, update: MemoryUpdate, salient: bool) -> tuple[np.ndarray, float | None] | None:
        """The update's carried vector and salience, when they are what ingest would compute (shared/runtime/
        carried.py); None: ingest embeds the turn itself (counted by reason)."""
        if update.embedding is None:
            return None
        model = self.ingest_embedder.model
        try:
            vector = vector_of(update.embedding, model_id(model), model.dim)
        except Refused as exc:
            self._count(f"ingest.carried_refused.{exc.reason}")
            if exc.reason not in self._refusals_logged:  # once per reason: a misconfigured publisher refuses them all
                self._refusals_logged.add(exc.reason)
                log.warning("ltm.carried_vector_refused", reason=exc.reason, detail=str(exc),
                            note="counted as ingest.carried_refused.<reason>; logged once per reason")
            return None
        if salient and update.embedding.salience is None:
            self._count("ingest.carried_unscored")  # the salience model reads the turn's token vectors: one pass
            return None
        self._count("ingest.carried")
        return vector, update.embedding.salience

    def bind_metrics(self, metrics: Metrics) -> None:
        """The service's counters (LtmService binds them): carried vectors used and refused."""
        self._metrics = metrics

    def _count(self, name: str) -> None:
        if self._metrics is not None:
            self._metrics.incr(name)

    def _salience(self, todo: list[MemoryUpdate], vectors: dict[str, np.ndarray],
                  turn_tokens: dict[str, np.ndarray]) -> list[float]:
        """The batch's salience, in arrival order, each session from the state its previous turns left."""
        assert self.salience is not None
        return self.salience.score_texts(
            [TextTurn(session_key(u.user_id, u.meta.session_id), u.content, u.source == "ai") for u in todo],
            vectors, turn_tokens, self._salience_states)

    @staticmethod
    def _write_of(update: MemoryUpdate, turn: Turn, items: list[Extracted], mentioned: list[tuple[str, str]],
                  names: dict[str, str], vector: np.ndarray, text_vectors: dict[str, np.ndarray],
                  name_vectors: dict[str, np.ndarray], salience: float | None = None) -> IngestWrite:
        """The rows of one update: its episodic memory (``vector``) and its knowledge."""
        extra = dict(update.meta.model_extra or {})
        speaker = speaker_of(update) or update.source
        refs = ground_dates(update.content, update.timestamp)
        meta = {**extra, "role": update.source, "question": is_question(update.content)}
        if refs:
            meta["dates"] = [{"text": r.phrase, "date": r.iso} for r in refs]
        episodic = NewMemory(
            user_id=update.user_id, type="episodic", content=update.content, embedding=vector,
            confidence=1.0, entities=[n for n, _ in mentioned], message_id=update.message_id,
            session_id=update.meta.session_id, timestamp=update.timestamp, speaker=speaker, meta=meta,
            salience=salience,
        )
        knowledge = TurnKnowledge(
            user_id=update.user_id, subject=turn.speaker,
            source=Provenance(update.message_id, update.meta.session_id, update.timestamp, speaker),
            items=[(it, text_vectors[it.content]) for it in items],
            entity_vectors={key: name_vectors[key] for key in names},
            episodic_hash=content_hash(update.content), episodic_entities=mentioned, meta=extra, salience=salience,
        )
        return IngestWrite(update.user_id, update.message_id, [episodic], knowledge)

    async def _write_batch(self, writes: list[IngestWrite]) -> list[bool | BaseException]:
        """One transaction for the batch; if it fails for a reason that is not passing, each update alone, so that
        one bad update fails by itself (and is dead-lettered by itself)."""
        results: list[bool | BaseException]
        tokens: dict[str, int] = {}  # counted once for the batch; counted per write only if that failed
        await self.foreground.turn()
        try:
            tokens = await self._token_counts(writes)
            results = list(await self._store_writes(writes, tokens))
        except Exception as exc:
            if is_transient(exc) or len(writes) == 1:
                raise
            log.warning("ltm.ingest_batch_failed", updates=len(writes), error=type(exc).__name__)
            results = []
            for w in writes:
                try:
                    results.extend(await self._store_writes([w], tokens or await self._token_counts([w])))
                except Exception as one:  # noqa: BLE001 - handed to that update's caller
                    results.append(one)
        for user_id in sorted({w.user_id for w, ok in zip(writes, results, strict=True) if ok is True}):
            await self.lifecycle.touch(user_id)
        log.debug("ltm.ingested", updates=len(writes), stored=sum(r is True for r in results))
        return results

    @staticmethod
    async def _token_counts(writes: list[IngestWrite]) -> dict[str, int]:
        """The tokens of every content the batch writes, counted here (a thread: the tokenizer releases the GIL) so
        that a search never tokenizes its results on the event loop (ltm_memories.content_tokens)."""
        contents = list(dict.fromkeys([*(m.content for w in writes for m in w.memories),
                                       *(it.content for w in writes if w.knowledge for it, _ in w.knowledge.items)]))
        tokens = dict(zip(contents, await asyncio.get_running_loop().run_in_executor(None, token_counts, contents),
                          strict=True))
        for w in writes:
            w.memories = [replace(m, tokens=tokens.get(m.content)) for m in w.memories]
        return tokens

    async def _store_writes(self, writes: list[IngestWrite], tokens: dict[str, int]) -> list[bool]:

        async def knowledge(conn: AsyncConnection, fresh: list[IngestWrite], ids: dict[MemoryKey, Any]) -> None:
            await write_knowledge(conn, [w.knowledge for w in fresh], ids, tokens)

        return await self.store.ingest_many(writes, then=knowledge)

    async def _extract(self, turn: Turn) -> list[Extracted]:
        if self.extraction is None:
            return []
        try:
            return await self.extraction.extract(turn)
        except Exception:
            # the turn itself is still stored as an episodic memory: recall never depends on extraction
            log.warning("ltm.extraction_failed", exc_info=True)
            return []

    async def search(self, user_id: str, data: SearchData) -> list[Memory]:
        return await self.store.search(user_id, data, await self._query_vector(data.query), self.retrieval)

    async def _query_vector(self, text: str) -> np.ndarray:
        """The query's embedding, from a per-process LRU of LTM_QUERY_CACHE texts (retries, k=10 then k=20). A text
        being embedded is embedded once: concurrent asks (chat_ai's memory search and doc_search of one turn) wait
        for the same pass."""
        queries = self._queries
        vec = queries.get(text)
        if vec is not None:
            queries.move_to_end(text)
            return vec
        task = self._embedding.get(text)
        if task is None:
            task = asyncio.ensure_future(self.query_embedder.embed(text))
            self._embedding[text] = task
            task.add_done_callback(lambda done: self._query_embedded(text, done))
        return await asyncio.shield(task)  # a cancelled asker does not cancel the others' pass

    def _query_embedded(self, text: str, task: asyncio.Future[np.ndarray]) -> None:
        self._embedding.pop(text, None)
        if task.cancelled() or task.exception() is not None:  # the askers get the error (retrieved here too)
            return
        self._queries[text] = task.result()
        while len(self._queries) > self._query_cache:
            self._queries.popitem(last=False)

    async def add(self, user_id: str, data: AddData) -> Memory:
        vec = await (self.query_embedder if self._ingest_int8 else self.embedder).embed(data.content)
        return await self.store.add(NewMemory(
            user_id=user_id, type=data.type, content=data.content, embedding=vec, confidence=data.confidence,
            message_id=data.source_turn, meta=data.meta,
        ))

    async def profile_get(self, user_id: str) -> dict[str, Any]:
        return await build_profile(self.store.pool, user_id, await self.store.get_profile(user_id))

    async def profile_update(self, user_id: str, profile: dict[str, Any]) -> dict[str, Any]:
        return await build_profile(self.store.pool, user_id, await self.store.update_profile(user_id, profile))

    async def delete(self, user_id: str, memory_id: str) -> None:
        if not await self.store.delete(user_id, memory_id):
            raise NotFound("no such memory for this user")

    async def delete_user(self, user_id: str) -> dict[str, Any]:
        return await self.store.delete_user(user_id)

    async def stats(self, user_id: str) -> dict[str, Any]:
        return {**await self.store.stats(user_id), **await self.documents.stats(user_id)}

    async def list_memories(self, user_id: str, data: ListData) -> list[Memory]:
        types = [str(t) for t in data.types] if data.types else None
        return await self.store.list_memories(user_id, data.limit, data.offset, types)

    async def optimize(self, user_id: str) -> dict[str, Any]:
        if self.lifecycle.redis is None:
            raise Unsupported("optimize needs the backend's Redis lock (NativeBackend(redis=..., names=...))")
        return await self.lifecycle.optimize(user_id)

    async def search_entities(self, user_id: str, data: SearchEntitiesData) -> list[dict[str, Any]]:
        vec = await self.query_embedder.embed(data.query)
        return await search_entities(self.store.pool, user_id, data.query, vec, data.limit, data.types)

    async def doc_add(self, user_id: str, data: DocAddData) -> DocAdded:
        return await self.documents.add(user_id, data)

    async def doc_search(self, user_id: str, data: DocSearchData) -> list[DocPassage]:
        return await self.documents.search(user_id, data, await self._query_vector(data.query))

    async def doc_delete(self, user_id: str, data: DocDeleteData) -> DocDeleted:
        return await self.documents.delete(user_id, data)

    async def maintenance(self) -> list[str]:
        await self.store.flush_access()
        if not self._settings.ingests:  # the lifecycle job runs where ingest does
            return []
        return [r["user_id"] for r in await self.lifecycle.periodic(turn=self.foreground.turn)
                if r.get("status") == "done"]
