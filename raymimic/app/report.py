"""``raymimic report``: a Markdown page with histograms for a Stage 2 filter output."""
from __future__ import annotations


def register(subparsers) -> None:
    from raymimic.app.options import add_print_config

    p = subparsers.add_parser("report", help="Stage 2: histograms, fitted mixtures, kept/dropped counts for a filter output",
                              description="Read OUT/summary.json and OUT/fit_sample.parquet written by `raymimic filter` and write "
                                          "OUT/report.md with per-epoch score histograms (the fitted mixture drawn on them), counts, "
                                          "the quality estimate and, when the score table had control columns (score_<name>), the "
                                          "reference-lift table (Spearman, overlap, and with --ground-truth ROC-AUC, F1 and the lift). "
                                          "No Ray needed.")
    p.add_argument("output", help="the --output directory of `raymimic filter` (local or fsspec URI)")
    add_print_config(p)
    p.set_defaults(func=run)


def run(args) -> int:
    import json

    if args.print_config:
        print(json.dumps({"output": args.output}, indent=2))
        return 0
    from raymimic.select.report import write_report

    print(f"wrote report: {write_report(args.output)}")
    return 0
