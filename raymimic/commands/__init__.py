"""Subcommands of the ``raymimic`` CLI: one module each, with ``register(subparsers)``.

``register`` adds a parser and sets ``func`` to a function ``run(args) -> int``. Keep the
module import light (argparse only): heavy imports belong inside ``run``.
"""
