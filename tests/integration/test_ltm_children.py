"""ltm's ingest in child processes (LTM_INGEST_PROCESSES, shared/runtime/children.py), as ``python -m services.ltm``.

The process that answers requests answers ping only once its child is ready; the child, at the lower OS priority,
is the only consumer of memory_updates and never takes a request; a child that dies is started again and what was
sent meanwhile is ingested; SIGTERM to the parent alone stops both; its /metrics page carries the child's series.
"""

from __future__ import annotations

import asyncio
import os
import signal
import urllib.request
from pathlib import Path

import psutil
from prometheus_client.parser import text_string_to_metric_families

from mesh.infra import free_port
from mesh.procs import ServiceProcesses
from shared.contracts import MemoryUpdate, encode, new_id
from shared.contracts.messages import MemoryUpdateMeta
from tests.helpers import Mesh, ask_ltm, ltm_request, wait_until


def env_for(mesh: Mesh, metrics_port: int) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("OPENAI_API_KEY", "OPENAI_BASE_URL")}
    env.update(REDIS_URL=mesh.redis_url, DATABASE_URL=mesh.database_url, MESH_KEY_PREFIX=mesh.names.prefix,
               CONSUMER_NAME="ltm-children", LOG_FORMAT="json", LTM_INGEST_PROCESSES="1", LTM_INGEST_NICE="7",
               LTM_SEARCH_INDEX_WARM_ROWS="0", METRICS_PORT=str(metrics_port), METRICS_FLUSH_S="0.5")
    return env


def scrape(port: int) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as resp:
        return str(resp.read().decode())


def check_page(text: str) -> None:
    """One family per name (a scraper refuses a second TYPE line), and the child's ingest on the service's page."""
    typed = [line.split()[2] for line in text.splitlines() if line.startswith("# TYPE ")]
    assert len(typed) == len(set(typed)), sorted(n for n in typed if typed.count(n) > 1)
    families = {f.name: f for f in text_string_to_metric_families(text)}
    processed = [s for s in families["mesh_events"].samples
                 if s.labels.get("event") == "processed" and s.labels.get("process") == "ingest0"]
    assert processed and processed[0].value >= 1, families["mesh_events"].samples
    assert any(s.labels.get("type") == "ping" and "process" not in s.labels  # the parent's own series
               for s in families["memory_api_requests"].samples)


async def _send(mesh: Mesh, user: str, text: str) -> None:
    update = MemoryUpdate(user_id=user, content=text, source="user",
                          meta=MemoryUpdateMeta.model_validate({"session_id": f"{user}:s", "message_id": new_id()}))
    await mesh.redis.xadd(mesh.names.memory_updates, {"data": encode(update)})


async def _found(mesh: Mesh, user: str, query: str, word: str) -> bool:
    reply = await ask_ltm(mesh, ltm_request("search", user, {"query": query, "limit": 5}))
    return reply.success and any(word in m.content for m in reply.memories)


async def test_ingest_runs_in_a_niced_child_restarted_when_it_dies(mesh: Mesh, tmp_path: Path) -> None:
    procs = ServiceProcesses(tmp_path)
    port = free_port()
    ltm = procs.start("ltm", "services.ltm", env_for(mesh, port))
    try:
        async def pinged() -> bool:
            procs.check()
            reply = await ask_ltm(mesh, ltm_request("ping", None), timeout=60)
            return reply.success

        await wait_until(pinged, timeout=120, message="ltm answers ping")
        parent = psutil.Process(ltm.proc.pid)
        children = parent.children()
        assert len(children) == 1, children  # ready means the child is ready too: it exists already
        child = children[0]
        base = os.getpriority(os.PRIO_PROCESS, parent.pid)
        assert os.getpriority(os.PRIO_PROCESS, child.pid) == min(19, base + 7), (base, child.pid)
        # every ping is answered by the parent: the child takes no request
        for _ in range(5):
            reply = await ask_ltm(mesh, ltm_request("ping", None))
            assert (reply.data or {}).get("instance") == "ltm-children", reply.data

        await _send(mesh, "kid", "Caroline adopted a grey kitten called Pixel.")
        await wait_until(lambda: _found(mesh, "kid", "What is the kitten called?", "Pixel"), timeout=60,
                         message="the update ingested by the child")
        consumers = await mesh.redis.xinfo_consumers(mesh.names.memory_updates, mesh.names.ltm_group)
        assert [c["name"] for c in consumers] == [b"ltm-children-ingest0"], consumers
        check_page(await asyncio.to_thread(scrape, port))

        child.send_signal(signal.SIGKILL)  # the parent notices, starts another after its back-off
        await _send(mesh, "kid", "Melanie ran the charity marathon in Boston.")

        def restarted() -> bool:
            procs.check()
            now = parent.children()
            return len(now) == 1 and now[0].pid != child.pid

        await wait_until(restarted, timeout=60, message=f"a new child of {parent.pid} (was {child.pid})")
        await wait_until(lambda: _found(mesh, "kid", "Which marathon did Melanie run?", "Boston"), timeout=90,
                         message="the update sent while the child was down, ingested by the new one")
        replacement = parent.children()[0]
        # SIGTERM to the parent alone (compose's init signals only it): it is forwarded, both drain and exit
        os.kill(ltm.proc.pid, signal.SIGTERM)
        code = await asyncio.to_thread(ltm.proc.wait, 60)
        assert code == 0, code
        await wait_until(lambda: not replacement.is_running(), timeout=30, message="the child exited too")
    finally:
        procs.stop()
