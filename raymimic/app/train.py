"""``raymimic train``: Stage 1 (training with per-sample mimic scores) on Ray Train."""
from __future__ import annotations

import argparse

DESCRIPTION = """\
Stage 1: data-parallel open_clip training on Ray Train in which every sample of every
global batch gets its exact mimic score (Grad-Mimic), the batch is re-weighted by
softmax(score / tau), and the scores land in a table for Stage 2.

Writes under --output (local path or fsspec URI):
  scores/*.parquet        uid, step, epoch, rank, score (raw m_i), weight (w_i), batch_size
                          exactly one row per (uid, step) trained on, also across failures
  checkpoints/final.pt    the trained model, open_clip format
  ray_train/              resumable checkpoints; rerun with the same --output to resume

--preset picks DataComp's scale (small, medium: ViT-B-32, batch 4096; large: ViT-B-16,
batch 8192; xlarge: ViT-L-14, batch 90112) or raymimic's tiny/toy; any option overrides it."""

EPILOG = """\
examples:
  raymimic train --preset small --pool s3://bucket/pool --reference ViT-B-32:datacomp_m_s128m_b4k \\
      --output s3://bucket/runs/small-mimic --workers 8 --gpu
  raymimic train --preset toy --pool /tmp/toy --reference /tmp/ref.pt --output /tmp/run --workers 2
  raymimic train --smoke
"""


def register(subparsers) -> None:
    from raymimic.train.config import PRESETS
    from raymimic.app.train_job import add_train_arguments

    parser = subparsers.add_parser(
        "train",
        help="Stage 1: train CLIP on Ray Train and score every sample at every step (Grad-Mimic)",
        description=DESCRIPTION,
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--preset", choices=sorted(PRESETS), default="small",
                        help="scale preset whose model, samples seen, batch, lr and warm-up are the defaults (default small)")
    add_train_arguments(parser, "small")
    parser.set_defaults(func=run)


def run(args) -> int:
    from raymimic.train.config import PRESETS
    from raymimic.app.train_job import run_job

    # options the user did not change take the chosen preset's value
    small, chosen = PRESETS["small"], PRESETS[args.preset]
    for key in ("model", "samples_seen", "global_batch", "lr", "warmup"):
        if getattr(args, key) == small[key]:
            setattr(args, key, chosen[key])
    return run_job(args)
