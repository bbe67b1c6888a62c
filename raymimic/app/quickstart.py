"""``raymimic quickstart``: the whole flow on a toy pool (see raymimic/quickstart.py)."""
from __future__ import annotations

import argparse

HELP = """Runs everything offline on a toy pool with known caption noise: writes the pool, trains a
reference model on a clean pool, runs Stage 1 (Grad-Mimic training with per-sample scores),
Stage 2 (the ensemble mimic filter), trains the same model on the whole, the mimic-filtered
and a CLIPScore-filtered pool, evaluates them on a held-out clean split and writes
OUTPUT/report.md with the noise-detection F1 and the models' accuracies."""


OPTIONS = ("output", "samples", "noise", "epochs", "tau", "method", "stage1_weighting", "workers", "seed")


def _add_arguments(parser: argparse.ArgumentParser) -> None:
    from raymimic.app.options import MIMIC_METHODS, WEIGHTINGS, add_print_config, default
    from raymimic.quickstart import QuickstartConfig

    def dflt(name: str):
        return default(QuickstartConfig, name)

    parser.add_argument("--output", help=f"run folder (default: {dflt('output')})")
    parser.add_argument("--samples", type=int, help=f"noisy pool size (default: {dflt('samples')})")
    parser.add_argument("--noise", type=float, help=f"fraction of corrupted captions, in [0, 1) (default: {dflt('noise')})")
    parser.add_argument("--epochs", type=int, help=f"epochs of every training run (default: {dflt('epochs')})")
    parser.add_argument("--tau", type=float, help=f"Grad-Mimic softmax temperature, > 0 (default: {dflt('tau')})")
    parser.add_argument("--method", choices=MIMIC_METHODS, metavar="METHOD",
                        help=f"Stage 2 binarizer, one of %(choices)s (default: {dflt('method')})")
    parser.add_argument("--stage1-weighting", choices=WEIGHTINGS, metavar="WEIGHTING",
                        help=f"batch weighting while Stage 1 records the scores, one of %(choices)s "
                             f"(default: {dflt('stage1_weighting')}; the README says why)")
    parser.add_argument("--workers", type=int, help=f"Ray Train workers (default: {dflt('workers')})")
    parser.add_argument("--seed", type=int, help=f"seed of the pools and the training runs (default: {dflt('seed')})")
    add_print_config(parser)


def register(subparsers) -> None:
    parser = subparsers.add_parser("quickstart", help="the whole flow on a toy pool, offline", description=HELP)
    _add_arguments(parser)
    parser.set_defaults(func=run, parser=parser)


def run(args) -> int:
    from raymimic.app.options import build, given, print_config
    from raymimic.quickstart import QuickstartConfig
    from raymimic.quickstart import run as run_quickstart

    cfg = build(args.parser, QuickstartConfig, **given(args, OPTIONS))
    if args.print_config:
        return print_config(cfg)
    run_quickstart(cfg)
    return 0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python jobs/quickstart.py", description=HELP)
    _add_arguments(parser)
    parser.set_defaults(parser=parser)
    return run(parser.parse_args(argv))
