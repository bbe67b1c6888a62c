"""``raymimic score``: mimic scores of every sample of a pool at a fixed checkpoint."""
from __future__ import annotations

import argparse

DESCRIPTION = """\
Score-only pass: every sample of --pool gets its mimic score at a fixed model (--checkpoint),
without any weight update, as a Ray Data map_batches stage on an actor pool (one GPU per
actor with --gpu). Useful for pools larger than what one training run sees.

Writes --output/scores/*.parquet with the score-table columns: uid, step (the checkpoint's
step, -1 if unknown), epoch, rank (0), score (raw m_i), weight (softmax over the scoring
batch), batch_size (samples in the scoring batch)."""

EPILOG = """\
example:
  raymimic score --pool s3://bucket/pool --model ViT-B-32 --checkpoint s3://bucket/runs/m1/checkpoints/final.pt \\
      --reference ViT-B-32:datacomp_m_s128m_b4k --output s3://bucket/scores-m1 --actors 8 --gpu
"""


def register(subparsers) -> None:
    parser = subparsers.add_parser("score", help="score every sample of a pool at a fixed checkpoint (no training)",
                                   description=DESCRIPTION, epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pool", required=True, help="DataComp pool folder or fsspec URI")
    parser.add_argument("--model", required=True, help="open_clip model name of the checkpoint (e.g. ViT-B-32)")
    parser.add_argument("--checkpoint", help="model to score with: checkpoint path/URI or a pretrained tag (default: random init)")
    parser.add_argument("--reference", required=True, help="reference model: MODEL:TAG, tag, path or URI (same architecture)")
    parser.add_argument("--output", required=True, help="folder or URI; scores go to OUTPUT/scores/")
    parser.add_argument("--mimic-layer", default="image-mlp", help="image-mlp, text-mlp, image-proj, text-proj or a parameter name (default image-mlp)")
    parser.add_argument("--score-kind", choices=["proj", "cos"], default="proj", help="proj or cos (default proj)")
    parser.add_argument("--tau", type=float, default=0.05, help="softmax temperature of the weight column (default 0.05)")
    parser.add_argument("--batch-size", type=int, default=256, help="scoring batch: the contrastive loss runs over it (default 256)")
    parser.add_argument("--actors", type=int, default=1, help="scoring actors (default 1)")
    parser.add_argument("--gpu", action="store_true", help="one GPU per actor, bf16 autocast")
    parser.add_argument("--step", type=int, help="value of the step column (default: read from the checkpoint, else -1)")
    parser.set_defaults(func=run)


def run(args) -> int:
    import ray

    from raymimic.clip.models import local_copy
    from raymimic.data.preprocess import clip_training_dataset
    from raymimic.train.score_only import score_dataset, write_scores

    if not ray.is_initialized():
        ray.init()
    checkpoint = args.checkpoint
    if checkpoint and ("://" in checkpoint or "/" in checkpoint):
        checkpoint = local_copy(checkpoint)
    scored = score_dataset(clip_training_dataset(args.pool, args.model), args.model, checkpoint, args.reference,
                           mimic_layer=args.mimic_layer, score_kind=args.score_kind, tau=args.tau,
                           batch_size=args.batch_size, actors=args.actors, use_gpu=args.gpu, step=args.step)
    uri = write_scores(scored, args.output)
    print(f"score table written to {uri}")
    return 0
