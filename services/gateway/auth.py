"""API keys of the gateway (``GATEWAY_API_KEYS``): each is an admin's, or a tenant's scoped to user ids.

``KEY=admin`` may act for any user; ``KEY=alice|bob|acme-*`` only for those users (a trailing ``*`` is a prefix).
Keys are compared in constant time; a request without a known key is 401, one for a user outside its scope 403.
"""

from __future__ import annotations

import hmac
from dataclasses import dataclass


@dataclass(frozen=True)
class Scope:
    admin: bool
    users: frozenset[str] = frozenset()
    prefixes: tuple[str, ...] = ()

    def allows(self, user_id: str) -> bool:
        return self.admin or user_id in self.users or any(user_id.startswith(p) for p in self.prefixes)


def parse_keys(spec: str) -> dict[str, Scope]:
    keys: dict[str, Scope] = {}
    for item in (part.strip() for part in spec.split(";")):
        if not item:
            continue
        key, sep, scope = item.partition("=")
        key, scope = key.strip(), scope.strip()
        if not sep or len(key) < 8 or not scope:
            raise ValueError("GATEWAY_API_KEYS: each entry is KEY=admin or KEY=user|user|prefix*, "
                             "keys of 8+ characters")
        if scope == "admin":
            keys[key] = Scope(admin=True)
            continue
        names = [u.strip() for u in scope.split("|") if u.strip()]
        keys[key] = Scope(admin=False, users=frozenset(u for u in names if not u.endswith("*")),
                          prefixes=tuple(u[:-1] for u in names if u.endswith("*") and len(u) > 1))
    return keys


def lookup(keys: dict[str, Scope], presented: str | None) -> Scope | None:
    if not presented:
        return None
    found = None
    for key, scope in keys.items():  # every key compared, in constant time each
        if hmac.compare_digest(key.encode(), presented.encode()):
            found = scope
    return found
