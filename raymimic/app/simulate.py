"""``raymimic simulate``: the paper's label-noise simulation (see ``raymimic simulate --help``)."""
from __future__ import annotations

import argparse


def register(subparsers) -> None:
    from raymimic.app.simulate_options import DESCRIPTION, EPILOG, add_arguments, run

    parser = subparsers.add_parser(
        "simulate",
        help="label-noise simulation: Grad-Mimic vs baselines on a small image dataset, offline",
        description=DESCRIPTION,
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_arguments(parser)
    parser.set_defaults(func=run)
