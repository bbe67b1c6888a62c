"""Cost of mimic scoring: a training step with exact mimic scores + re-weighting vs a plain
step vs a step that gets the same scores from torch.func per-sample gradients (what the
paper's code does), same model, batch and optimizer, measured in one process.

    python benchmarks/mimic_overhead.py                      # tiny CLIP and ViT-B-32
    python benchmarks/mimic_overhead.py --models raymimic-tiny --batch 32 --json out.json
"""
from __future__ import annotations

import argparse
import json
import statistics
import time

import torch
from torch.func import functional_call, grad, vmap

from raymimic.clip import contrastive_loss, create_model, resolve_mimic_layer, sample_dim
from raymimic.mimic import GradMimic, MimicProbe, get_parameter, mimic_scores, reweighted_grad


def make_batch(model_name: str, model, batch: int):
    size = model.visual.image_size
    size = size[0] if isinstance(size, (tuple, list)) else size
    images = torch.randn(batch, 3, size, size)
    texts = torch.randint(1, 1000, (batch, model.context_length))
    return images, texts


def plain_step(model, optimizer, images, texts, **_):
    optimizer.zero_grad(set_to_none=True)
    contrastive_loss(*model(images, texts)[:3]).backward()
    optimizer.step()


def mimic_step(model, optimizer, images, texts, probe, reference_weight, weighting, **_):
    optimizer.zero_grad(set_to_none=True)
    with probe.capture():
        loss = contrastive_loss(*model(images, texts)[:3])
    loss.backward()
    direction = reference_weight - probe.parameter.detach()
    scores = mimic_scores(probe, direction, global_batch=len(images))
    weights = weighting.weights({"mimic": scores})
    probe.parameter.grad = reweighted_grad(probe, weights, global_batch=len(images))
    optimizer.step()


def torch_func_step(model, optimizer, images, texts, probe, reference_weight, weighting, name, **_):
    """Per-sample gradients of the mimic layer materialised with torch.func, then the same update."""
    optimizer.zero_grad(set_to_none=True)
    weight = get_parameter(model, name)
    batch = len(images)
    params = {k: v.detach() for k, v in model.named_parameters()}

    def features(w, image, text):
        out = functional_call(model, {**params, name: w}, (image[None], text[None]))
        return out[0][0], out[1][0]

    # one copy of the layer per sample: dL/dW_i is sample i's own-path gradient
    def batch_loss(copies):
        image_f, text_f = vmap(features)(copies, images, texts)
        return contrastive_loss(image_f, text_f, model.logit_scale.exp().detach())

    per_sample = grad(batch_loss)(weight.detach().expand(batch, *weight.shape).contiguous()) * batch
    direction = reference_weight - weight.detach()
    scores = -(per_sample * direction).flatten(1).sum(1) / direction.norm()
    weights = weighting.weights({"mimic": scores})
    contrastive_loss(*model(images, texts)[:3]).backward()  # the other layers' ordinary gradients
    weight.grad = (weights.reshape(-1, 1, 1) * per_sample).sum(0)
    optimizer.step()


def time_step(step, repeats: int, **kwargs) -> float:
    step(**kwargs)  # warm-up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        step(**kwargs)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def bench(model_name: str, batch: int, repeats: int, layer: str, skip_torch_func: bool) -> dict:
    torch.manual_seed(0)
    model, _, _ = create_model(model_name)
    model.train()
    name = resolve_mimic_layer(model, layer)
    probe = MimicProbe(model, name, batch_dim=sample_dim(model, name))
    reference_weight = get_parameter(model, name).detach().clone() + 0.01 * torch.randn(get_parameter(model, name).shape)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-6, weight_decay=0.2, betas=(0.9, 0.98))
    images, texts = make_batch(model_name, model, batch)
    kwargs = dict(model=model, optimizer=optimizer, images=images, texts=texts, probe=probe,
                  reference_weight=reference_weight, weighting=GradMimic(tau=0.05), name=name)
    # interleave the modes so drift in machine load hits all of them alike
    plain, mimic, func = [], [], []
    for _ in range(repeats):
        plain.append(time_step(plain_step, 1, **kwargs))
        mimic.append(time_step(mimic_step, 1, **kwargs))
        if not skip_torch_func:
            func.append(time_step(torch_func_step, 1, **kwargs))
    plain_s, mimic_s = statistics.median(plain), statistics.median(mimic)
    func_s = statistics.median(func) if func else float("nan")
    return {"model": model_name, "batch": batch, "layer": name, "plain_s": plain_s, "mimic_s": mimic_s,
            "torch_func_s": func_s, "mimic_over_plain": mimic_s / plain_s, "torch_func_over_plain": func_s / plain_s,
            "threads": torch.get_num_threads(), "device": "cpu"}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=["raymimic-tiny", "ViT-B-32"], help="open_clip model names (random init)")
    parser.add_argument("--batch", type=int, nargs="+", default=[64, 16], help="batch per model (one value for all, or one each)")
    parser.add_argument("--repeats", type=int, default=5, help="timed steps per mode (median reported)")
    parser.add_argument("--layer", default="image-mlp", help="mimic layer alias or parameter name")
    parser.add_argument("--skip-torch-func", action="store_true", help="skip the slow per-sample-gradient baseline")
    parser.add_argument("--json", help="write the results here")
    args = parser.parse_args(argv)
    batches = args.batch * len(args.models) if len(args.batch) == 1 else args.batch
    results = [bench(m, b, args.repeats, args.layer, args.skip_torch_func) for m, b in zip(args.models, batches)]
    print(f"{'model':<16}{'batch':>6}{'plain s':>10}{'mimic s':>10}{'func s':>10}{'mimic/plain':>13}{'func/plain':>12}")
    for r in results:
        print(f"{r['model']:<16}{r['batch']:>6}{r['plain_s']:>10.4f}{r['mimic_s']:>10.4f}{r['torch_func_s']:>10.4f}"
              f"{r['mimic_over_plain']:>13.3f}{r['torch_func_over_plain']:>12.2f}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"results": results}, f, indent=2)
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
