"""Which failures are passing (retry in place) and which are the message's own fault."""

from __future__ import annotations

import psycopg
import psycopg_pool
import redis.exceptions

from shared.runtime.logging import get_logger
from shared.runtime.metrics import Metrics

log = get_logger(__name__)


class TransientError(Exception):
    """Raise from a handler for a failure that will pass (a store is down, a dependency is busy)."""


REDIS_DOWN: tuple[type[BaseException], ...] = (
    redis.exceptions.ConnectionError,  # BusyLoadingError (LOADING) and MaxClientsReachedError among them
    redis.exceptions.TimeoutError,
    redis.exceptions.ReadOnlyError,  # READONLY: a replica, during a failover
    redis.exceptions.OutOfMemoryError,  # OOM: maxmemory reached, until something expires or is freed
    redis.exceptions.ClusterError,  # CLUSTERDOWN, MASTERDOWN
    redis.exceptions.TryAgainError,  # TRYAGAIN: a slot being resharded
    redis.exceptions.RedisClusterException,  # no node reachable, a slot not covered (not RedisErrors)
)
# what Redis answers while it refuses writes until an operator acts on a failing snapshot
_REDIS_DOWN_REPLIES = ("MISCONF",)

TRANSIENT: tuple[type[BaseException], ...] = (
    TransientError,
    *REDIS_DOWN,
    psycopg.OperationalError,
    psycopg_pool.PoolTimeout,
)


def is_redis_down(exc: BaseException) -> bool:
    """Redis (or the cluster) cannot serve anyone now: every command would fail alike, so a loop waits and tries
    again rather than fail its message or stop."""
    if isinstance(exc, REDIS_DOWN):
        return True
    return isinstance(exc, redis.exceptions.ResponseError) and str(exc).startswith(_REDIS_DOWN_REPLIES)


REDIS_ERRORS: tuple[type[BaseException], ...] = (redis.exceptions.RedisError, redis.exceptions.RedisClusterException)
"""Everything the Redis client raises: what a loop on Redis catches, waits out and tries again."""


def redis_failed(exc: BaseException, metrics: Metrics | None, loop: str, **where: str) -> None:
    """Count and log a loop's failed Redis call: an outage as a reconnect (a warning), anything else (NOPERM, a
    wrong key type: a misconfiguration that needs an operator) as an error with its traceback."""
    if is_redis_down(exc):
        if metrics is not None:
            metrics.incr("redis_reconnects")
        log.warning(f"{loop}.redis_unavailable", error=str(exc), **where)
    else:
        if metrics is not None:
            metrics.incr("redis_errors")
        log.error(f"{loop}.redis_error", exc_info=exc, **where)


def is_transient(exc: BaseException) -> bool:
    """A failure that will pass. PostgreSQL's "program limit exceeded" (SQLSTATE class 54: an index row or a
    statement too large for the server) is an OperationalError to psycopg, but the same message fails the same way
    every time: it is the message's own fault, not an outage."""
    if isinstance(exc, psycopg.Error) and (exc.sqlstate or "").startswith("54"):
        return False
    return isinstance(exc, TRANSIENT) or is_redis_down(exc)  # TRANSIENT holds TransientError and REDIS_DOWN
