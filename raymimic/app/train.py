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

--preset (default {default_preset}) sets the model, samples seen, global batch, lr and warm-up;
every option given on the command line overrides the preset's value:
{presets}"""

EPILOG = """\
examples:
  raymimic train --preset small --pool s3://bucket/pool --reference ViT-B-32:datacomp_m_s128m_b4k \\
      --output s3://bucket/runs/small-mimic --workers 8 --gpu
  raymimic train --preset toy --pool /tmp/toy --reference /tmp/ref.pt --output /tmp/run --workers 2
  raymimic train --smoke
  raymimic train --preset tiny --model ViT-B-32 --global-batch 4096 --samples-seen 8192 \\
      --pool P --reference R --output O --print-config     # the resolved settings, nothing runs
"""


def _preset_table() -> str:
    from raymimic.train.config import PRESETS

    return "\n".join(f"  {name:<7} {p['model']:<15} samples seen {p['samples_seen']:>14,}  batch {p['global_batch']:>6}  "
                     f"lr {p['lr']:g}  warm-up {p['warmup']}" for name, p in PRESETS.items())


def register(subparsers) -> None:
    from raymimic.app.train_job import add_train_arguments
    from raymimic.train.config import DEFAULT_PRESET, PRESETS

    parser = subparsers.add_parser(
        "train",
        help="Stage 1: train CLIP on Ray Train and score every sample at every step (Grad-Mimic)",
        description=DESCRIPTION.format(default_preset=DEFAULT_PRESET, presets=_preset_table()),
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--preset", choices=tuple(PRESETS),
                        help=f"scale preset whose model, samples seen, batch, lr and warm-up are the defaults "
                             f"(default: {DEFAULT_PRESET}; tiny with --smoke)")
    add_train_arguments(parser, DEFAULT_PRESET, preset_is_option=True)
    parser.set_defaults(func=run, parser=parser)


def run(args) -> int:
    from raymimic.app.train_job import run_job
    from raymimic.train.config import DEFAULT_PRESET

    return run_job(args.parser, args, DEFAULT_PRESET)
