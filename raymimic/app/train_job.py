"""The Stage-1 job command line, shared by ``jobs/datacomp_*.py`` and ``raymimic train``.

A job reads a DataComp pool (``--pool``, any fsspec URI) through Ray Data, trains CLIP with
Grad-Mimic weighting on Ray Train and writes ``<output>/scores/`` (the score table),
``<output>/checkpoints/final.pt`` (open_clip format) and ``<output>/ray_train/`` (resumable
checkpoints). ``--smoke`` runs the same code for a few steps on a toy pool it writes itself.
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile

from raymimic.train.config import PRESETS, TrainConfig

WEIGHTING_HELP = (
    "batch weighting: grad-mimic (softmax of mimic scores, the method), sgd (uniform: standard training, "
    "scores still recorded when --reference is given), grad-norm (softmax of the mimic layer's per-sample "
    "gradient norms), agra (equal weight to samples agreeing with the previous step's batch gradient), "
    "rho (softmax of loss minus the reference model's loss; runs the reference model forward), "
    "grad-match (weights matching the batch gradient, solved on each worker's LOCAL Gram matrix) "
    "(default grad-mimic)"
)


def add_train_arguments(parser: argparse.ArgumentParser, preset: str) -> None:
    p = PRESETS[preset]
    data = parser.add_argument_group("data and outputs")
    data.add_argument("--pool", help="DataComp pool: local folder or fsspec URI holding shards/{:08d}.tar (required unless --smoke)")
    data.add_argument("--reference", help="reference model whose weights the run mimics: MODEL:TAG (e.g. ViT-B-32:datacomp_m_s128m_b4k), "
                      "a pretrained tag of --model, a local checkpoint or an fsspec URI; its architecture must equal --model's")
    data.add_argument("--output", help="run folder, local path or fsspec URI (default with --smoke: a new temporary folder); "
                      "rerunning with the same --output resumes from its latest checkpoint")
    data.add_argument("--shuffle-buffer", type=int, default=0, help="rows in each worker's local shuffle buffer (default 0: pool order)")
    model = parser.add_argument_group("model and recipe (defaults: the preset)")
    model.add_argument("--model", default=p["model"], help=f"open_clip model name (default {p['model']})")
    model.add_argument("--pretrained", help="initial weights (tag, path or URI); default: random initialisation as DataComp")
    model.add_argument("--samples-seen", type=int, default=p["samples_seen"], help=f"training samples seen in total (default {p['samples_seen']:,})")
    model.add_argument("--global-batch", type=int, default=p["global_batch"], help=f"global batch over all workers (default {p['global_batch']})")
    model.add_argument("--lr", type=float, default=p["lr"], help=f"peak learning rate of the cosine schedule (default {p['lr']})")
    model.add_argument("--warmup", type=int, default=p["warmup"], help=f"linear warm-up steps (default {p['warmup']})")
    model.add_argument("--weight-decay", type=float, default=0.2, help="AdamW weight decay, not on gains/biases/logit scale (default 0.2)")
    model.add_argument("--precision", choices=["auto", "fp32", "amp_bf16"], default="auto", help="auto: bf16 autocast on GPU, fp32 on CPU (default auto)")
    model.add_argument("--grad-checkpointing", action="store_true", help="recompute activations in backward to save memory")
    mimic = parser.add_argument_group("mimic scoring")
    mimic.add_argument("--weighting", choices=["grad-mimic", "sgd", "grad-norm", "agra", "rho", "grad-match"], default="grad-mimic", help=WEIGHTING_HELP)
    mimic.add_argument("--mimic-layer", default="image-mlp", help="image-mlp (the image tower's last MLP c_proj, the paper's best), text-mlp, "
                       "image-proj, text-proj, or any 2-D parameter name (default image-mlp)")
    mimic.add_argument("--tau", type=float, default=0.05, help="softmax temperature of the weights (default 0.05, the paper's best at small scale)")
    mimic.add_argument("--score-kind", choices=["proj", "cos"], default="proj", help="proj: <-g_i,V>/||V||; cos: also divided by ||g_i|| (default proj)")
    cluster = parser.add_argument_group("cluster")
    cluster.add_argument("--workers", type=int, default=2, help="data-parallel training workers (default 2)")
    cluster.add_argument("--min-workers", type=int, help="elastic training: fewest workers to run with (with --max-workers)")
    cluster.add_argument("--max-workers", type=int, help="elastic training: most workers to grow to")
    cluster.add_argument("--gpu", action="store_true", help="one GPU per worker (default: CPU workers)")
    cluster.add_argument("--cpus-per-worker", type=float, default=1.0, help="CPUs reserved per training worker (default 1)")
    cluster.add_argument("--checkpoint-every", type=int, default=0, help="steps between checkpoints (default 0: five per run)")
    cluster.add_argument("--max-failures", type=int, default=3, help="worker failures to recover from by resuming (default 3)")
    cluster.add_argument("--seed", type=int, default=0, help="initialisation and shuffle seed (default 0)")
    parser.add_argument("--smoke", action="store_true", help="a few steps of the same job with a tiny model on a toy pool written under "
                        "<output>/toy_pool, 2 local CPU workers, a random reference: checks the whole path in about a minute")


def config_from_args(args, output: str, pool_model: str | None = None) -> TrainConfig:
    values = dict(
        output=output, model=args.model, pretrained=args.pretrained, reference=args.reference, mimic_layer=args.mimic_layer,
        weighting=args.weighting, tau=args.tau, score_kind=args.score_kind, samples_seen=args.samples_seen,
        global_batch=args.global_batch, lr=args.lr, warmup=args.warmup, weight_decay=args.weight_decay,
        precision=args.precision, grad_checkpointing=args.grad_checkpointing, workers=args.workers,
        min_workers=args.min_workers, max_workers=args.max_workers, use_gpu=args.gpu, cpus_per_worker=args.cpus_per_worker,
        checkpoint_every=args.checkpoint_every, shuffle_buffer=args.shuffle_buffer, seed=args.seed, max_failures=args.max_failures,
    )
    return TrainConfig(**values)


def _smoke_setup(args, output: str) -> None:
    """Toy pool and random reference under ``output``; a tiny preset that runs on 2 CPU workers."""
    import torch

    from raymimic.clip import create_model, save_checkpoint
    from raymimic.data.toy_pool import make_toy_pool

    tiny = PRESETS["tiny"]
    args.pool = os.path.join(output, "toy_pool")
    if not os.path.isdir(os.path.join(args.pool, "shards")):
        make_toy_pool(args.pool, samples=48, noise=0.3, seed=args.seed, shard_size=16, eval_samples=0, workers=1)
    args.model, args.samples_seen, args.global_batch = tiny["model"], tiny["samples_seen"], tiny["global_batch"]
    args.lr, args.warmup, args.workers, args.gpu = tiny["lr"], tiny["warmup"], 2, False
    args.min_workers = args.max_workers = None
    args.cpus_per_worker = 0.5  # leave CPUs to the Ray Data reading stages on a small machine
    args.checkpoint_every = args.checkpoint_every or 4
    if not args.reference:
        torch.manual_seed(args.seed + 1)
        args.reference = save_checkpoint(create_model(args.model)[0], os.path.join(output, "reference.pt"), args.model)


def run_job(args) -> int:
    import ray

    from raymimic.data.preprocess import clip_training_dataset
    from raymimic.score_table import read_score_table
    from raymimic.train.trainer import fit, normalise_output

    output = args.output
    if output is None:
        if not args.smoke:
            sys.exit("error: --output is required (a local folder or fsspec URI for scores/ and checkpoints/)")
        output = tempfile.mkdtemp(prefix="raymimic-smoke-")
        print(f"no --output given: writing to {output}")
    output = normalise_output(output)
    if args.smoke:
        _smoke_setup(args, output)
    if not args.pool:
        sys.exit("error: --pool is required (a DataComp pool folder or URI), or use --smoke")
    cfg = config_from_args(args, output)
    if not ray.is_initialized():
        ray.init()
    summary = fit(cfg, clip_training_dataset(args.pool, cfg.model))
    table = read_score_table(summary.scores)
    print(f"trained {summary.metrics.get('step')} steps of {cfg.global_batch} samples on {cfg.workers} workers")
    print(f"score table: {summary.scores} ({table.num_rows} rows: uid, step, epoch, rank, score, weight, batch_size)")
    print(f"final model (open_clip checkpoint): {summary.final_checkpoint}")
    print(f"resumable Ray Train checkpoint: {summary.ray_checkpoint}")
    return 0


def build_parser(preset: str, prog: str | None = None) -> argparse.ArgumentParser:
    p = PRESETS[preset]
    parser = argparse.ArgumentParser(
        prog=prog,
        description=(
            f"Stage 1 at DataComp's {preset} scale: train {p['model']} on {p['samples_seen']:,} samples "
            f"(global batch {p['global_batch']}, lr {p['lr']}, warm-up {p['warmup']}, AdamW wd 0.2 beta2 0.98, cosine) "
            "with Grad-Mimic weighting on Ray Train, scoring every sample at every step. Writes OUTPUT/scores/*.parquet "
            "(one row per sample per step), OUTPUT/checkpoints/final.pt (open_clip format) and OUTPUT/ray_train/ "
            "(resumable checkpoints)."
        ),
        epilog=(
            "example:\n  ray job submit --working-dir . -- python jobs/datacomp_medium.py "
            "--pool s3://bucket/pool --reference ViT-B-32:datacomp_m_s128m_b4k --output s3://bucket/runs/m1 --workers 8 --gpu\n"
            "smoke test:\n  python jobs/datacomp_small.py --smoke"
        ),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_train_arguments(parser, preset)
    return parser


def main(preset: str, argv: list[str] | None = None, prog: str | None = None) -> int:
    args = build_parser(preset, prog).parse_args(argv)
    return run_job(args)
