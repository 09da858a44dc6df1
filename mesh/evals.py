"""``python -m mesh eval <benchmark>``: ``locomo`` (mesh/eval_locomo.py), ``longmemeval`` (mesh/eval_longmemeval.py),
``docs`` (mesh/eval_docs.py), ``stm`` (mesh/eval_stm.py)."""

from __future__ import annotations

import argparse


def configure(parser: argparse.ArgumentParser) -> None:
    from mesh import eval_docs, eval_locomo, eval_longmemeval, eval_stm

    eval_locomo.configure(parser)  # adds the benchmark sub-commands with "locomo"
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    eval_longmemeval.add_parser(sub)
    eval_docs.add_parser(sub)
    eval_stm.add_parser(sub)


def run(args: argparse.Namespace) -> int:
    if args.benchmark == "docs":
        from mesh import eval_docs

        return eval_docs.run(args)
    if args.benchmark == "stm":
        from mesh import eval_stm

        return eval_stm.run(args)
    if args.benchmark == "longmemeval":
        from mesh import eval_longmemeval

        return eval_longmemeval.run(args)
    from mesh import eval_locomo

    return eval_locomo.run(args)
