"""Training throughput: raymimic on Ray Train (with and without mimic scoring) vs plain DDP.

Three runs with the same model, global batch, worker count and synthetic in-memory data:

* ``torchrun``: a plain PyTorch DDP loop launched with ``torchrun`` (the anchor): open_clip
  forward, the same contrastive loss over the gathered global batch, AdamW.
* ``raymimic-plain``: raymimic's Ray Train trainer with ``--weighting sgd`` and no reference
  (no probe): the cost of Ray Train + Ray Data feeding.
* ``raymimic-mimic``: the same with Grad-Mimic scoring and re-weighting of the mimic layer.

Samples/s are measured inside the workers over the steps after ``--warmup-steps`` (so Ray's
start-up is not counted) and reported with the ratios to the anchor:
goal ``plain/torchrun >= 0.95`` and ``mimic/plain >= 0.95``.

    python benchmarks/train_throughput.py --model raymimic-small --workers 2 --global-batch 128 --steps 30
    python benchmarks/train_throughput.py --gpu --precision bf16 --model ViT-B-32 --workers 1 --global-batch 256 \
        --steps 20 --warmup-steps 10

With ``--gpu`` every run uses one GPU per worker and bf16 autocast (``--precision auto`` or
``bf16``; ``fp32`` turns autocast off in all three runs).
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

import numpy as np

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)


def synthetic_items(n: int, image_size: int, context: int, seed: int = 0) -> list[dict]:
    rng = np.random.default_rng(seed)
    return [{"uid": f"{i:032x}", "image": rng.standard_normal((3, image_size, image_size)).astype(np.float32),
             "text": rng.integers(1, 1000, context).astype(np.int64)} for i in range(n)]


# --------------------------------------------------------------------------- torchrun anchor
def torchrun_worker(args) -> None:
    """One process of the plain DDP loop (run under torchrun)."""
    import torch
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel

    from raymimic.clip import create_model
    from raymimic.clip.loss import contrastive_loss
    from raymimic.train.config import TrainConfig
    from raymimic.train.loop import build_optimizer

    use_gpu = torch.cuda.is_available() and args.gpu
    dist.init_process_group("nccl" if use_gpu else "gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    device = torch.device(f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}" if use_gpu else "cpu")
    if use_gpu:
        torch.cuda.set_device(device)
    torch.set_num_threads(max(1, args.threads))
    torch.manual_seed(0)
    model = create_model(args.model, device=device)[0]
    cfg = TrainConfig(output="unused", model=args.model, samples_seen=args.global_batch * args.steps,
                      global_batch=args.global_batch, weighting="sgd")
    optimizer = build_optimizer(model, cfg)
    ddp = DistributedDataParallel(model, device_ids=[device.index] if use_gpu else None)
    local = args.global_batch // world
    image_size = model.visual.image_size[0] if isinstance(model.visual.image_size, tuple) else model.visual.image_size
    items = synthetic_items(local * 4, image_size, model.context_length, seed=rank)
    images = torch.as_tensor(np.stack([it["image"] for it in items]))
    texts = torch.as_tensor(np.stack([it["text"] for it in items]))
    bf16 = use_gpu and args.precision in ("auto", "bf16")  # as raymimic's trainer (precision auto / amp_bf16)
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if bf16 else torch.autocast("cuda" if use_gpu else "cpu", enabled=False)
    start = None
    for step in range(args.steps):
        if step == args.warmup_steps:
            if use_gpu:
                torch.cuda.synchronize()
            dist.barrier()
            start = time.perf_counter()
        sl = slice((step % 4) * local, (step % 4 + 1) * local)
        x, t = images[sl].to(device, non_blocking=True), texts[sl].to(device, non_blocking=True)
        optimizer.zero_grad(set_to_none=True)
        with autocast:
            image_features, text_features, scale = ddp(x, t)[:3]
            loss = contrastive_loss(image_features, text_features, scale)
        loss.backward()
        optimizer.step()
    if use_gpu:
        torch.cuda.synchronize()
    dist.barrier()
    elapsed = time.perf_counter() - start
    if rank == 0:
        with open(args.result, "w") as f:
            json.dump({"samples_per_s": (args.steps - args.warmup_steps) * args.global_batch / elapsed}, f)
    dist.destroy_process_group()


def run_torchrun(args) -> float:
    with tempfile.TemporaryDirectory() as tmp:
        result = os.path.join(tmp, "result.json")
        command = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={args.workers}", "--standalone",
                   os.path.abspath(__file__), "--torchrun-worker", "--result", result, *_common_flags(args)]
        subprocess.run(command, check=True, cwd=REPO, env={**os.environ, "OMP_NUM_THREADS": str(args.threads)})
        with open(result) as f:
            return json.load(f)["samples_per_s"]


def _common_flags(args) -> list[str]:
    flags = ["--model", args.model, "--workers", str(args.workers), "--global-batch", str(args.global_batch),
             "--steps", str(args.steps), "--warmup-steps", str(args.warmup_steps), "--threads", str(args.threads),
             "--precision", args.precision]
    return flags + (["--gpu"] if args.gpu else [])


# --------------------------------------------------------------------------- raymimic on Ray Train
TRAIN_PRECISION = {"auto": "auto", "fp32": "fp32", "bf16": "amp_bf16"}  # this program's names -> TrainConfig.precision


def run_raymimic(args, scoring: bool, dataset, reference: str, root: str) -> dict:
    from raymimic.train.config import TrainConfig
    from raymimic.train.trainer import fit

    output = os.path.join(root, "mimic" if scoring else "plain")
    cfg = TrainConfig(
        output=output, model=args.model, reference=reference if scoring else None,
        weighting="grad-mimic" if scoring else "sgd", samples_seen=args.global_batch * args.steps,
        global_batch=args.global_batch, warmup=2, workers=args.workers, use_gpu=args.gpu, precision=TRAIN_PRECISION[args.precision],
        cpus_per_worker=args.cpus_per_worker, checkpoint_every=args.steps, score_flush_every=args.steps,
        log_every=args.steps - args.warmup_steps, progress=False,
    )
    # the metrics of the last report cover exactly the steps after the warm-up
    return fit(cfg, dataset).metrics


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="raymimic-small", help="open_clip model name (default raymimic-small)")
    parser.add_argument("--workers", type=int, default=2, help="data-parallel workers for all three runs (default 2)")
    parser.add_argument("--global-batch", type=int, default=128, help="global batch (default 128)")
    parser.add_argument("--steps", type=int, default=40, help="optimizer steps per run (default 40)")
    parser.add_argument("--warmup-steps", type=int, default=20, help="steps not timed; a multiple of steps - warmup-steps (default 20)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads per worker (default 1)")
    parser.add_argument("--cpus-per-worker", type=float, default=1.0, help="CPUs Ray reserves per worker (default 1)")
    parser.add_argument("--gpu", action="store_true", help="one GPU per worker")
    parser.add_argument("--precision", choices=list(TRAIN_PRECISION), default="auto",
                        help="auto: bf16 autocast on GPU, fp32 on CPU; bf16 (needs --gpu); fp32 (default auto)")
    parser.add_argument("--json", help="write the results as JSON to this path")
    parser.add_argument("--torchrun-worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--result", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.torchrun_worker:
        torchrun_worker(args)
        return 0
    timed = args.steps - args.warmup_steps
    if timed < 1 or args.warmup_steps % timed:
        # Ray Train reports every `timed` steps, so the last report covers exactly the timed steps
        parser.error("--steps must exceed --warmup-steps, and --warmup-steps must be a multiple of steps - warmup-steps")
    if args.precision == "bf16" and not args.gpu:
        parser.error("--precision bf16 needs --gpu (raymimic's trainer uses bf16 autocast on GPUs only)")
    if args.gpu:
        import torch

        # without this check the torchrun anchor would fall back to the CPU and Ray would wait for GPUs forever
        if not torch.cuda.is_available():
            parser.error("--gpu but torch.cuda.is_available() is False (no GPU, or a CPU-only PyTorch build)")
        if args.workers > torch.cuda.device_count():
            parser.error(f"--workers {args.workers} needs {args.workers} GPUs (one per worker); "
                         f"this machine has {torch.cuda.device_count()}")

    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    os.environ["OMP_NUM_THREADS"] = str(args.threads)
    import ray
    import torch

    from raymimic.clip import create_model, save_checkpoint

    anchor = run_torchrun(args)
    if not ray.is_initialized():
        # logical CPUs beyond the training workers: Ray Data's split coordinator must fit beside them
        ray.init(num_cpus=max(4, 2 * args.workers), runtime_env={"env_vars": {"OMP_NUM_THREADS": str(args.threads)}})
    model = create_model(args.model)[0]
    image_size = model.visual.image_size[0] if isinstance(model.visual.image_size, tuple) else model.visual.image_size
    # one epoch holds every step: a pool is read once per epoch, so restarting the data
    # iterator every few steps would time Ray Data's epoch start-up, not training
    items = synthetic_items(args.global_batch * args.steps, image_size, model.context_length)
    # materialised once so both runs are fed the same blocks from the object store
    dataset = ray.data.from_items(items).materialize()
    with tempfile.TemporaryDirectory() as root:
        torch.manual_seed(1)
        reference = save_checkpoint(create_model(args.model)[0], os.path.join(root, "reference.pt"), args.model)
        plain_metrics = run_raymimic(args, False, dataset, reference, root)
        mimic_metrics = run_raymimic(args, True, dataset, reference, root)
    plain, mimic = plain_metrics["samples_per_s"], mimic_metrics["samples_per_s"]
    results = {
        "model": args.model, "workers": args.workers, "global_batch": args.global_batch, "timed_steps": args.steps - args.warmup_steps,
        "device": "gpu" if args.gpu else "cpu", "precision": "bf16" if args.gpu and args.precision != "fp32" else "fp32",
        "samples_per_s": {"torchrun_ddp": anchor, "raymimic_plain": plain, "raymimic_mimic": mimic},
        "data_wait_fraction": {
            "raymimic_plain": plain_metrics["data_wait_fraction"], "raymimic_mimic": mimic_metrics["data_wait_fraction"]
        },
        "ratio_plain_vs_torchrun": plain / anchor, "ratio_mimic_vs_plain": mimic / plain, "ratio_mimic_vs_torchrun": mimic / anchor,
    }
    print(f"{'run':<18}{'samples/s':>12}{'ratio vs torchrun':>20}")
    for name, value in results["samples_per_s"].items():
        print(f"{name:<18}{value:>12.1f}{value / anchor:>20.3f}")
    print(f"time rank 0 waited for data (plain, mimic): "
          f"{plain_metrics['data_wait_fraction']:.3f}, {mimic_metrics['data_wait_fraction']:.3f}")
    print(f"scoring overhead (mimic / plain): {results['ratio_mimic_vs_plain']:.3f}  (goal >= 0.95)")
    print(f"Ray Train vs torchrun (plain):    {results['ratio_plain_vs_torchrun']:.3f}  (goal >= 0.95)")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
