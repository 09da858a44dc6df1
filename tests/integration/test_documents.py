"""Documents beside memory (issue 11, parts 3 and 4) on real Redis and PostgreSQL + pgvector: doc_add, doc_search
and doc_delete over ltm_requests; idempotent adds; isolation between users whatever ids a request carries; the
headings of Markdown and HTML kept; recall@5 on the labelled set; chat_ai with ENABLE_RAG answering a document
question from a passage (cited) and a memory question from memory in one session."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

from mesh.docs import Call
from mesh.eval_docs import DEFAULT_SET, evaluate
from services.chat_ai.prompt import DOCS_HEADER, MEMORY_HEADER, count_tokens
from shared.contracts import LTM_RESPONSE, LTMResponse, new_id
from shared.contracts.messages import DocAdded, DocDeleted, DocSearchResult
from shared.runtime.llm import chat_model
from shared.runtime.metrics import Metrics
from shared.runtime.requests import RpcClient
from tests.fake_llm import fake_llm
from tests.helpers import Mesh, ask_ltm, ltm_request, running, wait_until

DOCS = DEFAULT_SET
REPORT = Path(__file__).resolve().parents[2] / ".data" / "eval-docs.json"
HOSTILE = ["*", "%", "' OR '1'='1", 'q"uote', "u" * 256, "doc-b; DROP TABLE ltm_documents; --"]


async def doc_add(mesh: Mesh, user: str, source: str, text: str, **extra: Any) -> DocAdded:
    resp = await ask_ltm(mesh, ltm_request("doc_add", user, {"source": source, "text": text, **extra}), timeout=60)
    assert resp.success, resp.error
    return DocAdded.model_validate(resp.data)


async def doc_search(mesh: Mesh, user: str, query: str, top_k: int = 5, **extra: Any) -> DocSearchResult:
    resp = await ask_ltm(mesh, ltm_request("doc_search", user, {"query": query, "top_k": top_k, **extra}))
    assert resp.success, resp.error
    return DocSearchResult.model_validate(resp.data)


def read(name: str) -> str:
    return (DOCS / name).read_text(encoding="utf-8")


async def test_add_search_delete_and_idempotent_adds(mesh: Mesh) -> None:
    user = f"u-docs-{new_id()[:8]}"
    async with running(mesh.ltm()):
        first = await doc_add(mesh, user, "docs/lighthouses.md", read("lighthouses.md"))
        assert (first.status, first.format, first.title) == ("created", "markdown", "Lighthouses")
        assert first.chunks >= 5
        again = await doc_add(mesh, user, "docs/lighthouses.md", read("lighthouses.md"))
        assert (again.status, again.doc_id, again.chunks) == ("unchanged", first.doc_id, first.chunks)
        copy = await doc_add(mesh, user, "elsewhere/copy.md", read("lighthouses.md"))  # same text, other source
        assert (copy.status, copy.doc_id, copy.source) == ("unchanged", first.doc_id, "docs/lighthouses.md")
        bees = await doc_add(mesh, user, "honey-bee.html", read("honey-bee.html"))
        assert (bees.status, bees.format, bees.title) == ("created", "html", "The western honey bee")
        assert await mesh.count("SELECT count(*) FROM ltm_documents WHERE user_id = %s", user) == 2
        chunks = await mesh.count("SELECT count(*) FROM ltm_doc_chunks WHERE user_id = %s", user)
        assert chunks == first.chunks + bees.chunks

        found = await doc_search(mesh, user, "Who designed the lens with rings of glass prisms?", top_k=3)
        top = found.passages[0]
        assert (top.doc_id, top.source, top.title) == (first.doc_id, "docs/lighthouses.md", "Lighthouses")
        assert top.heading == ["Lighthouses", "Optics", "The Fresnel lens"] and "Augustin-Jean Fresnel" in top.text
        assert top.similarity > 0.3 and len(found.passages) <= 3
        assert [p.score for p in found.passages] == sorted((p.score for p in found.passages), reverse=True)
        budget = await doc_search(mesh, user, "lighthouse keepers and lenses", top_k=10, max_tokens=150)
        assert budget.passages and sum(len(p.text) for p in budget.passages) < 150 * 6
        assert not (await doc_search(mesh, user, "zzzqqq xylophone")).passages  # no evidence: nothing

        # a new text under a source held already replaces it, under the same doc_id
        edited = read("lighthouses.md").replace("Robert Stevenson", "the engineer Robert Stevenson")
        updated = await doc_add(mesh, user, "docs/lighthouses.md", edited)
        assert (updated.status, updated.doc_id) == ("updated", first.doc_id)
        assert await mesh.count("SELECT count(*) FROM ltm_doc_chunks WHERE user_id = %s AND doc_id = %s", user,
                                first.doc_id) == updated.chunks
        stats = await ask_ltm(mesh, ltm_request("stats", user))
        assert stats.data and (stats.data["documents"], stats.data["chunks"]) == (2, updated.chunks + bees.chunks)

        gone = await ask_ltm(mesh, ltm_request("doc_delete", user, {"doc_id": first.doc_id}))
        assert gone.success and DocDeleted.model_validate(gone.data).doc_ids == [first.doc_id]
        again_gone = await ask_ltm(mesh, ltm_request("doc_delete", user, {"doc_id": first.doc_id}))
        assert not again_gone.success and again_gone.error and again_gone.error.code == "not_found"
        assert not any(p.doc_id == first.doc_id for p in (await doc_search(mesh, user, "Fresnel lens")).passages)
        every = await ask_ltm(mesh, ltm_request("doc_delete", user, {"all": True}))
        assert DocDeleted.model_validate(every.data).doc_ids == [bees.doc_id]
        assert await mesh.count("SELECT count(*) FROM ltm_doc_chunks WHERE user_id = %s", user) == 0

        # errors are data: an empty document, a missing text, a document over LTM_DOC_MAX_BYTES
        empty = await ask_ltm(mesh, ltm_request("doc_add", user, {"source": "x.html",
                                                                  "text": "<script>only()</script>"}))
        assert not empty.success and empty.error and empty.error.code == "bad_request"
        missing = await ask_ltm(mesh, ltm_request("doc_add", user, {"source": "x.txt"}))
        assert missing.error and missing.error.code == "bad_request"


async def test_documents_are_isolated_between_users_whatever_ids_a_request_carries(mesh: Mesh) -> None:
    owner = f"u-owner-{new_id()[:8]}"
    async with running(mesh.ltm(ltm_doc_max_bytes=4096)):
        held = await doc_add(mesh, owner, "sourdough.txt", read("sourdough.txt"))
        assert (await doc_search(mesh, owner, "starter smells of nail polish remover")).passages
        for other in [f"u-other-{new_id()[:8]}", *HOSTILE, held.doc_id, owner.upper(), f"{owner} "[:-1] + "%"]:
            for query in ("starter smells of nail polish remover", "sourdough bread hydration", owner, held.doc_id):
                assert not (await doc_search(mesh, other, query, top_k=50)).passages, (other, query)
            refused = await ask_ltm(mesh, ltm_request("doc_delete", other, {"doc_id": held.doc_id}))
            assert refused.error and refused.error.code == "not_found", other
            wiped = await ask_ltm(mesh, ltm_request("doc_delete", other, {"all": True}))
            assert wiped.success and DocDeleted.model_validate(wiped.data).documents == 0
            # the owner's text under another user: that user's own copy, never the owner's document
            copy = await doc_add(mesh, other, "sourdough.txt", read("sourdough.txt"))
            assert copy.status == "created" and copy.doc_id != held.doc_id
            await ask_ltm(mesh, ltm_request("doc_delete", other, {"all": True}))
        assert await mesh.count("SELECT count(*) FROM ltm_documents WHERE user_id = %s", owner) == 1
        assert len((await doc_search(mesh, owner, "starter smells of nail polish remover")).passages) >= 1
        # LTM_DOC_MAX_BYTES: this ltm takes 4 KiB documents at most
        big = await ask_ltm(mesh, ltm_request("doc_add", owner, {"source": "big.md",
                                                                "text": read("us-constitution-excerpts.md")}))
        assert not big.success and big.error and big.error.code == "bad_request" and "limit" in big.error.message


async def test_markdown_and_html_chunks_keep_their_headings(mesh: Mesh) -> None:
    user = f"u-head-{new_id()[:8]}"
    async with running(mesh.ltm()):
        await doc_add(mesh, user, "constitution.md", read("us-constitution-excerpts.md"))
        await doc_add(mesh, user, "faq", read("harbour-line-faq.html"), mime="text/html")
        senate = (await doc_search(mesh, user, "minimum age of a senator", top_k=1)).passages[0]
        assert senate.heading == ["The Constitution of the United States (excerpts)", "Article I", "Section 3"]
        assert "thirty Years" in senate.text
        bikes = (await doc_search(mesh, user, "bicycles on the train", top_k=1)).passages[0]
        assert bikes.source == "faq" and bikes.title == "Harbour Line: passenger questions"
        assert bikes.heading == ["Harbour Line: frequently asked questions", "On board", "Can I take my bicycle?"]
        assert bikes.label == ("Harbour Line: passenger questions \u203a Harbour Line: frequently asked questions"
                               " \u203a On board \u203a Can I take my bicycle?")
        async with mesh.pool.connection() as conn:
            cur = await conn.execute("SELECT content FROM ltm_doc_chunks WHERE user_id = %s", (user,))
            text = " ".join(r[0] for r in await cur.fetchall())
        assert "faqVersion" not in text and "border-collapse" not in text  # the script and the style are dropped
        assert "30 to 59 minutes | 25 percent of the single fare" in text  # table cells kept in their row


async def test_recall_at_5_on_the_labelled_set(mesh: Mesh) -> None:
    rpc: RpcClient[LTMResponse] = RpcClient(
        mesh.redis, queue=mesh.names.ltm_requests,
        reply_channel=mesh.names.reply_channel(mesh.names.ltm_responses, "eval-docs"), adapter=LTM_RESPONSE,
        metrics=Metrics())
    await rpc.start()
    try:
        async with running(mesh.ltm()):
            call: Call = rpc.call
            report = await evaluate(call, DOCS, k=5)
    finally:
        await rpc.close()
    print(json.dumps({k: v for k, v in report.items() if k != "results"}, indent=1))
    REPORT.parent.mkdir(exist_ok=True)
    REPORT.write_text(json.dumps(report, indent=1) + "\n")
    assert report["questions"] >= 30
    assert report["recall_at_5"] >= 0.9, report["misses"]
    assert await mesh.count("SELECT count(*) FROM ltm_documents") == 0  # the run cleans up after itself


HIKING = "My favourite mountain for hiking is Ben Nevis."
EGGS_Q = "How many eggs can a honey bee queen lay in a day?"
HIKING_Q = "Which mountain do I like for hiking?"
QUEEN = "The western honey bee \u203a The colony \u203a The queen"


async def _told(mesh: Mesh, user: str) -> None:
    """The user's fact in a session of its own, ingested; two documents in the user's collection."""
    await mesh.reply_to(await mesh.send(HIKING, user_id=user, session_id=f"{user}-a"), timeout=30)

    async def ingested() -> bool:
        return await mesh.count("SELECT count(*) FROM ltm_ingested WHERE user_id = %s", user) >= 1

    await wait_until(ingested, timeout=60, message="the user's turn ingested")
    await doc_add(mesh, user, "honey-bee.html", read("honey-bee.html"))
    await doc_add(mesh, user, "lighthouses.md", read("lighthouses.md"))


async def test_chat_answers_from_a_cited_passage_and_from_memory_in_one_session(mesh: Mesh) -> None:
    user = f"u-rag-{new_id()[:8]}"
    async with running(mesh.memory()), running(mesh.ltm()), running(mesh.chat(enable_rag=True)):
        await _told(mesh, user)
        session = f"{user}-b"
        doc = await mesh.reply_to(await mesh.send(EGGS_Q, user_id=user, session_id=session), timeout=30)
        remembered = await mesh.reply_to(await mesh.send(HIKING_Q, user_id=user, session_id=session), timeout=30)
        other = await mesh.reply_to(await mesh.send(EGGS_Q, user_id=f"{user}-x", session_id=f"{user}-x"), timeout=30)
    print(f"document question:\n{doc.content}\nmemory question:\n{remembered.content}")
    assert (doc.meta.docs, doc.meta.model) == ("hit", "offline") and doc.meta.passages_used >= 1
    assert f'According to {QUEEN} (honey-bee.html): "At the height of the season she can lay up to 2,000 eggs a day."' \
        in doc.content
    assert "Ben Nevis" not in doc.content
    assert remembered.meta.ltm == "hit" and remembered.meta.memories_used >= 1
    lines = remembered.content.splitlines()
    assert lines[1] == "From our earlier conversations I remember that you said:" and HIKING in lines[2]
    assert "2,000 eggs" not in remembered.content
    # another user asking the same question finds none of these documents
    assert (other.meta.docs, other.meta.passages_used) == ("miss", 0) and "According to" not in other.content


async def test_the_prompt_holds_memories_then_passages_under_one_budget(mesh: Mesh) -> None:
    user = f"u-ragp-{new_id()[:8]}"
    with fake_llm(lambda body: "Up to 2,000 eggs a day.") as (base_url, seen):
        llm = chat_model(None, base_url, "fake-model")
        async with running(mesh.memory()), running(mesh.ltm()), \
                running(mesh.chat(llm=llm, enable_rag=True, ltm_prompt_tokens=400, rag_prompt_tokens=250)):
            await _told(mesh, user)
            reply = await mesh.reply_to(await mesh.send(f"{EGGS_Q} And where do I go hiking?", user_id=user,
                                                        session_id=f"{user}-b"), timeout=30)
    assert (reply.meta.ltm, reply.meta.docs) == ("hit", "hit") and reply.meta.passages_used >= 1
    block = next(m["content"] for m in seen[-1]["messages"] if m["content"].startswith(MEMORY_HEADER))
    print(block)
    assert HIKING in block and DOCS_HEADER in block
    assert block.index(HIKING) < block.index(DOCS_HEADER) < block.index(f"- [doc: {QUEEN}]")
    assert "2,000 eggs a day" in block.split(DOCS_HEADER, 1)[1]
    assert count_tokens(block) <= 400


async def test_a_failed_doc_search_keeps_the_memories_and_a_failed_memory_search_keeps_the_passages(
        mesh: Mesh) -> None:
    user = f"u-ragf-{new_id()[:8]}"
    async with running(mesh.memory()), running(mesh.ltm()):
        chat = mesh.chat(enable_rag=True, ltm_timeout_ms=400)
        real = chat.ltm.call
        failing: set[str] = set()

        async def call(request: Any, timeout: float) -> LTMResponse:
            if request.type in failing:  # as if ltm never answered it in time
                await asyncio.sleep(timeout)
                raise TimeoutError
            return await real(request, timeout)

        chat.ltm.call = call  # type: ignore[method-assign]
        async with running(chat):
            await _told(mesh, user)
            failing.add("doc_search")
            no_docs = await mesh.reply_to(await mesh.send(HIKING_Q, user_id=user, session_id=f"{user}-b"), timeout=30)
            failing.clear()
            failing.add("search")
            no_memories = await mesh.reply_to(await mesh.send(EGGS_Q, user_id=user, session_id=f"{user}-c"),
                                              timeout=30)
    assert (no_docs.meta.ltm, no_docs.meta.docs, no_docs.meta.passages_used) == ("hit", "timeout", 0)
    assert HIKING in no_docs.content
    assert (no_memories.meta.ltm, no_memories.meta.docs, no_memories.meta.memories_used) == ("timeout", "hit", 0)
    assert "2,000 eggs a day" in no_memories.content and "According to" in no_memories.content
    for reply in (no_docs, no_memories):  # one wait for both searches, not one after the other
        assert reply.meta.latency_ms < 400 + 350, reply.meta


async def test_doc_search_on_the_mem0_backend_is_unknown_type_and_chat_keeps_its_memories(mesh: Mesh) -> None:
    user = f"u-ragm-{new_id()[:8]}"
    async with running(mesh.memory()), running(mesh.ltm(ltm_backend="mem0")), running(mesh.chat(enable_rag=True)):
        refused = await ask_ltm(mesh, ltm_request("doc_search", user, {"query": "bees"}))
        assert refused.error and refused.error.code == "unknown_type"
        await mesh.reply_to(await mesh.send(HIKING, user_id=user, session_id=f"{user}-a"), timeout=30)

        async def ingested() -> bool:
            return await mesh.count("SELECT count(*) FROM mem0_ingested WHERE user_id = %s", user) >= 1

        await wait_until(ingested, timeout=60, message="ingested by mem0")
        reply = await mesh.reply_to(await mesh.send(HIKING_Q, user_id=user, session_id=f"{user}-b"), timeout=30)
    assert (reply.meta.ltm, reply.meta.docs) == ("hit", "error") and HIKING in reply.content
