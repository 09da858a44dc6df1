"""chat_ai with an OpenAI-compatible model configured: the prompt carries memories and STM; failures fall back."""

from __future__ import annotations

from services.chat_ai.prompt import MEMORY_HEADER
from shared.runtime.llm import chat_model
from tests.fake_llm import fake_llm
from tests.helpers import Mesh, running, wait_until


async def _ingested(mesh: Mesh, user_id: str, n: int) -> bool:
    return await mesh.count("SELECT count(*) FROM ltm_ingested WHERE user_id = %s", user_id) >= n


async def test_configured_llm_gets_memories_and_recent_turns_in_its_prompt(mesh: Mesh) -> None:
    with fake_llm(lambda body: "You live in Lisbon.") as (base_url, seen):
        llm = chat_model(None, base_url, "fake-model")
        async with running(mesh.memory()), running(mesh.ltm()), running(mesh.chat(llm=llm)):
            first = await mesh.send("I live in Lisbon.", user_id="u-llm", session_id="s1")
            await mesh.reply_to(first)
            await wait_until(lambda: _ingested(mesh, "u-llm", 2), message="ingested")
            question = await mesh.send("Where do I live?", user_id="u-llm", session_id="s2")
            reply = await mesh.reply_to(question)
    assert reply.content == "You live in Lisbon." and reply.meta.model == "fake-model"
    assert reply.meta.ltm == "hit"
    prompt = seen[-1]["messages"]
    assert prompt[0]["role"] == "system"
    assert any(m["content"].startswith(MEMORY_HEADER) and "I live in Lisbon." in m["content"] for m in prompt)
    assert prompt[-1] == {"role": "user", "content": "Where do I live?"}


async def test_failing_llm_falls_back_to_the_offline_responder(mesh: Mesh) -> None:
    with fake_llm(lambda body: "", status=500) as (base_url, seen):
        llm = chat_model("key", base_url, "fake-model")
        async with running(mesh.memory()), running(mesh.chat(llm=llm, enable_ltm=False)) as chat:
            msg = await mesh.send("Hello?", user_id="u-x", session_id="s")
            reply = await mesh.reply_to(msg, timeout=30)
            assert chat.metrics.get("llm_errors") == 1  # type: ignore[attr-defined]
    assert seen, "the model was called"
    assert reply.meta.model.startswith("offline (llm error")
    assert "offline responder" in reply.content
