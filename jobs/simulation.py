"""Label-noise simulation of the Grad-Mimic paper (plain torch, no Ray, runs offline).

    python jobs/simulation.py --help

The same options drive ``raymimic simulate``; both are defined once in
:mod:`raymimic.app.simulate_options`.
"""
from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # run from a checkout

from raymimic.app.simulate_options import DESCRIPTION, EPILOG, add_arguments, run  # noqa: E402


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="simulation.py", description=DESCRIPTION, epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    return add_arguments(parser)


def main(argv: list[str] | None = None) -> int:
    return run(build_parser().parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
