"""``raymimic score``: mimic scores of every sample of a pool at a fixed checkpoint."""
from __future__ import annotations

import argparse

DESCRIPTION = """\
Score-only pass: every sample of --pool gets its mimic score at a fixed model (--checkpoint),
without any weight update, as a Ray Data map_batches stage on an actor pool (one GPU per
actor with --gpu). Useful for pools larger than what one training run sees.

Writes --output/scores/*.parquet with the score-table columns: uid, step (the checkpoint's
step, -1 if unknown), epoch, rank (0), score (raw m_i), weight (softmax over the scoring
batch), batch_size (samples in the scoring batch), and one float32 score_<name> per control
(--controls, default: score_zero) and baseline (--baselines)."""

EPILOG = """\
example:
  raymimic score --pool s3://bucket/pool --model ViT-B-32 --checkpoint s3://bucket/runs/m1/checkpoints/final.pt \\
      --reference ViT-B-32:datacomp_m_s128m_b4k --output s3://bucket/scores-m1 --actors 8 --gpu
"""


def register(subparsers) -> None:
    from raymimic.app.options import MIMIC_LAYER_ALIASES, add_lazy, add_print_config, default
    from raymimic.train.config import BASELINES, SCORE_KINDS, ScoreConfig

    def dflt(name: str):
        return default(ScoreConfig, name)

    parser = subparsers.add_parser("score", help="score every sample of a pool at a fixed checkpoint (no training)",
                                   description=DESCRIPTION, epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pool", required=True, help="DataComp pool folder or fsspec URI")
    parser.add_argument("--model", required=True, help="open_clip model name of the checkpoint (e.g. ViT-B-32)")
    parser.add_argument("--checkpoint", help="model to score with: checkpoint path/URI or a pretrained tag (default: random init)")
    parser.add_argument("--reference", required=True, help="reference model: MODEL:TAG, tag, path or URI (same architecture)")
    parser.add_argument("--output", required=True, help="folder or URI; scores go to OUTPUT/scores/")
    add_lazy(parser, "--mimic-layer", names=MIMIC_LAYER_ALIASES,
                   help=f"an alias (%(names)s) or any 2-D parameter name of the model (default: {dflt('mimic_layer')})")
    parser.add_argument("--score-kind", choices=SCORE_KINDS, help=f"proj or cos (default: {dflt('score_kind')})")
    parser.add_argument("--tau", type=float, help=f"softmax temperature of the weight column, > 0 (default: {dflt('tau')})")
    parser.add_argument("--batch-size", type=int, help=f"scoring batch: the contrastive loss runs over it (default: {dflt('batch_size')})")
    parser.add_argument("--actors", type=int, help=f"scoring actors (default: {dflt('actors')})")
    parser.add_argument("--gpu", action="store_true", default=None, help="one GPU per actor, bf16 autocast")
    parser.add_argument("--step", type=int, help="value of the step column (default: read from the checkpoint, else -1)")
    parser.add_argument("--controls", metavar="LIST",
                        help="comma-separated control directions, one column score_<name> each: zero (V = -W_ckpt), random "
                             "(R - W_ckpt, R seeded with the reference's norm), function (V_fn = -dD/dW, how the layer must move for the "
                             "checkpoint's batch similarities to match the reference's; runs the reference forward), output (the same "
                             "question asked of the batch's logits, no backward; runs the reference forward), NAME=SPEC "
                             "(another reference); init, fixed and "
                             "current are refused here (at a fixed checkpoint W_0 = W_ckpt); 'none' for no controls "
                             f"(default: {','.join(dflt('controls'))}, fixed left out)")
    parser.add_argument("--baselines", metavar="LIST",
                        help=f"comma-separated per-sample baselines, columns score_<name>, higher = more likely kept: "
                             f"{', '.join(BASELINES)} (see raymimic train --help) (default: none)")
    add_print_config(parser)
    parser.set_defaults(func=run, parser=parser)


OPTIONS = ("pool", "model", "checkpoint", "reference", "output", "mimic_layer", "score_kind", "tau", "batch_size", "actors", "gpu", "step",
           "controls", "baselines")


def run(args) -> int:
    from raymimic.app.options import build, given, print_config
    from raymimic.train.config import ScoreConfig

    cfg = build(args.parser, ScoreConfig, **given(args, OPTIONS, {"gpu": "use_gpu"}))
    if args.print_config:
        return print_config(cfg)
    import ray

    from raymimic.train.score_only import run_score_only

    if not ray.is_initialized():
        ray.init()
    print(f"score table written to {run_score_only(cfg)}")
    return 0
