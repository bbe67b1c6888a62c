"""The first GPU check: exactness and speed of Stage 1's step on one GPU, with no Ray and no package index.

    python3 benchmarks/gpu_check.py --wheels gpu_wheels --json gpu_check.json
    python3 benchmarks/gpu_check.py --device cpu --small --json /tmp/gpu_check.json   # the same checks, tiny, on the CPU

Made for a bare machine with one GPU and torch: open_clip and the few pure-Python packages it
imports are installed from ``--wheels`` (a folder prepared elsewhere with ``pip download``, see
docs/cluster.md) when they are not importable already; nothing from Ray is imported. In order:

1. the device and the versions;
2. the probe's per-sample scores against materialised per-sample gradients (``torch.func``,
   each sample with its own copy of the mimic weight), float32 and bf16 autocast, raymimic-tiny
   and ViT-B-32 at batch 32; and the re-weighted mimic-layer gradient with uniform weights
   against autograd's plain gradient;
3. the all-gather with gradient (``raymimic.clip.loss.AllGatherCat``) forward and backward on a
   1-rank NCCL group (gloo on the CPU);
4. the 2-process exactness of the distributed step: two ranks (both on the one GPU, over gloo:
   NCCL refuses two ranks on one device) each run :class:`~raymimic.train.step.MimicStep` on
   half of a batch under DDP, and their scores, weights and gradients must equal one process's
   on the whole batch;
5. speed at ViT-B-32, batch 256, bf16 (``--small``: raymimic-tiny, batch 16): a plain training
   step against the full :class:`~raymimic.train.step.MimicStep` (reference, controls zero and
   fixed, the scores copied to the host one step late, as a run records them), and the fed loop
   (uint8 host batches through :class:`raymimic.train.feed.DeviceFeed`) against the former feed
   (float32 ``torch.tensor(...).to(...)`` per batch) and against device-resident tensors:
   seconds per step, samples/s, peak memory.

Every result goes to ``--json``; the exit status is 1 when an exactness check fails, 2 when
open_clip cannot be made importable.
"""
from __future__ import annotations

import argparse
import contextlib
import glob
import importlib
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time

import torch

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO not in sys.path:
    sys.path.insert(0, REPO)

# what raymimic.clip and raymimic.mimic import beyond torch (module -> distribution on PyPI)
NEEDED = {"open_clip": "open_clip_torch", "torchvision": "torchvision", "ftfy": "ftfy", "regex": "regex", "tqdm": "tqdm",
          "fsspec": "fsspec", "numpy": "numpy", "PIL": "pillow"}


def missing_modules() -> list[str]:
    missing = []
    for module in NEEDED:
        try:
            importlib.import_module(module)
        except ImportError:
            missing.append(module)
    return missing


class SetupError(RuntimeError):
    """open_clip (or one of its imports) cannot be made importable."""


def ensure_packages(wheels: str | None) -> dict:
    """open_clip and its imports importable: as they are, or installed (no index, no dependencies) from ``wheels``."""
    missing = missing_modules()
    if not missing:
        return {"installed": []}
    files = sorted(glob.glob(os.path.join(wheels, "*.whl"))) if wheels else []
    if not files:
        where = f"the folder {wheels!r} holds no wheels" if wheels else "no --wheels folder was given"
        raise SetupError(f"gpu_check: cannot import {', '.join(missing)} and {where}; prepare one with pip download as "
                         "docs/cluster.md shows (distributions " + ", ".join(NEEDED[m] for m in missing) + ") and pass --wheels")
    command = [sys.executable, "-m", "pip", "install", "--no-index", "--no-deps", "--quiet", *files]
    done = subprocess.run(command, capture_output=True, text=True, check=False)
    importlib.invalidate_caches()
    still = missing_modules()
    if done.returncode != 0 or still:
        raise SetupError(f"gpu_check: installing {len(files)} wheels from {wheels} left {', '.join(still) or 'nothing'} "
                         f"unimportable: {done.stderr.strip()[-400:]}")
    return {"installed": [os.path.basename(f) for f in files]}


def environment(device: torch.device) -> dict:
    import open_clip

    info = {"python": platform.python_version(), "torch": torch.__version__, "open_clip": open_clip.__version__,
            "device": str(device), "cuda": torch.version.cuda}
    if device.type == "cuda":
        nccl = torch.cuda.nccl.version()
        info.update(gpu=torch.cuda.get_device_name(device), bf16_supported=torch.cuda.is_bf16_supported(),
                    nccl=".".join(map(str, nccl)) if isinstance(nccl, (tuple, list)) else str(nccl))
    return info


def exact_float32() -> None:
    """float32 matmuls and convolutions without TF32, whose rounding would hide an exactness error of 1e-4."""
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False


def autocast(device: torch.device, precision: str):
    return torch.autocast(device.type, dtype=torch.bfloat16) if precision == "bf16" else contextlib.nullcontext()


def synchronise(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def make_batch(model, batch: int, device: torch.device, seed: int = 0):
    size = model.visual.image_size
    size = size[0] if isinstance(size, (tuple, list)) else size
    generator = torch.Generator().manual_seed(seed)
    images = torch.randint(0, 256, (batch, 3, size, size), dtype=torch.uint8, generator=generator)
    texts = torch.randint(1, 1000, (batch, model.context_length), generator=generator)
    return images, texts


def new_model(name: str, device: torch.device, seed: int):
    """A randomly initialised ``name`` (seeded), without open_clip's warning that no pretrained weights were loaded."""
    import logging

    from raymimic.clip import create_model

    torch.manual_seed(seed)
    logging.disable(logging.WARNING)
    try:
        return create_model(name, device=device)[0]
    finally:
        logging.disable(logging.NOTSET)


# ----------------------------------------------------------------------------- 2. the probe
def probe_check(name: str, batch: int, device: torch.device, precision: str) -> dict:
    """Probe scores vs materialised per-sample gradients, and the uniform re-weighted gradient vs autograd's."""
    from torch.func import functional_call

    from raymimic.clip import contrastive_loss, resolve_mimic_layer
    from raymimic.mimic import get_parameter
    from raymimic.train.feed import normalise_images
    from raymimic.train.step import build_mimic_step

    model, reference = new_model(name, device, 0), new_model(name, device, 1)
    pixels, texts = make_batch(model, batch, device)
    images, texts = normalise_images(pixels.to(device), None, None) - 0.5, texts.to(device)
    layer = resolve_mimic_layer(model, "image-mlp")
    step, _ = build_mimic_step(model, name, reference=reference, weighting="sgd", device=device, autocast=autocast(device, precision))
    model.zero_grad(set_to_none=True)
    result = step(images, texts)
    mimic_grad = get_parameter(model, layer).grad.detach().float().clone()

    weight = get_parameter(model, layer).detach()
    direction = get_parameter(reference, layer).detach().float() - weight.float()
    copies = weight.expand(batch, *weight.shape).clone().requires_grad_(True)
    with autocast(device, precision):
        features = [functional_call(model, {layer: copies[i]}, (images[i:i + 1], texts[i:i + 1])) for i in range(batch)]
        loss = contrastive_loss(torch.cat([f[0] for f in features]), torch.cat([f[1] for f in features]), features[0][2])
    (per_sample,) = torch.autograd.grad(loss, copies)
    per_sample = per_sample.float() * batch
    expected = -(per_sample * direction).sum(dim=(1, 2)) / direction.norm()
    got = result.scores.float()
    scale = expected.abs().max().clamp_min(1e-30)
    plain = per_sample.mean(0)  # autograd's gradient of the mean loss
    return {
        "model": name, "batch": batch, "precision": precision,
        "score_max_rel_error": float((got - expected).abs().max() / scale),
        "score_spearman": spearman(got, expected),
        "uniform_grad_rel_error": float((mimic_grad - plain).norm() / plain.norm().clamp_min(1e-30)),
    }


def spearman(x: torch.Tensor, y: torch.Tensor) -> float:
    rx, ry = x.argsort().argsort().double(), y.argsort().argsort().double()
    rx, ry = rx - rx.mean(), ry - ry.mean()
    return float((rx * ry).sum() / (rx.norm() * ry.norm()).clamp_min(1e-30))


# ----------------------------------------------------------------------------- 3. one-rank collectives
def gather_check(device: torch.device) -> dict:
    """AllGatherCat forward and backward on a 1-rank group of the device's backend (NCCL on CUDA)."""
    import torch.distributed as dist

    from raymimic.clip.loss import AllGatherCat

    backend = "nccl" if device.type == "cuda" else "gloo"
    with tempfile.TemporaryDirectory() as folder:
        dist.init_process_group(backend, init_method=f"file://{folder}/init", rank=0, world_size=1)
        try:
            features = torch.randn(8, 16, device=device, requires_grad=True)
            gathered = AllGatherCat.apply(features)
            upstream = torch.randn_like(gathered)
            gathered.backward(upstream)
            synchronise(device)
            exact = bool(torch.equal(gathered.detach(), features.detach()) and torch.equal(features.grad, upstream))
        finally:
            dist.destroy_process_group()
    return {"backend": backend, "exact": exact}


# ----------------------------------------------------------------------------- 4. two processes
def _ddp_rank(rank: int, world: int, folder: str, device_name: str, name: str, batch: int) -> None:
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel

    from raymimic.mimic import get_parameter
    from raymimic.train.step import build_mimic_step

    device = torch.device(device_name)
    torch.set_num_threads(1)
    exact_float32()
    dist.init_process_group("gloo", init_method=f"file://{folder}/init", rank=rank, world_size=world)
    try:
        model, reference = new_model(name, device, 0), new_model(name, device, 1)
        images, texts = _ddp_batch(model, batch, device)
        wrap = (lambda m: DistributedDataParallel(m, device_ids=[device])) if device.type == "cuda" else DistributedDataParallel
        step, layer = build_mimic_step(model, name, reference=reference, weighting="grad-mimic", device=device, wrap=wrap,
                                       controls=["zero"])
        local = batch // world
        mine = slice(rank * local, (rank + 1) * local)
        model.zero_grad(set_to_none=True)
        result = step(images[mine], texts[mine])
        grads = {"mimic": get_parameter(model, layer).grad.detach().cpu(),
                 "first": next(p for p in model.parameters() if p.requires_grad).grad.detach().cpu()}
        torch.save({"scores": result.scores.cpu(), "weights": result.weights.cpu(), "zero": result.extra["score_zero"].cpu(),
                    **grads}, f"{folder}/rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def _ddp_batch(model, batch: int, device: torch.device):
    from raymimic.train.feed import normalise_images

    pixels, texts = make_batch(model, batch, device, seed=5)
    return normalise_images(pixels.to(device), None, None) - 0.5, texts.to(device)


def ddp_check(device: torch.device, name: str = "raymimic-tiny", batch: int = 8) -> dict:
    """Two ranks under DDP on half a batch each vs one process on the whole batch: scores, weights, gradients."""
    import torch.multiprocessing as mp

    from raymimic.mimic import get_parameter
    from raymimic.train.step import build_mimic_step

    with tempfile.TemporaryDirectory() as folder:
        mp.spawn(_ddp_rank, args=(2, folder, str(device), name, batch), nprocs=2)
        ranks = [torch.load(f"{folder}/rank{r}.pt") for r in range(2)]
    model, reference = new_model(name, device, 0), new_model(name, device, 1)
    images, texts = _ddp_batch(model, batch, device)
    step, layer = build_mimic_step(model, name, reference=reference, weighting="grad-mimic", device=device, controls=["zero"])
    model.zero_grad(set_to_none=True)
    want = step(images, texts)
    first = next(p for p in model.parameters() if p.requires_grad)
    expected = {"scores": want.scores, "weights": want.weights, "zero": want.extra["score_zero"],
                "mimic": get_parameter(model, layer).grad, "first": first.grad}
    errors = {}
    for key, value in expected.items():
        value = value.detach().float().cpu()
        worst = max(float((r[key].float() - value).abs().max()) for r in ranks)
        errors[key] = worst / max(float(value.abs().max()), 1e-30)
    return {"model": name, "batch": batch, "backend": "gloo", "max_rel_error": errors,
            "exact": all(e < 1e-4 for e in errors.values())}


# ----------------------------------------------------------------------------- 5. speed
def _timed(run, steps: int, warmup: int, device: torch.device) -> dict:
    for _ in range(warmup):
        run()
    synchronise(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    times = []
    for _ in range(steps):
        started = time.perf_counter()
        run()
        synchronise(device)
        times.append(time.perf_counter() - started)
    peak = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None
    return {"step_s": statistics.median(times), "peak_gib": peak}


def step_speed(name: str, batch: int, device: torch.device, precision: str, steps: int, warmup: int) -> dict:
    """A plain training step vs the full MimicStep (+ the deferred score copy), same model, batch and optimizer."""
    from raymimic.clip import contrastive_loss
    from raymimic.train.feed import DeferredCopy, normalise_images
    from raymimic.train.step import build_mimic_step

    model, reference = new_model(name, device, 0), new_model(name, device, 1)
    pixels, texts = make_batch(model, batch, device)
    images, texts = normalise_images(pixels.to(device), None, None) - 0.5, texts.to(device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5)
    cast = autocast(device, precision)

    def plain():
        optimizer.zero_grad(set_to_none=True)
        with cast:
            loss = contrastive_loss(*model(images, texts)[:3])
        loss.backward()
        optimizer.step()

    step, _ = build_mimic_step(model, name, reference=reference, weighting="sgd", device=device, autocast=cast,
                               controls=["zero", "fixed"])
    received = []
    copy = DeferredCopy(lambda context, arrays: received.append(len(arrays)))

    def mimic():
        optimizer.zero_grad(set_to_none=True)
        result = step(images, texts)
        optimizer.step()
        copy.push(None, {"score": result.local_scores, "weight": result.local_weights, **result.local_extra})

    results = {}
    for _ in range(2):  # interleaved: a drifting clock hits both alike
        for label, run in (("plain", plain), ("mimic", mimic)):
            timing = _timed(run, steps, warmup, device)
            results.setdefault(label, []).append(timing)
    copy.flush()
    plain_s = min(t["step_s"] for t in results["plain"])
    mimic_s = min(t["step_s"] for t in results["mimic"])
    return {"model": name, "batch": batch, "precision": precision, "plain_step_s": plain_s, "mimic_step_s": mimic_s,
            "mimic_over_plain": mimic_s / plain_s, "plain_peak_gib": results["plain"][-1]["peak_gib"],
            "mimic_peak_gib": results["mimic"][-1]["peak_gib"]}


def feed_speed(name: str, batch: int, device: torch.device, precision: str, steps: int, warmup: int) -> dict:
    """samples/s of one training step fed three ways: device-resident, the former float32 feed, DeviceFeed with uint8."""
    import numpy as np

    from raymimic.clip import contrastive_loss
    from raymimic.train.feed import DeviceFeed, normalise_images

    model = new_model(name, device, 0)
    pixels, texts = make_batch(model, batch, device)
    mean, std = (0.48, 0.46, 0.41), (0.27, 0.26, 0.28)
    resident = normalise_images(pixels.to(device), torch.tensor(mean, device=device).view(1, -1, 1, 1),
                                torch.tensor(std, device=device).view(1, -1, 1, 1)), texts.to(device)
    host_float = {"image": resident[0].cpu().numpy(), "text": texts.numpy()}
    host_uint8 = {"image": pixels.numpy(), "text": texts.numpy()}
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5)
    cast = autocast(device, precision)

    def train(images, texts):
        optimizer.zero_grad(set_to_none=True)
        with cast:
            loss = contrastive_loss(*model(images, texts)[:3])
        loss.backward()
        optimizer.step()

    def loop(source):
        synchronise(device)
        started = time.perf_counter()
        for images, texts in source():
            train(images, texts)
        synchronise(device)
        return time.perf_counter() - started

    def resident_batches():
        return ((resident[0], resident[1]) for _ in range(steps))

    def former_batches():
        for _ in range(steps):
            yield (torch.tensor(np.asarray(host_float["image"]), dtype=torch.float32).to(device, non_blocking=True),
                   torch.tensor(np.asarray(host_float["text"]), dtype=torch.long).to(device, non_blocking=True))

    feed = DeviceFeed(device, mean, std)

    def fed_batches():
        return ((images, texts) for _, images, texts in feed(host_uint8 for _ in range(steps)))

    for _ in range(warmup):
        train(*resident)
    sources = {"resident": resident_batches, "former_feed": former_batches, "device_feed": fed_batches}
    seconds = {label: [] for label in sources}
    for _ in range(2):
        for label, source in sources.items():
            seconds[label].append(loop(source))
    rates = {f"{label}_samples_per_s": steps * batch / min(values) for label, values in seconds.items()}
    return {"model": name, "batch": batch, "precision": precision, **rates,
            "device_feed_over_resident": rates["device_feed_samples_per_s"] / rates["resident_samples_per_s"],
            "former_feed_over_resident": rates["former_feed_samples_per_s"] / rates["resident_samples_per_s"]}


# ----------------------------------------------------------------------------- main
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda", help="cuda (default) or cpu")
    parser.add_argument("--wheels", help="folder of wheels (pip download) to install open_clip and its imports from when missing")
    parser.add_argument("--small", action="store_true", help="tiny sizes (raymimic-tiny only, small batches): a CPU dry run")
    parser.add_argument("--steps", type=int, default=None, help="timed steps per measurement (default 10; --small 2)")
    parser.add_argument("--json", help="write the results here")
    args = parser.parse_args(argv)

    started = time.perf_counter()
    try:
        setup = ensure_packages(args.wheels)
    except SetupError as error:
        print(error, file=sys.stderr)
        return 2
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print("gpu_check: --device cuda but torch.cuda.is_available() is False (use --device cpu --small for a dry run)",
              file=sys.stderr)
        return 2
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())  # DDP's device_ids need the index
    exact_float32()
    big = "raymimic-tiny" if args.small else "ViT-B-32"
    speed_batch = 16 if args.small else 256
    steps = args.steps or (2 if args.small else 10)
    warmup = 1 if args.small else 3
    precisions = ("fp32", "bf16")
    results: dict = {"setup": setup, "environment": environment(device)}
    print(json.dumps(results["environment"]), flush=True)

    def stage(label, run):
        at = time.perf_counter()
        value = run()
        print(f"{label} ({time.perf_counter() - at:.1f} s): {json.dumps(value)}", flush=True)
        return value

    models = ["raymimic-tiny"] if args.small else ["raymimic-tiny", "ViT-B-32"]
    probe_batch = 8 if args.small else 32
    results["probe"] = [stage(f"probe {m} {p}", lambda m=m, p=p: probe_check(m, probe_batch, device, p))
                        for m in models for p in precisions]
    results["gather"] = stage("all-gather, 1 rank", lambda: gather_check(device))
    results["ddp"] = stage("2-process DDP step", lambda: ddp_check(device))
    results["step_speed"] = stage(f"step speed {big}", lambda: step_speed(big, speed_batch, device, "bf16", steps, warmup))
    results["feed_speed"] = stage(f"feed speed {big}", lambda: feed_speed(big, speed_batch, device, "bf16", steps, warmup))
    results["seconds"] = time.perf_counter() - started

    failures = [f"probe {r['model']} {r['precision']}" for r in results["probe"]
                if r["score_max_rel_error"] > (1e-4 if r["precision"] == "fp32" else 5e-2) or r["score_spearman"] < 0.99]
    failures += [] if results["gather"]["exact"] else ["all-gather"]
    failures += [] if results["ddp"]["exact"] else ["2-process DDP step"]
    results["failures"] = failures
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)
    print(f"gpu_check: {len(failures)} failed check(s) {failures} in {results['seconds']:.0f} s", flush=True)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
