"""`mesh demo`: facts told in one session come back, through long-term memory, in a new one."""

from __future__ import annotations

import argparse
import asyncio
import time

from mesh.client import MeshClient
from shared.contracts import AIResponse, new_id

FACTS = [
    "Hi! My name is Maya and I live in Lisbon.",
    "I work as a marine biologist, mostly studying octopuses.",
    "I'm allergic to peanuts, and I love hiking in the Alps.",
]
QUESTIONS = [
    ("Where do I live?", "Lisbon"),
    ("What do I do for work?", "marine biologist"),
    ("Do I have any food allergies?", "peanuts"),
]


def _show(who: str, text: str, reply: AIResponse | None = None) -> None:
    print(f"\n{who}: {text}")
    if reply is not None:
        m = reply.meta
        print(f"assistant [{m.model}, ltm={m.ltm}, memories={m.memories_used}, {m.latency_ms:.0f} ms]:")
        print("  " + reply.content.replace("\n", "\n  "))


async def demo() -> int:
    client = await MeshClient.connect()
    try:
        print(f"waiting for the ltm service ... backend: {await client.wait_for_ltm()}")
        user = f"demo-{new_id()[:8]}"
        first, second = f"{user}-s1", f"{user}-s2"
        print(f"\n=== session 1 ({first}), user {user}")
        for fact in FACTS:
            _show("user", fact, await client.say(fact, user_id=user, session_id=first))
        deadline = time.monotonic() + 60
        while await client.memory_count(user) < len(FACTS) and time.monotonic() < deadline:  # noqa: ASYNC110
            await asyncio.sleep(0.2)  # polling another process's progress over the bus
        print(f"\n(long-term memory now holds {await client.memory_count(user)} memories for {user})")
        print(f"\n=== session 2 ({second}): a new session, same user")
        recalled = 0
        for question, expected in QUESTIONS:
            reply = await client.say(question, user_id=user, session_id=second)
            _show("user", question, reply)
            recalled += reply.meta.ltm == "hit" and expected.lower() in reply.content.lower()
        print(f"\n{recalled} of {len(QUESTIONS)} answers in session 2 used a memory from session 1.")
        return 0 if recalled else 1
    finally:
        await client.close()


def configure(parser: argparse.ArgumentParser) -> None:
    return None


def run(args: argparse.Namespace) -> int:
    return asyncio.run(demo())
