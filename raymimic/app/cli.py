"""The ``raymimic`` command line.

Each subcommand lives in its own module under :mod:`raymimic.app` and exposes
``register(subparsers)``; this file only lists and dispatches them. Command modules import their heavy dependencies
(torch, ray) inside ``run`` so that ``raymimic --help`` stays instant.
"""
from __future__ import annotations

import argparse
import importlib
import sys

# module of raymimic.app -> the subcommand it registers (order of `raymimic --help`)
COMMANDS = ("train", "score", "filter", "report", "quickstart", "simulate", "make_toy_pool")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="raymimic",
        description=(
            "Select training data for CLIP-style models with the mimic score (Grad-Mimic) "
            "on Ray. Stage 1 trains and scores every sample; Stage 2 turns the scores into a "
            "DataComp keep list. Run `raymimic COMMAND --help` for the options of a command."
        ),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in COMMANDS:
        importlib.import_module(f"raymimic.app.{name}").register(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
