"""``raymimic filter``: Stage 2, score tables -> DataComp subset (keep.npy) on Ray Data."""
from __future__ import annotations

import argparse

EPILOG = """
outputs (in --output, any fsspec URI):
  keep.npy           sorted numpy array of dtype "u8,u8": DataComp's resharder.py -s keep.npy
  decisions.parquet  one row per uid: aggregated mimic score, votes and keep per method, keep (a folder of parquet
                     parts when the scores are a score-table folder; every parquet reader reads it as one table)
  _stage2_tmp/       an unfinished run's committed work: rerun the same command to resume it (removed when done);
                     summary.json is written last, so a folder with summary.json is complete
  gallery.html       with --gallery: sampled dropped, borderline and kept samples as pictures (gallery_files/ beside it)
  summary.json       counts, fraction kept, quality estimate, method and fitted parameters (features chosen), and
                     "lift": per score column (score, score_<name>) Spearman with score_zero and with the filter's
                     column, overlap of the kept sets; with --ground-truth also ROC-AUC, F1 and the reference lift

examples:
  raymimic filter --scores RUN/scores --output OUT                       # GMM, defaults
  raymimic filter --scores RUN/scores --output OUT --method ensemble --rule all
  raymimic filter --scores RUN/scores --output OUT --method top-fraction --fraction 0.3
  # the paper's DataComp Stage 2 by name: top 30% by mimic score; CLIP-score top 30% minus mimic bottom 20%
  raymimic filter --scores RUN/scores --output OUT --paper-datacomp top30
  raymimic filter --scores RUN/scores --pool POOL --output OUT --paper-datacomp clip30-minus20
  # the same as the last, spelled out
  raymimic filter --scores RUN/scores --pool POOL --output OUT --method top-fraction --fraction 0.8 --clip-top 0.3
  # the paper's label-noise simulation rule (binarize w_i), not its DataComp procedure
  raymimic filter --scores RUN/scores --output OUT --method ensemble --paper-rule
  raymimic filter --scores RUN/scores --output OUT --score-column zero                  # filter on the zero control instead
  raymimic filter --scores RUN/scores --output OUT --ground-truth POOL/ground_truth.parquet --report   # reference lift
"""


_NAMES = "raymimic.select.names"  # the names of the choices
OPTIONS = ("scores", "output", "pool", "method", "feature", "rule", "fraction", "fit_sample", "seed", "nan", "duplicates", "missing",
           "clip_top", "min_clip_score", "clip_column", "basic", "language_model", "report", "score_column", "paper_rule",
           "paper_datacomp", "ground_truth", "gallery", "overwrite", "task_resources")


def _default(name: str):
    from raymimic.app.options import default
    from raymimic.select.config import FilterConfig

    return default(FilterConfig, name)


def register(subparsers) -> None:
    from raymimic.app.options import FEATURES, MIMIC_METHODS, VOTE_RULES, Names, add_lazy, add_print_config, resources_option

    p = subparsers.add_parser("filter", help="Stage 2: turn mimic score tables into a DataComp keep list",
                              description="Fit a binarizer (GMM, k-means, threshold) on a random sample of the Stage 1 score tables, "
                                          "apply it to every row with Ray tasks (in process for a small table), vote per uid across "
                                          "epochs and methods, and write a DataComp subset; a killed run resumes when rerun.",
                              epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--scores", required=True,
                   help="score tables: RUN/scores, a directory of parquet files (local path or s3://, gs://, ...)")
    p.add_argument("--output", required=True, help="output directory (local or fsspec URI)")
    p.add_argument("--pool", help="DataComp pool root: join its metadata on uid (needed by --clip-top/--min-clip-score/--basic)")
    add_lazy(p, "--method", choices=MIMIC_METHODS, metavar="METHOD", config_default=_default("method"),
             help="one of %(choices)s (default: %(config_default)s). gmm: 2-component mixture, keep the higher one; kmeans: 2 clusters; "
                  "threshold: weight above uniform (B*w > 1); ensemble: gmm, kmeans and threshold voted; "
                  "top-fraction: keep the --fraction of uids with the highest mean score")
    add_lazy(p, "--feature", choices=FEATURES, metavar="FEATURE",
             help="what the binarizers fit, one of %(choices)s; default step_z (per-step standardised score: robust to heavy-tailed "
                  "weights and drifting scale) for gmm/kmeans, norm_weight (B*w > 1) for threshold when the table's weights are "
                  "informative, step_z (cut 0) when it was recorded under uniform weights (B*w = 1 everywhere, e.g. --weighting sgd; "
                  "a weight feature is refused there)")
    add_lazy(p, "--score-column", metavar="NAME", config_default=_default("score_column"),
             help="the score column to filter on: score (the mimic score against the reference), any score_<name> column of the "
                  "table (a control direction or a baseline, higher = keep) or a bare control name (zero = score_zero); weight "
                  "features are refused for any column but score (default: %(config_default)s)")
    p.add_argument("--paper-rule", action="store_true", default=None,
                   help="the paper's label-noise simulation rule (binarize w): every binarizer on the weight w_i (threshold at "
                        "1/B, i.e. B*w > 1; GMM and k-means on B*w); not its DataComp procedure (--paper-datacomp); refused "
                        "on a table recorded under uniform weights")
    p.add_argument("--paper-datacomp", choices=Names(_NAMES, "PAPER_DATACOMP_RULES"), metavar="RULE",
                   help="the paper's DataComp Stage 2, one of %(choices)s: topN keeps the top N%% of uids by aggregated mimic "
                        "score (--method top-fraction --fraction 0.N); clip30-minusM keeps the pool's CLIP-score top 30%% "
                        "minus the mimic score's bottom M%% (--fraction 1-0.M --clip-top 0.3, needs --pool)")
    p.add_argument("--ground-truth", metavar="PATH",
                   help="parquet with uid and a boolean is_noisy (a toy pool's ground_truth.parquet): adds ROC-AUC, F1 and the "
                        "reference lift (AUC of score minus the best control's) to summary.json and the report")
    add_lazy(p, "--rule", names=VOTE_RULES, config_default=_default("rule"),
             help="vote across epochs and methods: %(names)s, or a fraction in (0, 1] like 0.6 (default: %(config_default)s; "
                  "majority drops ties)")
    add_lazy(p, "--fraction", type=float, config_default=_default("fraction"),
             help="top-fraction: share of uids to keep, in (0, 1] (default: %(config_default)s)")
    add_lazy(p, "--fit-sample", type=int, config_default=_default("fit_sample"),
             help="rows sampled at random to fit the binarizer (default: %(config_default)s)")
    add_lazy(p, "--seed", type=int, config_default=_default("seed"),
             help="seed of the fit sample and the fits (default: %(config_default)s)")
    add_lazy(p, "--nan", choices=Names(_NAMES, "NAN_HANDLING"), metavar="HOW", config_default=_default("nan"),
             help="rows with NaN score/weight, one of %(choices)s: drop and count, or stop (default: %(config_default)s)")
    add_lazy(p, "--duplicates", choices=Names(_NAMES, "DUPLICATE_HANDLING"), metavar="HOW", config_default=_default("duplicates"),
             help="repeated (uid, step) rows, one of %(choices)s: stop, or let each vote and count them (default: %(config_default)s)")
    add_lazy(p, "--missing", "--unscored", dest="missing", choices=Names(_NAMES, "MISSING_HANDLING"), metavar="HOW",
             config_default=_default("missing"),
             help="with --pool: pool uids without any score, one of %(choices)s (default: %(config_default)s; counted either way; "
                  "--unscored is the same option's former name)")
    p.add_argument("--clip-top", type=float, help="with --pool: also keep only the top fraction by CLIP score (e.g. 0.3)")
    p.add_argument("--min-clip-score", type=float, help="with --pool: also keep only CLIP score >= this")
    add_lazy(p, "--clip-column", config_default=_default("clip_column"),
             help="metadata column with the CLIP score (default: %(config_default)s)")
    p.add_argument("--basic", action="store_true", default=None,
                   help="with --pool: also apply DataComp basic filtering (caption and image-size rules)")
    p.add_argument("--language-model",
                   help="fastText language-id model file for --basic's English check (skipped with a warning without it)")
    p.add_argument("--report", action="store_true", default=None, help="also write report.md with histograms (as `raymimic report` does)")
    p.add_argument("--gallery", action="store_true", default=None,
                   help="with --pool: also write gallery.html, thumbnails of dropped, borderline and kept samples read from the shards "
                        "that hold them, and the same uids under every score column (with --ground-truth: the kind of noise)")
    p.add_argument("--overwrite", action="store_true", default=None,
                   help="start afresh when --output holds an unfinished run of other inputs or settings (by default a rerun with the "
                        "same inputs and settings resumes it, skipping the work it committed, and one with others is refused)")
    p.add_argument("--ray-address", help="Ray cluster address (default: start or join a local one)")
    p.add_argument("--task-resources", type=resources_option, metavar="NAME=AMOUNT[,...]",
                   help="custom Ray resources each Ray task asks for besides its CPU, e.g. cpu_node=1 to keep the filter on the "
                        "nodes that advertise cpu_node (off the GPU nodes); a table filtered in process ignores it")
    add_print_config(p)
    p.set_defaults(func=run, parser=p)


def run(args) -> int:
    import json
    import os

    from raymimic.app.options import build, fail, given, print_config
    from raymimic.select.pipeline import FilterConfig, check_inputs, run_filter

    options = given(args, OPTIONS)
    if "paper_datacomp" in options and {"method", "fraction"} & set(options):
        fail(args.parser, f"--paper-datacomp {options['paper_datacomp']} sets --method top-fraction and --fraction itself: "
                          "drop --method/--fraction")
    cfg = build(args.parser, FilterConfig, **options)
    if args.print_config:
        return print_config(cfg)
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    try:
        n_rows = check_inputs(cfg)
        if cfg.pool is not None or n_rows > _local_rows() or args.ray_address:  # a small table is filtered without Ray
            import ray

            if not ray.is_initialized():
                ray.init(address=args.ray_address, include_dashboard=False, configure_logging=False)
        summary = run_filter(cfg)
    except (ValueError, OSError) as err:  # bad input, an unwritable or full disk: one line naming the file, column or option
        fail(args.parser, _one_line(err, cfg.output))
    print(json.dumps({k: summary[k] for k in ("n_decisions", "n_kept", "fraction_kept")}, indent=None))
    for name, path in summary["files"].items():
        print(f"wrote {name}: {path}")
    return 0


def _local_rows() -> int:
    from raymimic.select.executors.tasks import LOCAL_ROWS

    return LOCAL_ROWS


def _one_line(err: Exception, output: str) -> str:
    import errno

    if isinstance(err, OSError) and err.errno in (errno.ENOSPC, errno.EFBIG, errno.EDQUOT):
        return (f"no space left to write under --output {output!r} ({err.strerror}); its committed work stays in "
                "_stage2_tmp: free space and rerun the same command to resume")
    return " ".join(str(err).split())
