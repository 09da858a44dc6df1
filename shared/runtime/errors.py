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
    """A failure that will pass. PostgreSQL's "program limit exceeded" (SQLSTATE class 54: an index row or a
    statement too large for the server) is an OperationalError to psycopg, but the same message fails the same way
    every time: it is the message's own fault, not an outage."""
    if isinstance(exc, psycopg.Error) and (exc.sqlstate or "").startswith("54"):
        return False
    return isinstance(exc, TRANSIENT)
