"""`mesh chat`: an interactive prompt against the running mesh (used by `make run`)."""

from __future__ import annotations

import argparse
import asyncio
import getpass
import sys

from mesh.client import MeshClient
from shared.contracts import new_id

HELP = "commands: /new (new session), /user NAME (switch user), /quit (or Ctrl-D)"


async def chat(user_id: str) -> int:
    client = await MeshClient.connect()
    loop = asyncio.get_running_loop()
    session = new_id()[:8]
    print(f"memory mesh chat: user {user_id}, session {session}. {HELP}")
    try:
        print(f"waiting for the ltm service ... backend: {await client.wait_for_ltm()}")
        while True:
            line = await loop.run_in_executor(None, _prompt, f"{user_id}> ")
            if line is None or line.strip() == "/quit":
                return 0
            text = line.strip()
            if not text:
                continue
            if text == "/new":
                session = new_id()[:8]
                print(f"(new session {session})")
                continue
            if text.startswith("/user "):
                user_id, session = text.split(maxsplit=1)[1], new_id()[:8]
                print(f"(user {user_id}, new session {session})")
                continue
            try:
                reply = await client.say(text, user_id=user_id, session_id=session)
            except TimeoutError as exc:
                print(f"(no reply: {exc})")
                continue
            m = reply.meta
            print(f"[{m.model}, ltm={m.ltm}, memories={m.memories_used}, {m.latency_ms:.0f} ms]\n{reply.content}\n")
    finally:
        await client.close()


def _prompt(text: str) -> str | None:
    try:
        return input(text)
    except EOFError:
        return None


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--user", default=None, help="user id (default: your login name)")


def run(args: argparse.Namespace) -> int:
    if not sys.stdin.isatty():
        print("mesh chat reads from a terminal; for a scripted run use `make demo`", file=sys.stderr)
    try:
        return asyncio.run(chat(args.user or getpass.getuser()))
    except KeyboardInterrupt:
        return 130
