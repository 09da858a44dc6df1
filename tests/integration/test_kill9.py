"""kill -9 in the middle of the work (issue "Never loses, never leaks", faults): nothing lost, nothing twice.

The services run as real processes (``python -m services.<name>``, the test's key prefix and database). ltm is
SIGKILLed while it ingests N updates and started again; memory is SIGKILLed while it stores N user inputs (with
chat_ai answering them) and started again. Afterwards every update is ingested exactly once (one ingestion
record and one episodic memory per message id) and every input and every reply is stored exactly once, with
nothing dead-lettered and nothing left pending. ``KILL9_UPDATES`` / ``KILL9_INPUTS`` set N (``make chaos`` runs
more); the counts go to .data/chaos-report.json.
"""

from __future__ import annotations

import os
import signal
from pathlib import Path

import redis.asyncio as aioredis

from mesh.procs import Child, ServiceProcesses
from shared.contracts import MemoryUpdate, Names, UserInput, encode, new_id
from shared.contracts.messages import MemoryUpdateMeta
from tests.helpers import Mesh, record_chaos, wait_until

UPDATES = int(os.environ.get("KILL9_UPDATES", "300"))
INPUTS = int(os.environ.get("KILL9_INPUTS", "120"))


def env_for(mesh: Mesh, name: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("OPENAI_API_KEY", "OPENAI_BASE_URL")}
    env.update(REDIS_URL=mesh.redis_url, DATABASE_URL=mesh.database_url, MESH_KEY_PREFIX=mesh.names.prefix,
               CONSUMER_NAME=f"{name}-kill9", CLAIM_IDLE_MS="1000", LOG_FORMAT="json", METRICS_FLUSH_S="0.5")
    return env


async def _pending(redis: aioredis.Redis, stream: str, group: str) -> int:
    for g in await redis.xinfo_groups(stream):
        if g["name"].decode() == group:
            return int(g["pending"]) + int(g.get("lag") or 0)
    return -1


async def kill_9_midway(mesh: Mesh, procs: ServiceProcesses, child: Child, module: str, done_sql: str,
                        enough: int, what: str) -> int:
    """Once ``done_sql`` counts ``enough``, SIGKILL ``child`` and start ``module`` again; the count at the kill."""
    async def some() -> int | None:
        procs.check()
        got = await mesh.count(done_sql)
        return got if got >= enough else None

    before: int = await wait_until(some, timeout=120, message=what)
    os.killpg(child.proc.pid, signal.SIGKILL)
    child.proc.wait()
    procs.children.remove(child)
    child.handle.close()
    procs.start(f"{child.name}-again", module, env_for(mesh, child.name))
    return before


async def test_kill_9_of_ltm_while_ingesting_loses_nothing_and_ingests_once(mesh: Mesh, tmp_path: Path) -> None:
    n: Names = mesh.names
    with ServiceProcesses(tmp_path / "logs") as procs:
        ltm = procs.start("ltm", "services.ltm", env_for(mesh, "ltm"))
        for i in range(UPDATES):
            update = MemoryUpdate(user_id=f"k9-{i % 5}", content=f"Fact {i}: I planted {i} tulips by the shed.",
                                  source="user", meta=MemoryUpdateMeta(session_id=f"k9-s{i % 5}", message_id=f"k9-{i}"))
            await mesh.redis.xadd(n.memory_updates, {"data": encode(update)})

        before = await kill_9_midway(mesh, procs, ltm, "services.ltm",
                                     "SELECT count(*) FROM ltm_ingested WHERE user_id LIKE 'k9-%%'", UPDATES // 4,
                                     "ltm started ingesting")

        async def all_in() -> bool:
            procs.check()
            return await mesh.count("SELECT count(*) FROM ltm_ingested WHERE user_id LIKE 'k9-%%'") == UPDATES \
                and await _pending(mesh.redis, n.memory_updates, n.ltm_group) == 0

        await wait_until(all_in, timeout=240, interval=0.5, message=f"all {UPDATES} updates ingested after kill -9")
    ingested = await mesh.count("SELECT count(DISTINCT message_id) FROM ltm_ingested WHERE user_id LIKE 'k9-%%'")
    episodic = await mesh.count("SELECT count(*) FROM ltm_memories WHERE user_id LIKE 'k9-%%' AND type = 'episodic'")
    dead = int(await mesh.redis.xlen(Names.dead(n.memory_updates)))
    record_chaos("kill9_ltm", {"updates": UPDATES, "ingested_before_kill": before, "ingested_once": ingested,
                               "episodic_memories": episodic, "lost": UPDATES - ingested,
                               "duplicated": episodic - UPDATES, "dead_lettered": dead})
    assert (ingested, episodic, dead) == (UPDATES, UPDATES, 0)


async def test_kill_9_of_memory_while_storing_loses_nothing_and_stores_once(mesh: Mesh, tmp_path: Path) -> None:
    n: Names = mesh.names
    with ServiceProcesses(tmp_path / "logs") as procs:
        memory = procs.start("memory", "services.memory", env_for(mesh, "memory"))
        procs.start("chat_ai", "services.chat_ai", {**env_for(mesh, "chat_ai"), "ENABLE_LTM": "false"})
        sent = []
        for i in range(INPUTS):
            msg = UserInput(message_id=new_id(), user_id=f"k9m-{i % 4}", session_id=f"k9m-s{i % 4}",
                            content=f"Turn {i}: my parcel number is {1000 + i}.")
            await mesh.redis.xadd(n.user_input, {"data": encode(msg)})
            sent.append(msg.message_id)

        before = await kill_9_midway(mesh, procs, memory, "services.memory",
                                     "SELECT count(*) FROM conversation_messages WHERE user_id LIKE 'k9m-%%'",
                                     INPUTS // 4, "memory started storing")

        async def all_in() -> bool:
            procs.check()
            stored = await mesh.count("SELECT count(*) FROM conversation_messages WHERE user_id LIKE 'k9m-%%'")
            return stored == 2 * INPUTS and await _pending(mesh.redis, n.user_input, n.memory_group) == 0 \
                and await _pending(mesh.redis, n.ai_responses, n.memory_group) == 0

        await wait_until(all_in, timeout=240, interval=0.5, message=f"{INPUTS} inputs and replies stored")
    rows = await mesh.count("SELECT count(*) FROM conversation_messages WHERE user_id LIKE 'k9m-%%'")
    distinct = await mesh.count("SELECT count(DISTINCT message_id) FROM conversation_messages"
                                  " WHERE user_id LIKE 'k9m-%%'")
    inputs = await mesh.count("SELECT count(*) FROM conversation_messages WHERE user_id LIKE 'k9m-%%'"
                                " AND role = 'human' AND message_id = ANY(%s)", sent)
    replies = await mesh.count("SELECT count(*) FROM conversation_messages WHERE user_id LIKE 'k9m-%%'"
                                 " AND role = 'ai'")
    per_input = await mesh.count("SELECT count(*) FROM (SELECT parent_message_id FROM conversation_messages"
                                   " WHERE role = 'ai' AND user_id LIKE 'k9m-%%' GROUP BY parent_message_id"
                                   " HAVING count(*) > 1) d")
    dead = int(await mesh.redis.xlen(Names.dead(n.user_input))) + int(await mesh.redis.xlen(Names.dead(n.ai_responses)))
    record_chaos("kill9_memory", {"inputs": INPUTS, "stored_before_kill": before, "inputs_stored": inputs,
                                  "replies_stored": replies, "rows": rows, "lost": 2 * INPUTS - distinct,
                                  "duplicated": rows - distinct, "inputs_answered_twice": per_input,
                                  "dead_lettered": dead})
    assert (inputs, replies, rows, distinct, per_input, dead) == (INPUTS, INPUTS, 2 * INPUTS, 2 * INPUTS, 0, 0)
