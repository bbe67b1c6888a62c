"""``raymimic quickstart``: the whole flow on a toy pool (see raymimic/quickstart.py)."""
from __future__ import annotations

import argparse

HELP = """Runs everything offline on a toy pool with known caption noise: writes the pool, trains a
reference model on a clean pool, runs Stage 1 (Grad-Mimic training with per-sample scores),
Stage 2 (the ensemble mimic filter), trains the same model on the whole, the mimic-filtered
and a CLIPScore-filtered pool, evaluates them on a held-out clean split and writes
OUTPUT/report.md with the noise-detection F1 and the models' accuracies."""


def _add_arguments(parser: argparse.ArgumentParser) -> None:
    from_defaults = _defaults()
    parser.add_argument("--output", default=from_defaults.output, help="run folder (default: %(default)s)")
    parser.add_argument("--samples", type=int, default=from_defaults.samples, help="noisy pool size (default: %(default)s)")
    parser.add_argument("--noise", type=float, default=from_defaults.noise, help="fraction of corrupted captions (default: %(default)s)")
    parser.add_argument("--epochs", type=int, default=from_defaults.epochs, help="epochs of every training run (default: %(default)s)")
    parser.add_argument("--tau", type=float, default=from_defaults.tau, help="Grad-Mimic softmax temperature (default: %(default)s)")
    parser.add_argument("--method", default=from_defaults.method, choices=["gmm", "kmeans", "threshold", "ensemble"],
                        help="Stage 2 binarizer (default: %(default)s)")
    parser.add_argument("--stage1-weighting", default="sgd", choices=["sgd", "grad-mimic"],
                        help="batch weighting while Stage 1 records the scores (default: %(default)s; see README for why)")
    parser.add_argument("--workers", type=int, default=from_defaults.workers, help="Ray Train workers (default: %(default)s)")
    parser.add_argument("--seed", type=int, default=from_defaults.seed)


def _defaults():
    # the dataclass is the single source of defaults (raymimic.quickstart imports no torch/ray at import time)
    from raymimic.quickstart import QuickstartConfig

    return QuickstartConfig()


def register(subparsers) -> None:
    parser = subparsers.add_parser("quickstart", help="the whole flow on a toy pool, offline", description=HELP)
    _add_arguments(parser)
    parser.set_defaults(func=run)


def run(args) -> int:
    from raymimic.quickstart import QuickstartConfig, run as run_quickstart

    cfg = QuickstartConfig(output=args.output, samples=args.samples, noise=args.noise, epochs=args.epochs, tau=args.tau,
                           method=args.method, workers=args.workers, seed=args.seed, stage1_weighting=args.stage1_weighting)
    run_quickstart(cfg)
    return 0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python jobs/quickstart.py", description=HELP)
    _add_arguments(parser)
    return run(parser.parse_args(argv))
