"""Process entry: run ``main(stop)`` until SIGTERM/SIGINT sets ``stop``; the Redis client (one Redis or a cluster)."""

from __future__ import annotations

import asyncio
import os
import signal
import sys
from collections.abc import Awaitable, Callable
from typing import cast

import redis.asyncio as aioredis
import redis.exceptions
from redis.asyncio.client import Pipeline, PubSub
from redis.asyncio.cluster import RedisCluster
from redis.asyncio.retry import Retry
from redis.backoff import ExponentialBackoff
from threadpoolctl import threadpool_limits

from shared.runtime.priority import lower_process_priority
from shared.runtime.settings import MeshSettings


def redis_client(url: str, cluster: bool | None = None) -> aioredis.Redis:
    """Bytes in, bytes out (bad UTF-8 must reach the codec, not crash the reader).

    A command that meets a dropped connection (Redis restarted) is retried on a fresh
    one a few times before the error reaches the caller's own back-off loop; work is
    idempotent by message_id, so a retried write is harmless.

    ``cluster`` (default: ``REDIS_CLUSTER`` in the environment): ``url`` names one node of a Redis Cluster and
    the client is redis-py's cluster client, which finds the others, routes each command by its key's slot and
    follows MOVED/ASK. It speaks the same commands, so it is returned as the type the services are written
    against; what differs (a MULTI must stay in one slot) is handled where it matters: :func:`is_cluster`.
    """
    if cluster is None:
        cluster = env_flag("REDIS_CLUSTER")
    retry = Retry(ExponentialBackoff(cap=1.0, base=0.05), retries=4)
    errors: list[type[Exception]] = [redis.exceptions.ConnectionError, redis.exceptions.TimeoutError]
    if cluster:
        client = RedisCluster.from_url(url, decode_responses=False, socket_timeout=10, socket_connect_timeout=5,
                                       health_check_interval=30, retry=retry, retry_on_error=errors)
        return cast(aioredis.Redis, client)
    return aioredis.from_url(url, decode_responses=False, socket_timeout=10, socket_connect_timeout=5,
                             health_check_interval=30, retry=retry, retry_on_error=errors)


def env_flag(name: str) -> bool:
    return os.environ.get(name, "").strip().lower() in {"1", "true", "yes", "on"}


def is_cluster(client: object) -> bool:
    """True for a Redis Cluster client. Its MULTI/EXEC must keep to one hash slot: the mesh's transactions that
    must be atomic keep their keys in one slot by hash tags (the STM keys of a session, chat_ai's reply with its
    dedup keys), and batches that span slots only for speed (a turn's STM write plus its cache invalidation
    and memory update) are sent as plain pipelines there (:func:`batch`)."""
    return isinstance(client, RedisCluster)


async def pubsub_for(client: aioredis.Redis) -> PubSub:
    """A pub/sub connection of ``client``. A cluster client learns its slots on its first command; a
    subscription may be that first command, so it is made to learn them first."""
    if isinstance(client, RedisCluster):
        await client.initialize()
    return client.pubsub()


def batch(client: aioredis.Redis) -> Pipeline:
    """A pipeline for commands on keys in several slots: one MULTI on a single Redis, a plain pipeline split by
    node on a cluster. Use it only where a partial write is repaired by redelivery (the writes are idempotent)."""
    return client.pipeline(transaction=not is_cluster(client))


def run(main: Callable[[asyncio.Event], Awaitable[None]]) -> None:
    async def _amain() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        await main(stop)

    asyncio.run(_amain())


def tune_process(settings: MeshSettings) -> None:
    """A service process's settings of the interpreter and its libraries: the GIL's switch interval
    (GIL_SWITCH_MS) and one BLAS thread (:func:`one_blas_thread`)."""
    sys.setswitchinterval(settings.gil_switch_ms / 1000)
    one_blas_thread()
    lower_process_priority(settings.process_nice)


def one_blas_thread() -> None:
    """numpy's BLAS on the calling thread only. A service scales by processes and serves from one event loop:
    OpenBLAS's own pool (a thread per core, spinning between calls) would take the cores from the embedding threads
    and the other copies for a product of a few milliseconds. With it, ltm's first stage runs ``vectors @ query``
    (sgemv, about twice as fast as numpy's einsum) without starting a thread."""
    import numpy  # noqa: F401  (threadpoolctl limits the libraries loaded: numpy's OpenBLAS must be)

    threadpool_limits(limits=1, user_api="blas")


async def serve_until(stop: asyncio.Event, run_coro: Awaitable[None], on_stop: Callable[[], None]) -> None:
    """Run a service until it ends or ``stop`` is set; then ask it to stop and wait for its drain."""
    task = asyncio.ensure_future(run_coro)
    waiter = asyncio.ensure_future(stop.wait())
    await asyncio.wait({task, waiter}, return_when=asyncio.FIRST_COMPLETED)
    on_stop()
    waiter.cancel()
    await task
