"""Which failures are passing (retry in place) and which are the message's own fault."""

from __future__ import annotations

import psycopg
import psycopg_pool
import redis.exceptions


class TransientError(Exception):
    """Raise from a handler for a failure that will pass (a store is down, a dependency is busy)."""


TRANSIENT: tuple[type[BaseException], ...] = (
    TransientError,
    redis.exceptions.ConnectionError,
    redis.exceptions.TimeoutError,
    redis.exceptions.BusyLoadingError,
    psycopg.OperationalError,
    psycopg_pool.PoolTimeout,
)


def is_transient(exc: BaseException) -> bool:
    return isinstance(exc, TRANSIENT)
