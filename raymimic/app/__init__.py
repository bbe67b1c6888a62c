"""The application: the ``raymimic`` command and the code behind ``jobs/``.

Everything here turns command-line arguments into ONE config object of the library
(``TrainConfig``, ``ScoreConfig``, ``FilterConfig``, ``QuickstartConfig``, ``SimConfig``,
``ToyPoolConfig``) and makes one library call. The library (``raymimic.mimic``, ``clip``,
``data``, ``train``, ``select``, ``sim``, ``evaluate``) never parses arguments and never
imports this package.

One module per subcommand, each with ``register(subparsers)`` which adds a parser and sets
``func`` to ``run(args) -> int``. Keep module imports light (argparse only): heavy imports
belong inside ``run`` so that ``raymimic --help`` stays instant.
"""
