"""Label-noise simulation of the Grad-Mimic paper (plain torch, no Ray, runs offline).

    python jobs/simulation.py --help

The same options drive ``raymimic simulate``; both are defined once in
:mod:`raymimic.app.simulate` (options -> ``SimConfig`` -> ``run_simulation``).
"""
from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # run from a checkout

from raymimic.app.simulate import build_parser, main  # noqa: E402, F401  (build_parser: for tests and callers)

if __name__ == "__main__":
    sys.exit(main())
