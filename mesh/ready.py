"""Readiness: a service is ready when it answers ``ping`` over the bus (shared/contracts/ping.py).

Each service serves its request list (``memory_requests``, ``ltm_requests``, ``chat_requests``) only
once it is ready (ltm: the embedding model and spaCy loaded, ingest running; chat_ai: its reply
subscriptions up). ``mesh up`` waits here until every service has answered once; ``mesh status``
pings through the same :class:`Pinger`.
"""

from __future__ import annotations

import asyncio
import re
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import redis.asyncio as aioredis
from pydantic import ValidationError

from mesh.infra import pid_alive
from mesh.stack_files import StackPaths, read_env_file, tail
from shared.contracts import Names, new_id
from shared.contracts.messages import PingRequest
from shared.contracts.ping import PING_RESPONSE, PingInfo, PingResponse
from shared.runtime.metrics import Metrics
from shared.runtime.requests import RpcClient, Unavailable
from shared.runtime.runner import redis_client

PING_ROUND_S = 1.0  # while waiting: one ping per waiting service per round
CRASH_LIMIT = 3  # `up` gives up on a service that exited this often without ever answering ping
EXIT_LINE = re.compile(r"service (\S+) exited with code (-?\d+)")  # the supervisor's line in stack.log


def request_lists(names: Names) -> dict[str, tuple[str, str]]:
    """service -> (request list, default reply channel)."""
    return {
        "memory": (names.memory_requests, names.memory_responses),
        "ltm": (names.ltm_requests, names.ltm_responses),
        "chat_ai": (names.chat_requests, names.chat_responses),
    }


class Pinger:
    """One private reply subscription per service (an :class:`RpcClient` each); ``ping`` on demand."""

    def __init__(self, redis: aioredis.Redis, names: Names, services: Sequence[str]) -> None:
        tag = f"mesh-cli-{new_id()[:12]}"
        lists = request_lists(names)
        self.clients: dict[str, RpcClient[PingResponse]] = {
            name: RpcClient(redis, queue=lists[name][0], reply_channel=names.reply_channel(lists[name][1], tag),
                            adapter=PING_RESPONSE, metrics=Metrics())
            for name in services
        }

    async def __aenter__(self) -> Pinger:
        await asyncio.gather(*(client.start() for client in self.clients.values()))
        return self

    async def __aexit__(self, *exc: object) -> None:
        await asyncio.gather(*(client.close() for client in self.clients.values()))

    async def ping(self, service: str, timeout: float) -> PingInfo | None:
        """The service's answer, or None when none came within ``timeout`` seconds."""
        try:
            resp = await self.clients[service].call(PingRequest(request_id=new_id(), type="ping"), timeout)
            return resp.info()
        except (TimeoutError, Unavailable, ValidationError):
            return None

    async def ping_all(self, timeout: float, pings: int = 1) -> dict[str, list[PingInfo]]:
        """``pings`` concurrent pings per service; the answers (blocked workers take turns, so several
        pings can reach several copies of a service)."""
        names = list(self.clients)
        results = await asyncio.gather(*(self.ping(name, timeout) for name in names for _ in range(pings)))
        return {name: [r for r in results[i * pings:(i + 1) * pings] if r] for i, name in enumerate(names)}


class NotReady(Exception):
    def __init__(self, waiting: list[str], reason: str) -> None:
        super().__init__(f"{', '.join(waiting)}: {reason}")
        self.waiting, self.reason = waiting, reason


async def wait_ready(redis_url: str, names: Names, services: Sequence[str], timeout: float,
                     give_up: Callable[[list[str]], str | None] = lambda waiting: None) -> dict[str, PingInfo]:
    """Ping every service until each has answered once; raise :class:`NotReady` naming those that did not.

    ``give_up(waiting)`` is asked after every round and may end the wait early with a reason (the
    stack died, a service keeps crashing).
    """
    deadline = time.monotonic() + timeout
    answered: dict[str, PingInfo] = {}
    redis = redis_client(redis_url)
    try:
        async with Pinger(redis, names, services) as pinger:
            while True:
                waiting = [name for name in services if name not in answered]
                results = await asyncio.gather(*(pinger.ping(name, PING_ROUND_S) for name in waiting))
                answered.update({name: info for name, info in zip(waiting, results, strict=True) if info})
                waiting = [name for name in services if name not in answered]
                if not waiting:
                    return answered
                reason = give_up(waiting)
                if reason:
                    raise NotReady(waiting, reason)
                if time.monotonic() >= deadline:
                    raise NotReady(waiting, f"no answer to ping within {timeout:.0f}s")
    finally:
        await redis.aclose()


def service_exits(stack_log: Path) -> dict[str, list[int]]:
    """Exit codes of each service so far, from the supervisor's lines in ``stack.log``."""
    exits: dict[str, list[int]] = {}
    try:
        text = stack_log.read_text(errors="replace")
    except OSError:
        return exits
    for match in EXIT_LINE.finditer(text):
        exits.setdefault(match.group(1), []).append(int(match.group(2)))
    return exits


def gateway_ready(url: str, deadline: float, give_up: Callable[[list[str]], str | None]) -> None:
    """Until the gateway's /api/v1/health answers 200 (it pings every service itself)."""
    import urllib.error
    import urllib.request

    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(f"{url}/api/v1/health", timeout=5) as resp:
                if resp.status == 200:
                    return
        except (urllib.error.URLError, OSError):
            pass
        if reason := give_up(["gateway"]):
            raise NotReady(["gateway"], reason)
        time.sleep(0.2)
    raise NotReady(["gateway"], f"its health at {url}/api/v1/health did not answer 200 in time")


def wait_for_services(paths: StackPaths, pid: int, services: list[str], deadline: float) -> bool:
    """Ping every service over the bus until each answers; on failure say which, with its log."""
    def give_up(waiting: list[str]) -> str | None:
        if not pid_alive(pid):
            return f"the stack (pid {pid}) exited"
        exits = service_exits(paths.log)
        crashed = [f"{name} exited {len(exits[name])} times, last exit code {exits[name][-1]}"
                   for name in waiting if len(exits.get(name, [])) >= CRASH_LIMIT]
        return "; ".join(crashed) or None

    started = time.monotonic()
    pinged = [s for s in services if s in request_lists(Names())]
    try:
        answers = asyncio.run(wait_ready(read_env_file(paths.env)["REDIS_URL"], Names.from_env(), pinged,
                                         max(1.0, deadline - started), give_up))
        if "gateway" in services:
            gateway_ready(read_env_file(paths.env)["GATEWAY_URL"], deadline, give_up)
    except NotReady as exc:
        print(f"mesh up: not ready: {', '.join(exc.waiting)} did not answer ping: {exc.reason}", file=sys.stderr)
        for name in exc.waiting:
            log_path = paths.service_log(name)
            print(f"--- {name} log {log_path} (last lines):\n{tail(log_path)}", file=sys.stderr)
        print(f"--- stack log {paths.log} (last lines):\n{tail(paths.log, 10)}", file=sys.stderr)
        return False
    took = time.monotonic() - started
    print(f"mesh up: every service answered ping ({took:.1f}s); their logs are in {paths.logs}")
    for name, info in answers.items():
        print(f"  {name}: up, {info.backend}, v{info.version}, instance {info.instance}")
    return True
