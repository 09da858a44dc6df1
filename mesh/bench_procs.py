"""The bench's plumbing: service processes, the bus calls it makes, and latency statistics.

Every service the bench measures is a separate OS process (``python -m services.<name>``) with its
own log file under the run directory, its own ``MESH_KEY_PREFIX`` (one per workload) and an
environment cleaned of the caller's service settings (so a stray ``LTM_TIMEOUT_MS`` or
``OPENAI_API_KEY`` never changes what is measured: replies come from the offline responder).
The bench talks to them only over Redis, as a client would: ``RPUSH`` a request on a request list
with a private ``reply_to`` channel (:class:`shared.runtime.requests.RpcClient`), ``XADD`` to
streams, ``XINFO`` to see what a consumer group has done.
"""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import redis.asyncio as aioredis
from pydantic import TypeAdapter
from redis.exceptions import ResponseError

from mesh.procs import killpg, spawn, stop_groups
from shared.contracts import Names, PingRequest, new_id
from shared.contracts.messages import Message
from shared.runtime.metrics import Metrics
from shared.runtime.requests import RpcClient

ROOT = Path(__file__).resolve().parent.parent
MODULES = {"memory": "services.memory", "ltm": "services.ltm", "chat_ai": "services.chat_ai"}
# The caller's service settings never leak into a measured process (names and prefixes of settings).
_DROP_PREFIXES = ("LTM_", "MEMORY_", "STM_", "CHAT_", "ENABLE_", "OPENAI_", "LLM_", "MEM0_", "MESH_", "DB_POOL",
                  "LOG_", "CLAIM_IDLE", "MAX_", "METRICS_", "CONSUMER_NAME", "SYSTEM_PROMPT", "REPLY_DEDUP")
_started = time.monotonic()


def say(text: str) -> None:
    """One progress line on stderr, with the time since the bench started."""
    print(f"[bench {time.monotonic() - _started:7.1f}s] {text}", file=sys.stderr, flush=True)


# --------------------------------------------------------------------------- statistics
def percentile(values: list[float], q: float) -> float:
    """Nearest-rank percentile (an observed value, no interpolation)."""
    ordered = sorted(values)
    rank = max(1, int(-(-q * len(ordered) // 100)))  # ceil(q/100 * n)
    return ordered[min(rank, len(ordered)) - 1]


def latency(samples_s: list[float]) -> dict[str, Any]:
    """p50/p95/p99/mean/max in milliseconds of samples in seconds."""
    if not samples_s:
        return {"n": 0, "p50_ms": None, "p95_ms": None, "p99_ms": None, "mean_ms": None, "max_ms": None}
    ms = [s * 1000 for s in samples_s]
    return {"n": len(ms), "p50_ms": round(percentile(ms, 50), 2), "p95_ms": round(percentile(ms, 95), 2),
            "p99_ms": round(percentile(ms, 99), 2), "mean_ms": round(sum(ms) / len(ms), 2),
            "max_ms": round(max(ms), 2)}


# --------------------------------------------------------------------------- processes
def service_env(redis_url: str, database_url: str, prefix: str, consumer: str, data_dir: Path,
                extra: dict[str, str] | None = None) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items()
           if k not in Names.ENV and k not in ("REDIS_URL", "DATABASE_URL") and not k.startswith(_DROP_PREFIXES)}
    env.update(REDIS_URL=redis_url, DATABASE_URL=database_url, MESH_KEY_PREFIX=prefix, CONSUMER_NAME=consumer,
               PYTHONUNBUFFERED="1", LOG_FORMAT="json", HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1",
               MEMORY_ENCRYPTION_KEY_FILE=str(data_dir / "memory-encryption.key"),
               MEM0_DIR=str(data_dir / "mem0"))
    env.update(extra or {})
    return env


@dataclass
class ServiceProcess:
    """One service process; ``started_at`` is ``time.monotonic()`` just before it was spawned."""

    service: str
    label: str
    prefix: str
    env: dict[str, str]
    log_path: Path
    proc: subprocess.Popen[bytes] | None = None
    started_at: float = 0.0

    def start(self) -> None:
        self.started_at = time.monotonic()
        self.proc, handle = spawn(MODULES[self.service], self.env, self.log_path)
        handle.close()  # the child holds its own copy of the descriptor
        say(f"started {self.label} (pid {self.proc.pid}, log {self.log_path})")

    @property
    def pid(self) -> int:
        return self.proc.pid if self.proc is not None else -1

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def check(self) -> None:
        """Raise when the process has exited (a crash is never measured as a slow service)."""
        if self.proc is not None and self.proc.poll() is not None:
            tail = self.log_path.read_text(errors="replace").splitlines()[-15:]
            raise RuntimeError(f"{self.label} exited with code {self.proc.returncode}; {self.log_path}:\n"
                               + "\n".join(tail))

    def stop(self, grace: float = 20.0) -> None:
        """SIGTERM its process group, SIGKILL after ``grace`` seconds."""
        if self.proc is None:
            return
        if stop_groups([self.proc], grace):
            say(f"{self.label} ignored SIGTERM for {grace:.0f}s, killed")
        self.proc = None


@dataclass
class Processes:
    """Every process of one bench run: started here, all stopped by :meth:`stop_all` (always called)."""

    run_dir: Path
    data_dir: Path
    redis_url: str
    database_url: str
    running: list[ServiceProcess] = field(default_factory=list)
    counter: int = 0

    def start(self, service: str, workload: str, prefix: str, **extra: str) -> ServiceProcess:
        self.counter += 1
        label = f"{workload}-{service}-{self.counter}"
        env = service_env(self.redis_url, self.database_url, prefix, f"bench-{label}", self.data_dir, extra)
        proc = ServiceProcess(service, label, prefix, env, self.run_dir / "logs" / f"{label}.log")
        proc.start()
        self.running.append(proc)
        return proc

    def stop(self, procs: Iterable[ServiceProcess]) -> None:
        for p in list(procs):
            if p.proc is not None and p.proc.poll() is None:
                killpg(p.proc.pid, signal.SIGTERM)  # all at once; then wait for each
        for p in list(procs):
            p.stop()
            if p in self.running:
                self.running.remove(p)

    def stop_all(self) -> None:
        self.stop(self.running)

    def check(self) -> None:
        for p in self.running:
            p.check()


# --------------------------------------------------------------------------- the bus
class Reply(Message):
    """The part of any reply the bench reads (ltm, memory and chat replies all have it)."""

    request_id: str
    success: bool = True
    data: dict[str, Any] | None = None


REPLY: TypeAdapter[Reply] = TypeAdapter(Reply)


async def rpc(redis: aioredis.Redis, queue: str, adapter: TypeAdapter[Any], prefix: str) -> RpcClient[Any]:
    """A started requester on ``queue`` with a private reply channel."""
    client: RpcClient[Any] = RpcClient(redis, queue=queue, reply_channel=f"{prefix}bench:reply:{new_id()[:12]}",
                                       adapter=adapter, metrics=Metrics())
    await client.start()
    return client


async def ping_ready(redis: aioredis.Redis, queue: str, proc: ServiceProcess, timeout: float = 180.0,
                     instance: str | None = None) -> float:
    """Seconds from the process's start until it answers ``ping`` on ``queue``.

    Short pings are sent one after another (each expires, and is dropped by the service, when not
    answered within 0.25 s), so the answer comes as soon as the service serves its list. With
    ``instance`` (its CONSUMER_NAME), only a reply from that copy counts: another copy serving the same
    list answers too (replies that name no instance, from services older than the ping contract, count).
    """
    client = await rpc(redis, queue, REPLY, proc.prefix)
    try:
        while True:
            proc.check()
            try:
                reply = await client.call(PingRequest(request_id=new_id(), type="ping"), 0.25)
                answered_by = (reply.data or {}).get("instance", instance)
                if instance is None or answered_by == instance:
                    return time.monotonic() - proc.started_at
            except TimeoutError:
                pass
            if time.monotonic() - proc.started_at > timeout:
                raise TimeoutError(f"{proc.label} did not answer ping on {queue} in {timeout:.0f}s")
    finally:
        await client.close()


async def consumer_ready(redis: aioredis.Redis, stream: str, group: str, proc: ServiceProcess,
                         timeout: float = 180.0) -> float:
    """Seconds from the process's start until its consumer shows in ``XINFO CONSUMERS`` of its group.

    Redis 7.0 lists a consumer only once it has read an entry (a blocking XREADGROUP on an empty stream
    does not create it): use this on a stream that has entries, else :func:`ping_ready`.
    """
    name = proc.env["CONSUMER_NAME"].encode()
    while True:
        proc.check()
        try:
            consumers = await redis.xinfo_consumers(stream, group)
            if any(c.get("name") in (name, name.decode()) for c in consumers):
                return time.monotonic() - proc.started_at
        except ResponseError:
            pass  # no stream or group yet
        if time.monotonic() - proc.started_at > timeout:
            raise TimeoutError(f"{proc.label} never joined {group} on {stream} in {timeout:.0f}s")
        await asyncio.sleep(0.01)


def _entry_key(entry: Any) -> tuple[int, int]:
    ms, _, seq = (entry.decode() if isinstance(entry, bytes) else str(entry)).partition("-")
    return int(ms), int(seq or 0)


async def consumed(redis: aioredis.Redis, stream: str, group: str, ids: list[Any]) -> int:
    """How many of ``ids`` (entries of ``stream``) the group has delivered and acknowledged."""
    try:
        groups = await redis.xinfo_groups(stream)
    except ResponseError:
        return 0
    info = next((g for g in groups if (g.get("name") or b"") in (group, group.encode())), None)
    if info is None:
        return 0
    delivered = _entry_key(info.get("last-delivered-id") or b"0-0")
    pending = int(info.get("pending") or 0)
    return max(0, sum(1 for i in ids if _entry_key(i) <= delivered) - pending)


async def wait_consumed(redis: aioredis.Redis, stream: str, group: str, ids: list[Any], procs: list[ServiceProcess],
                        *, timeout: float, label: str, interval: float = 0.2) -> tuple[int, float]:
    """Wait until the group has acknowledged every one of ``ids`` or ``timeout`` passed: (done, seconds)."""
    started = last_said = time.monotonic()
    done = 0
    while True:
        for p in procs:
            p.check()
        done = await consumed(redis, stream, group, ids)
        now = time.monotonic()
        if done >= len(ids) or now - started >= timeout:
            return done, now - started
        if now - last_said >= 10:
            say(f"  {label}: {done}/{len(ids)} ingested ({done / (now - started):.1f}/s)")
            last_said = now
        await asyncio.sleep(interval)
