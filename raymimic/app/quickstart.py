"""``raymimic quickstart``: the whole flow on a toy pool (see raymimic_experiments/quickstart.py)."""
from __future__ import annotations

import argparse

HELP = """Runs everything offline on a toy pool with known noise: random caption corruption and
systematic noise (one class consistently captioned as another, which only a reference that
learnt the classes elsewhere can flag). Writes the pool, trains a reference on a separate clean
pool from another initialisation, runs Stage 1 and Stage 2 in two modes side by side (the
paper's DataComp procedure: Grad-Mimic re-weighting, then the top 30% by mimic score and
CLIPScore's top 30% minus the mimic bottom 15%; the best: the
measured choice of weighting and score column), trains the same model on the whole pool, on
each mode's subset and on a CLIPScore-filtered one, evaluates them on a held-out clean split,
checks that the pool needs a reference (the reference's own loss flags the relabelled samples,
the target's does not) and writes OUTPUT/report.md with detection F1, each mode's reference
lift over the controls, and the models' accuracies."""


OPTIONS = ("output", "samples", "noise", "relabel", "epochs", "tau", "method", "stage1_weighting", "filter_score_column",
           "reference_init", "paper_mode", "workers", "seed")


def _add_arguments(parser: argparse.ArgumentParser) -> None:
    from raymimic.app.options import MIMIC_METHODS, WEIGHTINGS, add_print_config, default
    from raymimic_experiments.quickstart import QuickstartConfig

    def dflt(name: str):
        return default(QuickstartConfig, name)

    parser.add_argument("--output", help=f"run folder (default: {dflt('output')})")
    parser.add_argument("--samples", type=int, help=f"noisy pool size (default: {dflt('samples')})")
    parser.add_argument("--noise", type=float, help=f"fraction of corrupted captions, in [0, 1) (default: {dflt('noise')})")
    parser.add_argument("--relabel", type=float,
                        help=f"fraction consistently relabelled one way over 4 class pairs (systematic noise) (default: {dflt('relabel')})")
    parser.add_argument("--reference-init", choices=("other", "same"),
                        help=f"the reference starts from another seed (as public ones) or the target's (default: {dflt('reference_init')})")
    parser.add_argument("--filter-score-column", metavar="COLUMN",
                        help="the best mode's Stage-2 score column: score or a control/baseline name "
                             f"(default: {dflt('filter_score_column')})")
    parser.add_argument("--no-paper-mode", dest="paper_mode", action="store_false", default=None,
                        help="skip the paper's mode (one Stage-1 run and two trainings fewer)")
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
    from raymimic_experiments.quickstart import QuickstartConfig
    from raymimic_experiments.quickstart import run as run_quickstart

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
