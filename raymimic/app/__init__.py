"""The application: the ``raymimic`` command and the code behind ``jobs/``.

Everything here turns command-line arguments into ONE config object of the library
(``TrainConfig``, ``ScoreConfig``, ``FilterConfig``) or of an experiment above it
(``QuickstartConfig``, ``SimConfig``, ``ToyPoolConfig`` in :mod:`raymimic_experiments`) and
makes one call. The library (``raymimic.mimic``, ``clip``, ``data``, ``score_table``,
``train``, ``select``, ``evaluate``) never parses arguments and never imports this package
nor the experiments.

One module per subcommand, each with ``register(subparsers)`` which adds a parser and sets
``func`` to ``run(args) -> int``. Keep module imports light (argparse only): heavy imports
belong inside ``run``, and choices and defaults come from plain-Python modules, so that every
``--help`` stays instant.
"""
