"""Cost of mimic scoring: a training step with exact mimic scores + re-weighting vs a plain
step vs a step that gets the same scores from torch.func per-sample gradients (what the
paper's code does), same model, batch and optimizer, measured in one process.

A fourth mode, the *training step*, times what a Stage-1 worker runs: the whole
:class:`raymimic.train.step.MimicStep` (the gathers, the control columns and a loss baseline
included) and the deferred copy of its scores to the host (``training_step_over_plain``).

Also the cost of the function direction (``--direction function``, :mod:`raymimic.mimic.function`): the
mimic step with ``V_fn = -dD/dW`` in place of ``W_ref - W_t``, i.e. plus the reference's forward
(no gradient) and one backward of the distillation loss ``D`` down to the mimic layer; its ratio
is given against the plain step and against the weight-direction mimic step, with process CPU
time beside wall time (``--skip-function`` leaves it out).

Also the cost of the control directions every Stage-1 run records (``--controls``, default
zero,fixed,init,random): a mimic step that also scores every control (as
:class:`raymimic.train.step.MimicStep` does), and, timed alone after a backward pass, each
control's own work (its direction, norm and one ``probe.dot``) as a fraction of the mimic step.

    python benchmarks/mimic_overhead.py                      # tiny CLIP and ViT-B-32
    python benchmarks/mimic_overhead.py --models raymimic-tiny --batch 32 --json out.json
    python benchmarks/mimic_overhead.py --models ViT-B-32 --batch 256 --device cuda --precision bf16 --json gpu.json
    python benchmarks/mimic_overhead.py --controls none       # without the controls variant

On CUDA the forward pass and loss of every mode run under bf16 autocast (``--precision auto``
or ``bf16``), as in training, and each timed step ends with ``torch.cuda.synchronize()``.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import statistics
import time

import torch
from torch.func import functional_call, grad, vmap

from raymimic.clip import contrastive_loss, create_model, resolve_mimic_layer, sample_dim
from raymimic.mimic import (
    GradMimic,
    MimicProbe,
    control_directions,
    direction_scores,
    distillation_losses,
    function_direction,
    get_parameter,
    make_control,
    mimic_scores,
    reweighted_grad,
)
from raymimic.train.feed import DeferredCopy
from raymimic.train.step import MimicStep


def make_batch(model_name: str, model, batch: int, device: str | torch.device = "cpu"):
    size = model.visual.image_size
    size = size[0] if isinstance(size, (tuple, list)) else size
    images = torch.randn(batch, 3, size, size).to(device)
    texts = torch.randint(1, 1000, (batch, model.context_length)).to(device)
    return images, texts


def autocast_for(device: str, precision: str):
    """bf16 autocast (``precision`` bf16, or auto on CUDA) or nothing (fp32)."""
    if precision == "bf16" or (precision == "auto" and device == "cuda"):
        return torch.autocast(device, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def plain_step(model, optimizer, images, texts, autocast=None, **_):
    optimizer.zero_grad(set_to_none=True)
    with autocast or contextlib.nullcontext():
        loss = contrastive_loss(*model(images, texts)[:3])
    loss.backward()
    optimizer.step()


def mimic_step(model, optimizer, images, texts, probe, reference_weight, weighting, autocast=None, **_):
    optimizer.zero_grad(set_to_none=True)
    with autocast or contextlib.nullcontext(), probe.capture():
        loss = contrastive_loss(*model(images, texts)[:3])
    loss.backward()
    direction = reference_weight - probe.parameter.detach().float()
    scores = mimic_scores(probe, direction, global_batch=len(images))
    weights = weighting.weights({"mimic": scores.float()})
    # as raymimic's training step: the re-weighted gradient in float32, stored in the parameter's dtype
    probe.parameter.grad = reweighted_grad(probe, weights, global_batch=len(images)).float().to(probe.parameter.dtype)
    optimizer.step()


def mimic_function_step(model, optimizer, images, texts, probe, weighting, reference, autocast=None, **_):
    """The mimic step with the function direction: the reference's forward, D's backward to the layer, then as above."""
    optimizer.zero_grad(set_to_none=True)
    with autocast or contextlib.nullcontext():
        with torch.no_grad():
            reference_outputs = reference(images, texts)[:3]
        with probe.capture():
            outputs = model(images, texts)[:3]
            loss = contrastive_loss(*outputs)
        losses = distillation_losses(outputs, reference_outputs)
    direction = function_direction(losses, probe.parameter)  # before the batch loss's backward, as in training
    loss.backward()
    scores = mimic_scores(probe, direction, global_batch=len(images))
    weights = weighting.weights({"mimic": scores.float()})
    probe.parameter.grad = reweighted_grad(probe, weights, global_batch=len(images)).float().to(probe.parameter.dtype)
    optimizer.step()


def mimic_controls_step(model, optimizer, images, texts, probe, reference_weight, weighting, controls, autocast=None, **_):
    """The mimic step plus every control's score from the same probe (before the re-weighted gradient, as in training)."""
    optimizer.zero_grad(set_to_none=True)
    with autocast or contextlib.nullcontext(), probe.capture():
        loss = contrastive_loss(*model(images, texts)[:3])
    loss.backward()
    direction = reference_weight - probe.parameter.detach().float()
    scores = mimic_scores(probe, direction, global_batch=len(images))
    extra = direction_scores(probe, control_directions(controls, probe.parameter), global_batch=len(images))
    torch.stack([scores, *extra.values()], dim=1).cpu()  # as training: one tensor for the gather, then to the writer
    weights = weighting.weights({"mimic": scores.float()})
    probe.parameter.grad = reweighted_grad(probe, weights, global_batch=len(images)).float().to(probe.parameter.dtype)
    optimizer.step()


def time_controls_alone(probe, controls: dict, batch: int, repeats: int, device: str) -> dict[str, list[float]]:
    """Seconds of each control's own work on a probe that holds a backward pass (direction, norm, one dot), per repeat.

    The controls take turns within every repeat, so drift in machine load hits all of them alike.
    """
    times: dict[str, list[float]] = {name: [] for name in controls}
    for r in range(repeats + 1):
        for name, control in controls.items():
            _sync(device)
            start = time.perf_counter()
            direction_scores(probe, control_directions({name: control}, probe.parameter), global_batch=batch)
            _sync(device)
            if r:  # the first round is a warm-up
                times[name].append(time.perf_counter() - start)
    return times


def training_step(optimizer, images, texts, mimic_step_fn, score_copy, **_):
    """What a Stage-1 worker runs: :class:`raymimic.train.step.MimicStep` (the probe, the gathers, the control columns, the
    loss baseline) and the deferred copy of the step's scores to the host, then the update."""
    optimizer.zero_grad(set_to_none=True)
    result = mimic_step_fn(images, texts)
    optimizer.step()
    score_copy.push(None, {"score": result.local_scores, "weight": result.local_weights, **result.local_extra})


def torch_func_step(model, optimizer, images, texts, probe, reference_weight, weighting, name, autocast=None, **_):
    """Per-sample gradients of the mimic layer materialised with torch.func, then the same update."""
    autocast = autocast or contextlib.nullcontext()
    optimizer.zero_grad(set_to_none=True)
    weight = get_parameter(model, name)
    batch = len(images)
    params = {k: v.detach() for k, v in model.named_parameters()}

    def features(w, image, text):
        out = functional_call(model, {**params, name: w}, (image[None], text[None]))
        return out[0][0], out[1][0]

    # one copy of the layer per sample: dL/dW_i is sample i's own-path gradient
    def batch_loss(copies):
        with autocast:
            image_f, text_f = vmap(features)(copies, images, texts)
            return contrastive_loss(image_f, text_f, model.logit_scale.exp().detach())

    per_sample = grad(batch_loss)(weight.detach().expand(batch, *weight.shape).contiguous()).float() * batch
    direction = reference_weight - weight.detach().float()
    scores = -(per_sample * direction).flatten(1).sum(1) / direction.norm()
    weights = weighting.weights({"mimic": scores})
    with autocast:
        loss = contrastive_loss(*model(images, texts)[:3])
    loss.backward()  # the other layers' ordinary gradients
    weight.grad = (weights.reshape(-1, 1, 1) * per_sample).sum(0).to(weight.dtype)
    optimizer.step()


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def time_step(step, repeats: int, device: str = "cpu", cpu_times: list | None = None, **kwargs) -> float:
    """Median wall seconds of ``repeats`` steps after a warm-up; each step's process CPU seconds go to ``cpu_times``."""
    step(**kwargs)  # warm-up
    times = []
    for _ in range(repeats):
        _sync(device)
        start, cpu_start = time.perf_counter(), time.process_time()
        step(**kwargs)
        _sync(device)  # CUDA runs asynchronously: time the finished step
        times.append(time.perf_counter() - start)
        if cpu_times is not None:
            cpu_times.append(time.process_time() - cpu_start)
    return statistics.median(times)


def resolve_device(device: str) -> str:
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("error: --device cuda but torch.cuda.is_available() is False (no GPU, or a CPU-only PyTorch build)")
    return device


def bench(model_name: str, batch: int, repeats: int, layer: str, skip_torch_func: bool, device: str = "cpu",
          precision: str = "auto", controls: tuple[str, ...] = ("zero", "fixed", "init", "random"), skip_function: bool = False) -> dict:
    torch.manual_seed(0)
    model, _, _ = create_model(model_name, device=device)
    model.train()
    reference = None
    if not skip_function:
        torch.manual_seed(1)  # another initialisation, as public references are
        reference = create_model(model_name, device=device)[0].eval().requires_grad_(False)
    name = resolve_mimic_layer(model, layer)
    probe = MimicProbe(model, name, batch_dim=sample_dim(model, name))
    weight = get_parameter(model, name)
    reference_weight = weight.detach().float().clone() + 0.01 * torch.randn(weight.shape).to(device)
    initial = weight.detach().float().clone() + 0.01 * torch.randn(weight.shape).to(device)
    built = {c: make_control(c, reference=reference_weight, initial=initial, seed=0) for c in controls}
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-6, weight_decay=0.2, betas=(0.9, 0.98))
    images, texts = make_batch(model_name, model, batch, device)
    autocast = autocast_for(device, precision)
    step = MimicStep(model, name, "grad-mimic", tau=0.05, reference_weight=reference_weight, batch_dim=sample_dim(model, name),
                     autocast=autocast, initial_weight=initial, controls=list(built.values()), baselines=["loss"])
    kwargs = dict(model=model, optimizer=optimizer, images=images, texts=texts, probe=probe, device=device,
                  reference_weight=reference_weight, weighting=GradMimic(tau=0.05), name=name, autocast=autocast, controls=built,
                  mimic_step_fn=step, score_copy=DeferredCopy(lambda context, arrays: None), reference=reference)
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    # interleave the modes so drift in machine load hits all of them alike
    plain, mimic, with_controls, func, training, function = [], [], [], [], [], []
    cpu = {"plain": [], "mimic": [], "function": []}
    func_error = None
    for _ in range(repeats):
        plain.append(time_step(plain_step, 1, cpu_times=cpu["plain"], **kwargs))
        mimic.append(time_step(mimic_step, 1, cpu_times=cpu["mimic"], **kwargs))
        training.append(time_step(training_step, 1, **kwargs))
        if reference is not None:
            function.append(time_step(mimic_function_step, 1, cpu_times=cpu["function"], **kwargs))
        if built:
            with_controls.append(time_step(mimic_controls_step, 1, **kwargs))
        if not skip_torch_func and func_error is None:
            try:
                func.append(time_step(torch_func_step, 1, **kwargs))
            except RuntimeError as exc:  # incl. CUDA out of memory, in the baseline only: keep the raymimic numbers
                func_error = f"{type(exc).__name__}: {str(exc).splitlines()[0][:300]}"
                print(f"torch.func baseline failed for {model_name} batch {batch}: {func_error}")
                if device == "cuda":
                    torch.cuda.empty_cache()
    plain_s, mimic_s = statistics.median(plain), statistics.median(mimic)
    func_s = statistics.median(func) if func else float("nan")
    bf16 = isinstance(autocast, torch.autocast)
    result = {"model": model_name, "batch": batch, "layer": name, "plain_s": plain_s, "mimic_s": mimic_s,
              "torch_func_s": func_s, "mimic_over_plain": mimic_s / plain_s, "torch_func_over_plain": func_s / plain_s,
              "threads": torch.get_num_threads(), "device": device, "precision": "bf16" if bf16 else "fp32",
              "plain_samples_per_s": batch / plain_s, "mimic_samples_per_s": batch / mimic_s,
              "training_step_s": statistics.median(training), "training_step_over_plain": statistics.median(training) / plain_s,
              "plain_cpu_s": statistics.median(cpu["plain"]), "mimic_cpu_s": statistics.median(cpu["mimic"])}
    if function:
        function_s, function_cpu = statistics.median(function), statistics.median(cpu["function"])
        result.update({"function_s": function_s, "function_over_plain": function_s / plain_s, "function_over_mimic": function_s / mimic_s,
                       "function_cpu_s": function_cpu, "function_cpu_over_plain": function_cpu / result["plain_cpu_s"],
                       "function_cpu_over_mimic": function_cpu / result["mimic_cpu_s"]})
    if built:
        controls_s = statistics.median(with_controls)
        alone = time_controls_alone(probe, built, batch, 50, device)  # cheap; the probe holds the last step's pass
        median = {c: statistics.median(t) for c, t in alone.items()}
        result.update({
            "controls": list(built), "mimic_controls_s": controls_s, "controls_over_mimic": controls_s / mimic_s,
            "controls_min_over_mimic_min": min(with_controls) / min(mimic),
            "per_control_s": median, "per_control_over_mimic": {c: t / mimic_s for c, t in median.items()},
            # the least-disturbed repeats, for a busy machine: fastest control run / fastest mimic step
            "per_control_min_s": {c: min(t) for c, t in alone.items()}, "mimic_min_s": min(mimic),
            "per_control_min_over_mimic_min": {c: min(t) / min(mimic) for c, t in alone.items()},
        })
    if func_error is not None:
        result["torch_func_error"] = func_error
    if device == "cuda":
        result["gpu"] = torch.cuda.get_device_name()
        result["peak_memory_gib"] = torch.cuda.max_memory_allocated() / 2**30
    return result


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=["raymimic-tiny", "ViT-B-32"], help="open_clip model names (random init)")
    parser.add_argument("--batch", type=int, nargs="+", default=[64, 16], help="batch per model (one value for all, or one each)")
    parser.add_argument("--repeats", type=int, default=5, help="timed steps per mode (median reported)")
    parser.add_argument("--layer", default="image-mlp", help="mimic layer alias or parameter name")
    parser.add_argument("--skip-torch-func", action="store_true", help="skip the slow per-sample-gradient baseline")
    parser.add_argument("--device", choices=["cpu", "cuda", "auto"], default="cpu",
                        help="where to run: cpu, cuda (fails without a GPU) or auto (cuda when available) (default cpu)")
    parser.add_argument("--precision", choices=["auto", "fp32", "bf16"], default="auto",
                        help="auto: bf16 autocast on CUDA, fp32 on CPU; bf16: bf16 autocast on either (default auto)")
    parser.add_argument("--controls", default="zero,fixed,init,random",
                        help="comma-separated control directions of the 'mimic + controls' variant, 'none' to skip it "
                             "(default zero,fixed,init,random)")
    parser.add_argument("--skip-function", action="store_true", help="skip the function-direction step")
    parser.add_argument("--json", help="write the results here")
    args = parser.parse_args(argv)
    device = resolve_device(args.device)
    controls = tuple(c.strip() for c in args.controls.split(",") if c.strip() and c.strip() != "none")
    batches = args.batch * len(args.models) if len(args.batch) == 1 else args.batch
    results = [bench(m, b, args.repeats, args.layer, args.skip_torch_func, device, args.precision, controls, args.skip_function)
               for m, b in zip(args.models, batches)]
    print(f"{'model':<16}{'batch':>6}{'plain s':>10}{'mimic s':>10}{'func s':>10}{'mimic/plain':>13}{'func/plain':>12}"
          f"{'training step/plain':>21}")
    for r in results:
        print(f"{r['model']:<16}{r['batch']:>6}{r['plain_s']:>10.4f}{r['mimic_s']:>10.4f}{r['torch_func_s']:>10.4f}"
              f"{r['mimic_over_plain']:>13.3f}{r['torch_func_over_plain']:>12.2f}{r['training_step_over_plain']:>21.3f}")
    if not args.skip_function:
        print(f"\n{'model':<16}{'batch':>6}{'fn s':>9}{'fn/plain':>10}{'fn/mimic':>10}{'cpu: plain s':>14}{'mimic s':>9}{'fn s':>9}"
              f"{'fn/plain':>10}{'fn/mimic':>10}")
        for r in results:
            print(f"{r['model']:<16}{r['batch']:>6}{r['function_s']:>9.4f}{r['function_over_plain']:>10.3f}{r['function_over_mimic']:>10.3f}"
                  f"{r['plain_cpu_s']:>14.4f}{r['mimic_cpu_s']:>9.4f}{r['function_cpu_s']:>9.4f}{r['function_cpu_over_plain']:>10.3f}"
                  f"{r['function_cpu_over_mimic']:>10.3f}")
    if controls:
        print(f"\n{'model':<16}{'batch':>6}{'+controls s':>12}{'(+controls)/mimic':>19}{'min/min':>9}  each control alone / mimic "
              "step, median (min/min)")
        for r in results:
            each = "  ".join(f"{c} {100 * x:.2f}% ({100 * r['per_control_min_over_mimic_min'][c]:.2f}%)"
                             for c, x in r["per_control_over_mimic"].items())
            print(f"{r['model']:<16}{r['batch']:>6}{r['mimic_controls_s']:>12.4f}{r['controls_over_mimic']:>19.3f}"
                  f"{r['controls_min_over_mimic_min']:>9.3f}  {each}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"results": results}, f, indent=2)
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
