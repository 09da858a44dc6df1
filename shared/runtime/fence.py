"""A request's write that its user's deletion overtook is refused, not committed after the deletion.

A deletion (``mesh delete-user``, the gateway's DELETE) runs each service's ``delete_user`` twice, the second
time once the stream consumers have handled what they held (mesh/forget.py). A request a service was serving from
its request list at that instant (a large ``doc_add`` still embedding, an ``add``, a ``profile_update``, a
``store_message``, an ``import_messages``) is not seen by that wait, and would commit the user's rows after both
passes. So a request-path write, in its own transaction, takes the user's deletion lock shared and looks for a
deletion of the user (``user_deletions``, by the user's hash) at or after the moment the request was sent (its
``sent_at``, never later than when the request server took it: :data:`RECEIVED_AT`; a congested list is served
newest first, so a write sent before the deletion may well be taken after it); a deletion takes the same lock
exclusively, so the two never interleave: either the write commits first and the deletion removes it, or the
deletion commits first and the write is refused (``not_found``: the user was deleted while the request waited or
was served). A request sent after the deletion (the user came back) goes through. Writes from the streams (no
request) are not checked here. A write that goes on after its commit (memory's ``store_message`` and
``import_messages`` write the STM then) looks again once it is done and undoes what came after
(services/memory/api.py ``_unless_overtaken``).

The two clocks compared are the requester's or the service host's and PostgreSQL's (``now()`` of the
deleting transaction); hosts whose clocks disagree by more than a request's serving time could let a write
through or refuse one sent just after a deletion.
"""

from __future__ import annotations

from contextvars import ContextVar

from psycopg import AsyncConnection

from shared.contracts.errors import ErrorCode, MeshError
from shared.runtime.erase import user_hash

RECEIVED_AT: ContextVar[float | None] = ContextVar("request_received_at", default=None)
"""When the request being served was made (epoch seconds: its ``sent_at``, at the latest when the request server
took it); None outside a request."""

# the user's deletion lock: an advisory lock on a hash of the user id (seeded apart from other advisory locks)
_LOCK = "SELECT pg_advisory_xact_lock(hashtextextended(%s, 7193))"
_LOCK_SHARED = "SELECT pg_advisory_xact_lock_shared(hashtextextended(%s, 7193))"


async def lock_for_deletion(conn: AsyncConnection, user_id: str) -> None:
    """In a deletion's transaction, first: request-path writes of the user wait for it, and see it after."""
    await conn.execute(_LOCK, (user_id,))


async def after_deletion(conn: AsyncConnection, user_id: str) -> None:
    """In a transaction, first: wait for a deletion of the user under way (and keep the next from starting until
    this transaction ends). For background work that must not take the deletion's locks in another order."""
    await conn.execute(_LOCK_SHARED, (user_id,))


async def refuse_if_deleted(conn: AsyncConnection, user_id: str, service: str) -> None:
    """In a request-path write's transaction, before it writes: raise ``not_found`` if ``service`` deleted the user
    after the request was taken. Nothing outside a request."""
    received = RECEIVED_AT.get()
    if received is None:
        return
    await after_deletion(conn, user_id)
    cur = await conn.execute(
        "SELECT 1 FROM user_deletions WHERE user_hash = %s AND service = %s AND deleted_at >= to_timestamp(%s)"
        " LIMIT 1", (user_hash(user_id), service, received))
    if await cur.fetchone() is not None:
        raise MeshError("the user was deleted while this request was served", ErrorCode.NOT_FOUND)
