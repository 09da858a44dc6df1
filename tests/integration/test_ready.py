"""Ready means ready: ``mesh up`` returns only once every service answers ``ping`` over the bus.

The stack runs as real processes (``python -m mesh up``) on the session's Redis and a database of
this test, under the test's key prefix, exactly as ``make up`` runs it.
"""

from __future__ import annotations

import asyncio
import json
import os
import sys
import tomllib
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path

import psycopg
import redis.asyncio as aioredis

from mesh.ready import Pinger
from shared.contracts import AI_RESPONSE, AIResponse, Names, UserInput, decode, encode, new_id
from shared.contracts.ping import MESH_VERSION
from tests.conftest import ROOT
from tests.helpers import wait_until


@dataclass
class Run:
    code: int
    out: str
    err: str


async def mesh_cli(env: dict[str, str], *args: str, timeout: float = 240) -> Run:
    proc = await asyncio.create_subprocess_exec(sys.executable, "-m", "mesh", *args, cwd=ROOT, env=env,
                                                stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    out, err = await asyncio.wait_for(proc.communicate(), timeout)
    assert proc.returncode is not None
    return Run(proc.returncode, out.decode(), err.decode())


def stack_env(redis_url: str, database_url: str, names: Names, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("OPENAI_API_KEY", "OPENAI_BASE_URL", "CONSUMER_NAME")}
    env.update(REDIS_URL=redis_url, DATABASE_URL=database_url, MESH_KEY_PREFIX=names.prefix, LOG_FORMAT="json",
               **extra)
    return env


@asynccontextmanager
async def stack_down(env: dict[str, str], data_dir: Path) -> AsyncIterator[None]:
    try:
        yield
    finally:
        down = await mesh_cli(env, "down", "--data-dir", str(data_dir))
        assert down.code == 0, down.err


async def send(redis: aioredis.Redis, names: Names, content: str, user_id: str, session_id: str) -> UserInput:
    msg = UserInput(message_id=new_id(), user_id=user_id, session_id=session_id, content=content)
    await redis.xadd(names.user_input, {"data": encode(msg)})
    return msg


async def reply_to(redis: aioredis.Redis, names: Names, msg: UserInput, timeout: float = 20) -> AIResponse:
    async def find() -> AIResponse | None:
        for _, fields in await redis.xrange(names.ai_responses):
            reply = decode(AI_RESPONSE, fields.get(b"data"))
            if reply.in_reply_to == msg.message_id:
                return reply
        return None

    found: AIResponse = await wait_until(find, timeout, message=f"reply to {msg.message_id}")
    return found


async def ingested(database_url: str, user_id: str) -> int:
    async with await psycopg.AsyncConnection.connect(database_url) as conn:
        cur = await conn.execute("SELECT count(*) FROM ltm_ingested WHERE user_id = %s", (user_id,))
        row = await cur.fetchone()
    return int(row[0]) if row else 0


def scrape(url: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Every sample of a /metrics page: (name, sorted labels) -> value."""
    import urllib.request

    from prometheus_client.parser import text_string_to_metric_families

    with urllib.request.urlopen(url, timeout=10) as resp:  # a local URL of the stack
        assert resp.headers["Content-Type"].startswith("text/plain")
        text = resp.read().decode()
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def total(samples: dict[tuple[str, tuple[tuple[str, str], ...]], float], name: str, **labels: str) -> float:
    return sum(v for (n, ls), v in samples.items() if n == name and labels.items() <= dict(ls).items())


async def check_metrics(redis: aioredis.Redis, names: Names, data: Path) -> None:
    """Each service's Prometheus /metrics (METRICS_URLS in stack.env), after the traffic of the test above."""
    from mesh.stack_files import read_env_file
    from shared.contracts.ping import PING_RESPONSE
    from tests.helpers import Replies

    async with Replies(redis, names.memory_responses, PING_RESPONSE) as replies:  # a cached read: miss, then hit
        for _ in range(2):
            rid = new_id()
            await redis.rpush(names.memory_requests, json.dumps(
                {"request_id": rid, "type": "get_session", "user_id": "u-ready", "data": {"session_id": "s1"}}))
            assert (await replies.get(rid)).success
    urls = read_env_file(data / "stack.env")["METRICS_URLS"].split()
    assert len(urls) == 4, urls  # memory, ltm, chat_ai, gateway
    pages = {}
    for url in urls:
        samples = await asyncio.to_thread(scrape, url)
        service = {dict(ls).get("service") for (n, ls), _ in samples.items() if n == "memory_api_requests_total"}
        assert len(service) == 1, service
        pages[service.pop()] = samples
    assert set(pages) == {"memory", "ltm", "chat_ai", "gateway"}
    gateway = pages.pop("gateway")  # `mesh up` waited for its health
    assert total(gateway, "memory_api_requests_total", type="GET /api/v1/health", outcome="ok") >= 1
    assert total(gateway, "mesh_group_lag", stream=names.user_input) == 0
    for service, samples in pages.items():  # `mesh up` pinged each; each sees the bus
        assert total(samples, "memory_api_requests_total", type="ping", outcome="ok") >= 1, service
        assert total(samples, "memory_api_request_duration_seconds_count", type="ping") >= 1, service
        assert total(samples, "mesh_group_lag", stream=names.user_input) == 0, service
        assert ("mesh_dead_letters", (("name", Names.dead(names.user_input)),)) in samples, service
        assert total(samples, "mesh_events_total", event="processed") >= 1, service
    chat, ltm, memory = pages["chat_ai"], pages["ltm"], pages["memory"]
    assert total(chat, "memory_operations_total", operation="reply") >= 2
    assert total(chat, "memory_retrieval_duration_ms_count", service="chat_ai") >= 2
    assert total(chat, "memory_retrieval_duration_ms_count", outcome="hit") >= 1
    assert total(ltm, "memory_operations_total", operation="ingest") >= 2
    assert total(ltm, "memory_operations_total", operation="search") >= 2
    assert total(ltm, "memory_retrieval_duration_ms_count", service="ltm") >= 2
    assert total(memory, "memory_operations_total", operation="store_input") >= 2
    assert total(memory, "memory_operations_total", operation="store_reply") >= 2
    assert total(memory, "cache_misses_total", cache="session_reads") >= 1
    assert total(memory, "cache_hits_total", cache="session_reads") >= 1


def check_gateway(data: Path) -> None:
    """`mesh up` started the HTTP gateway too: its URL and an admin key made for the run are in stack.env."""
    import urllib.request

    from mesh.stack_files import read_env_file

    env = read_env_file(data / "stack.env")
    url, key = env["GATEWAY_URL"], env["GATEWAY_API_KEY"]
    with urllib.request.urlopen(f"{url}/api/v1/health", timeout=10) as resp:
        assert json.loads(resp.read())["ok"] is True
    body = json.dumps({"user_id": "u-ready", "content": "Hello over HTTP"}).encode()
    request = urllib.request.Request(f"{url}/v1/chat", data=body, method="POST", headers={
        "Authorization": f"Bearer {key}", "Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=30) as resp:
        assert json.loads(resp.read())["reply"]


def test_the_ping_contract_version_is_the_package_version() -> None:
    assert tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["version"] == MESH_VERSION


async def test_up_returns_ready_services_and_status_reports_them(
        tmp_path: Path, redis: aioredis.Redis, redis_url: str, database_url: str, names: Names) -> None:
    env, data = stack_env(redis_url, database_url, names), tmp_path / "data"
    async with stack_down(env, data):
        up = await mesh_cli(env, "up", "--data-dir", str(data))
        assert up.code == 0, f"{up.out}\n{up.err}"
        assert "every service answered ping" in up.out

        # right after `up`: every service answers at once, and says what it is
        async with Pinger(redis, names, ["memory", "ltm", "chat_ai"]) as pinger:
            answers = await pinger.ping_all(timeout=1.0)
        assert {name: [a.service for a in infos] for name, infos in answers.items()} == {
            "memory": ["memory"], "ltm": ["ltm"], "chat_ai": ["chat_ai"]}
        info = {name: infos[0] for name, infos in answers.items()}
        assert all(i.version == MESH_VERSION and i.instance and i.uptime_s >= 0 for i in info.values())
        assert (info["ltm"].backend, info["memory"].backend, info["chat_ai"].backend) == (
            "native", "extractive", "offline")
        assert info["chat_ai"].flags["enable_ltm"] is True

        # the first turns after `up` are answered with long-term memory consulted in time
        first = await send(redis, names, "My sister Maria lives in Porto.", "u-ready", "s1")
        assert (await reply_to(redis, names, first)).meta.ltm in ("miss", "hit")
        await wait_until(lambda: ingested(database_url, "u-ready"), timeout=30, message="the fact ingested")
        second = await send(redis, names, "Where does my sister Maria live?", "u-ready", "s2")
        answer = await reply_to(redis, names, second)
        assert answer.meta.ltm == "hit"
        # the offline responder quotes the fact itself (its memory block's user statement), not the question
        quoted = [line for line in answer.content.splitlines() if line.startswith("- (")]
        assert quoted and "My sister Maria lives in Porto." in quoted[0], answer.content

        status = await mesh_cli(env, "status", "--json", "--data-dir", str(data))
        assert status.code == 0, f"{status.out}\n{status.err}"
        report = json.loads(status.out)
        assert report["ok"] is True
        for name, expected in (("memory", "extractive"), ("ltm", "native"), ("chat_ai", "offline")):
            svc = report["services"][name]
            assert (svc["state"], svc["version"], svc["backend"]) == ("up", MESH_VERSION, expected)
            assert svc["instances"] == [info[name].instance]
        groups = {(s["stream"], g["group"]): g for s in report["streams"] for g in s["groups"]}
        assert set(groups) == {(names.user_input, "memory"), (names.user_input, "chat-ai"),
                               (names.ai_responses, "memory"), (names.memory_updates, "ltm")}
        assert all(isinstance(g["lag"], int) and isinstance(g["pending"], int) for g in groups.values())
        assert {q["queue"] for q in report["queues"]} == {names.ltm_requests, names.memory_requests,
                                                           names.chat_requests}
        assert report["dead_letters"][Names.dead(names.user_input)] == 0

        human = await mesh_cli(env, "status", "--data-dir", str(data))
        assert human.code == 0 and "chat_ai" in human.out and "lag" in human.out

        await check_metrics(redis, names, data)
        await asyncio.to_thread(check_gateway, data)

        # content stays out of the services' logs (LOG_CONTENT is false): they log each turn by ids and sizes
        logs = {p.name: p.read_text(errors="replace") for p in (data / "logs").glob("*.log")}
        assert set(logs) >= {"memory.log", "ltm.log", "chat_ai.log"}
        assert "u-ready" in logs["chat_ai.log"] and "u-ready" in logs["memory.log"], "no per-turn log lines"
        leaked = [name for name, text in logs.items() for word in ("Porto", "Maria") if word in text]
        assert not leaked, f"message content in the logs: {leaked}"


async def test_up_fails_naming_the_service_that_does_not_come_up_and_its_log(
        tmp_path: Path, redis: aioredis.Redis, redis_url: str, database_url: str, names: Names) -> None:
    env, data = stack_env(redis_url, database_url, names, LTM_BACKEND="nonsense"), tmp_path / "data"
    async with stack_down(env, data):
        up = await mesh_cli(env, "up", "--data-dir", str(data), "--timeout", "20")
        assert up.code == 1
        log_path = data / "logs" / "ltm.log"
        first_line = up.err.splitlines()[0]
        assert first_line.startswith("mesh up: not ready: ltm did not answer ping"), up.err
        assert str(log_path) in up.err and "ltm_backend" in up.err  # its log's tail shows why
        assert log_path.exists() and (data / "logs" / "memory.log").exists()
        assert not (data / "stack.pid").exists()  # `up` took down the stack it started

        # with the stack gone, status says so and fails
        status = await mesh_cli(env, "status", "--json", "--data-dir", str(data), "--timeout", "0.5")
        assert status.code == 1
        report = json.loads(status.out)
        assert {name: s["state"] for name, s in report["services"].items()} == {
            "memory": "down", "ltm": "down", "chat_ai": "down"}
