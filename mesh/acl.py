"""Redis ACLs: one least-privilege user per service, and an admin for the CLI, evaluations and benches.

Each service may touch only its own streams, lists, channels and keys, with only the commands it uses (Redis 7
selectors pair a key set with a command set). What that buys: only memory can XADD ``memory_updates``, only
chat_ai can XADD ``ai_responses`` and read nothing of the conversation store's keys but the STM, ltm cannot read
the STM at all, and no service can run admin commands (CONFIG, FLUSHALL, KEYS, ACL, DEBUG...). The ``default``
user is switched off.

The rules come from :class:`Names` (so a ``MESH_KEY_PREFIX`` is honoured). ``python -m mesh acl`` prints an ACL
file; deploy/redis/users.acl is that file for the default names with the development passwords of compose
(``<user>-dev-password``, stored as SHA-256 hashes): regenerate it with real passwords before deploying
(``python -m mesh acl --passwords-from-env --out FILE``, reading ``REDIS_PASSWORD_<USER>``). The local stack
writes its own file with random passwords (mesh/stack.py).

Reply channels: a requester's ``reply_to`` must lie under the service's response channel (``ltm_responses:...``,
as mesh's clients name theirs); a reply to any other channel is refused by Redis and logged by the service.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import secrets
from pathlib import Path

from shared.contracts.names import Names

USERS = ("memory", "ltm", "chat_ai", "gateway", "admin")
CONNECT = "+ping +hello +client|setname +client|id +select +info +multi +exec +discard"  # (SETINFO: Redis >= 7.2)
# a consumer group's reader of a stream (stream consumer, status)
CONSUME = ("+xreadgroup +xack +xclaim +xautoclaim +xpending +xgroup|create +xgroup|createconsumer "
           "+xgroup|delconsumer +xinfo|groups +xinfo|consumers +xinfo|stream +xtrim +xrange +xdel +xlen")
DEAD = "+xadd +xrange +xrevrange +xdel +xlen"
LOCK = "+set +get +del +pexpire +eval +evalsha +script|load"
METRICS = "+hincrby +hset +hgetall"


def _c(*channels: str) -> str:
    return " ".join(f"&{c}" for c in channels)


def _sel(keys: list[str], commands: str) -> str:
    """A Redis 7 selector: these commands on these keys only."""
    return f"({' '.join(f'~{k}' for k in keys)} {commands})"


def rules(names: Names) -> dict[str, str]:
    """Each user's ACL rule (everything after ``user <name> on <password>``): the root permits connecting and the
    user's channels; every key permission is a selector pairing keys with the commands used on them."""
    n = names
    p = names.prefix
    dead = Names.dead
    stm = [n.stm_turns("*"), n.stm_summary("*"), n.stm_meta("*")]
    memory = " ".join([
        "resetkeys resetchannels -@all", CONNECT, "+publish +subscribe +unsubscribe +scan",
        _c(n.memory_updates_pubsub, f"{n.memory_responses}*", n.memory_forget),
        # one selector: a command's keys must all be allowed by one (delete_user DELs STM, locks and cache at once)
        _sel([*stm, n.lock("stm", "*"), n.cache("*"), n.reply_dedup_all()],
             "+zadd +zrange +zremrangebyrank +zcard +expire +pexpire +get +set +del +unlink +exists +ttl +hset +hget "
             "+hmget +hgetall +eval +evalsha +script|load"),
        _sel([n.metrics("memory")], METRICS),
        _sel([n.user_input, n.ai_responses], CONSUME),
        _sel([n.memory_updates], "+xadd +xrange +xdel +xinfo|groups +xinfo|stream +xlen"),
        _sel([n.memory_requests], "+blpop +rpop +lpop +lindex +llen"),
        _sel([f"{p}*{dead('')}"], DEAD),
    ])
    ltm = " ".join([
        "resetkeys resetchannels -@all", CONNECT, "+publish +subscribe +unsubscribe",
        _c(f"{n.ltm_responses}*", n.ltm_warm, n.memory_updates_pubsub),
        _sel([n.lock("ltm", "*")], LOCK),
        _sel([n.metrics("ltm")], METRICS),
        _sel([n.memory_updates], CONSUME),
        _sel([n.ltm_requests], "+blpop +rpop +lpop +lindex +llen"),
        _sel([dead(n.memory_updates), dead(n.ltm_requests), dead(n.ltm_warm)], DEAD),
    ])
    chat = " ".join([
        "resetkeys resetchannels -@all", CONNECT, "+publish +subscribe +unsubscribe",
        _c(f"{n.ltm_responses}:*", f"{n.memory_responses}:*", f"{n.chat_responses}*"),
        _sel(stm, "+zrange +get +hgetall +hmget"),  # the STM, read only
        _sel([n.reply_dedup_all()], "+exists +set +get +del"),
        _sel([n.metrics("chat_ai")], METRICS),
        _sel([n.user_input], CONSUME),
        _sel([n.ai_responses], "+xadd +xrevrange +xlen"),
        _sel([n.ltm_requests, n.memory_requests], "+rpush +ltrim"),
        _sel([n.chat_requests], "+blpop +rpop +lpop +lindex +llen"),
        _sel([dead(n.user_input), dead(n.chat_requests)], DEAD),
    ])
    # the HTTP gateway: a client of the bus, like a chat front-end. It sends turns and requests and reads replies;
    # it reads the bus's state (/memory/status, the deletion's settling) but writes no service's stream, reads no
    # STM or cache, and runs no admin command
    streams = [n.user_input, n.ai_responses, n.memory_updates]
    requests = [n.ltm_requests, n.memory_requests, n.chat_requests]
    gateway = " ".join([
        "resetkeys resetchannels -@all", CONNECT, "+subscribe +unsubscribe",
        _c(f"{n.ltm_responses}:*", f"{n.memory_responses}:*", f"{n.chat_responses}:*"),
        _sel([n.user_input], "+xadd"),
        _sel([n.ai_responses], "+xread +xrevrange"),
        _sel(requests, "+rpush +ltrim +llen"),
        _sel(streams, "+xlen +xinfo|groups +xinfo|consumers +xinfo|stream +xpending"),
        _sel([f"{p}*{dead('')}"], "+xlen"),
        _sel([n.metrics("gateway")], METRICS),
    ])
    # the operator's: every key (evaluations and benches run the services on prefixes of their own), every command
    return {"memory": memory, "ltm": ltm, "chat_ai": chat, "gateway": gateway, "admin": "~* &* +@all"}


def dev_password(user: str) -> str:
    return f"{user}-dev-password"


def acl_file(names: Names, passwords: dict[str, str]) -> str:
    """The ACL file: ``default`` off, then each user with its password's SHA-256."""
    lines = ["user default off resetkeys resetchannels -@all"]  # an ACL file has no comments
    for user, rule in rules(names).items():
        digest = hashlib.sha256(passwords[user].encode()).hexdigest()
        lines.append(f"user {user} on #{digest} {rule}")
    return "\n".join(lines) + "\n"


def random_passwords() -> dict[str, str]:
    return {u: secrets.token_urlsafe(24) for u in USERS}


def with_user(url: str, user: str, password: str) -> str:
    """``redis://host:port/db`` with ``user:password@``."""
    scheme, _, rest = url.partition("://")
    rest = rest.rpartition("@")[2]
    return f"{scheme}://{user}:{password}@{rest}"


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", type=Path, default=None, help="write the file here (default: print it)")
    parser.add_argument("--passwords-from-env", action="store_true",
                        help="passwords from REDIS_PASSWORD_<USER> (MEMORY, LTM, CHAT_AI, GATEWAY, ADMIN); "
                             "default: the development passwords of compose")


def run(args: argparse.Namespace) -> int:
    if args.passwords_from_env:
        missing = [u for u in USERS if not os.environ.get(f"REDIS_PASSWORD_{u.upper()}")]
        if missing:
            print(f"mesh acl: set {', '.join(f'REDIS_PASSWORD_{u.upper()}' for u in missing)}")
            return 2
        passwords = {u: os.environ[f"REDIS_PASSWORD_{u.upper()}"] for u in USERS}
    else:
        passwords = {u: dev_password(u) for u in USERS}
    text = acl_file(Names.from_env(), passwords)
    if args.out:
        args.out.write_text(text)
        args.out.chmod(0o600)
    else:
        print(text, end="")
    return 0
