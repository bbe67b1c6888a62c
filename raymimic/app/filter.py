"""``raymimic filter``: Stage 2, score tables -> DataComp subset (keep.npy) on Ray Data."""
from __future__ import annotations

import argparse

EPILOG = """
outputs (in --output, any fsspec URI):
  keep.npy           sorted numpy array of dtype "u8,u8": DataComp's resharder.py -s keep.npy
  decisions.parquet  one row per uid: aggregated mimic score, votes and keep per method, keep
  summary.json       counts, fraction kept, quality estimate, method and fitted parameters

examples:
  raymimic filter --scores RUN/scores --output OUT                       # GMM, defaults
  raymimic filter --scores RUN/scores --output OUT --method ensemble --rule all
  raymimic filter --scores RUN/scores --output OUT --method top-fraction --fraction 0.3
  # the paper's best DataComp filter: CLIP-score top 30% minus mimic bottom 20%
  raymimic filter --scores RUN/scores --pool POOL --output OUT --method top-fraction --fraction 0.8 --clip-top 0.3
"""


def register(subparsers) -> None:
    p = subparsers.add_parser("filter", help="Stage 2: turn mimic score tables into a DataComp keep list",
                              description="Fit a binarizer (GMM, k-means, threshold) on a random sample of the Stage 1 score tables, apply it to every "
                                          "row with Ray Data, vote per uid across epochs and methods, and write a DataComp subset.",
                              epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--scores", required=True, help="score tables: RUN/scores, a directory of parquet files (local path or s3://, gs://, ...)")
    p.add_argument("--output", required=True, help="output directory (local or fsspec URI)")
    p.add_argument("--pool", help="DataComp pool root: join its metadata on uid (needed by --clip-top/--min-clip-score/--basic)")
    p.add_argument("--method", default="gmm", choices=["gmm", "kmeans", "threshold", "ensemble", "top-fraction"],
                   help="gmm (default): 2-component mixture, keep the higher one; kmeans: 2 clusters; threshold: weight above uniform (B*w > 1); "
                        "ensemble: all three voted; top-fraction: keep the --fraction of uids with the highest mean score")
    p.add_argument("--feature", choices=["step_z", "log_norm_weight", "norm_weight", "score"],
                   help="what the binarizers fit; default step_z (per-step standardised score: robust to heavy-tailed weights and drifting scale) "
                        "for gmm/kmeans, norm_weight for threshold")
    p.add_argument("--rule", default="majority", help="vote across epochs and methods: majority (default, tie drops), all, any, or a fraction like 0.6")
    p.add_argument("--fraction", type=float, default=0.3, help="top-fraction: share of uids to keep (default 0.3, the paper's mimic top 30%%)")
    p.add_argument("--fit-sample", type=int, default=100_000, help="rows sampled at random to fit the binarizer (default 100000)")
    p.add_argument("--seed", type=int, default=0, help="seed of the fit sample and the fits")
    p.add_argument("--nan", default="drop", choices=["drop", "error"], help="rows with NaN score/weight: drop and count (default) or stop")
    p.add_argument("--duplicates", default="error", choices=["error", "count"], help="repeated (uid, step) rows: stop (default) or let each vote and count them")
    p.add_argument("--unscored", default="drop", choices=["drop", "keep", "error"], help="with --pool: pool uids without any score (default: drop, counted)")
    p.add_argument("--clip-top", type=float, help="with --pool: also keep only the top fraction by CLIP score (e.g. 0.3)")
    p.add_argument("--min-clip-score", type=float, help="with --pool: also keep only CLIP score >= this (DataComp B/32: 0.25)")
    p.add_argument("--clip-column", default="clip_l14_similarity_score", help="metadata column with the CLIP score (default clip_l14_similarity_score)")
    p.add_argument("--basic", action="store_true", help="with --pool: also apply DataComp basic filtering (caption and image-size rules)")
    p.add_argument("--language-model", help="fastText language-id model file for --basic's English check (skipped with a warning without it)")
    p.add_argument("--report", action="store_true", help="also write report.md with histograms (as `raymimic report` does)")
    p.add_argument("--ray-address", help="Ray cluster address (default: start or join a local one)")
    p.set_defaults(func=run)


def run(args) -> int:
    import json
    import os

    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    import ray

    from raymimic.select.pipeline import run_filter

    if not ray.is_initialized():
        ray.init(address=args.ray_address, include_dashboard=False, configure_logging=False)
    summary = run_filter(
        scores=args.scores, output=args.output, pool=args.pool, method=args.method, feature=args.feature, rule=args.rule, fraction=args.fraction,
        fit_sample=args.fit_sample, seed=args.seed, nan=args.nan, duplicates=args.duplicates, unscored=args.unscored, clip_top=args.clip_top,
        min_clip_score=args.min_clip_score, clip_column=args.clip_column, basic=args.basic, language_model=args.language_model, report=args.report,
    )
    print(json.dumps({k: summary[k] for k in ("n_decisions", "n_kept", "fraction_kept")}, indent=None))
    for name, path in summary["files"].items():
        print(f"wrote {name}: {path}")
    return 0
