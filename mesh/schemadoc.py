"""``python -m mesh schema``: check (default) or ``--write`` the JSON Schema files in ``docs/schema/``."""

from __future__ import annotations

import argparse

from shared.contracts import schema


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--write", action="store_true", help="regenerate docs/schema/ from the pydantic models")


def run(args: argparse.Namespace) -> int:
    if args.write:
        for path in schema.write():
            print(path)
        return 0
    if stale := schema.stale():
        print(f"docs/schema is stale ({', '.join(stale)}): run `python -m mesh schema --write`")
        return 1
    print(f"docs/schema: {len(schema.MESSAGES)} files, up to date")
    return 0
