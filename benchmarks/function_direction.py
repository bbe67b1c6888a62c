"""Does the function direction carry the reference's knowledge? A quick check at one checkpoint of a toy pool.

    python benchmarks/function_direction.py --workdir /tmp/function_check --seed 0 --json out.json

In one process, without Ray, with the reference-lift harness's pieces (:mod:`raymimic_experiments.reference_lift`):

1. the quickstart's pool (26 classes of shapes and digits, random caption corruption and a
   one-way relabelling of four class pairs) and a larger clean pool;
2. a reference trained on the clean pool from *another* initialisation, the target trained on
   the noisy pool with uniform weights;
3. one pass over the pool at the target's final weights, batches of ``--batch``: one forward of
   each model and one backward of the batch loss per batch, with a probe on ``image-mlp`` and
   one on ``text-mlp``; ``V_fn`` of both layers from one backward of the distillation loss
   (:mod:`raymimic.mimic.function`). Columns per layer: ``score`` (``W_ref - W_t``),
   ``score_zero`` (``-W_t``), ``score_function`` (``V_fn``); ``function_joint`` (both towers
   together, :func:`raymimic.mimic.joint_mimic_scores`); the target's loss (``score_loss``)
   and the reference's CLIPScore (``score_ref_clipscore``);
4. AUC of every column as a detector of the random and of the relabelled noise
   (:func:`raymimic_experiments.reference_lift.metrics.detection_aucs`) and the lift over the controls that contain
   no reference (``zero`` of the same layer and the target's loss).
"""
from __future__ import annotations

import argparse
import json
import os
import time

import numpy as np


def _log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", flush=True)


def score_pass(target, reference, data, batch: int, seed: int):
    """Score rows of one pass over ``data`` (one step per batch) at the target's current weights."""
    import pandas as pd
    import torch

    from raymimic.clip import per_sample_contrastive_loss, resolve_mimic_layer, sample_dim
    from raymimic.mimic import (
        MimicProbe,
        direction_scores,
        distillation_losses,
        function_directions,
        get_parameter,
        joint_mimic_scores,
    )

    layers = {layer: resolve_mimic_layer(target, layer) for layer in ("image-mlp", "text-mlp")}
    probes = {layer: MimicProbe(target, name, batch_dim=sample_dim(target, name)) for layer, name in layers.items()}
    weights = {layer: get_parameter(target, name) for layer, name in layers.items()}
    reference_weights = {layer: get_parameter(reference, name).detach().float() for layer, name in layers.items()}
    order = np.random.default_rng([seed, 21]).permutation(len(data))
    tables = []
    for step in range(len(data) // batch):
        index = torch.as_tensor(order[step * batch:(step + 1) * batch])
        images, texts = data.images[index], data.texts[index]
        target.zero_grad(set_to_none=True)
        with torch.no_grad():
            reference_outputs = reference(images, texts)[:3]
        with probes["image-mlp"].capture(), probes["text-mlp"].capture():
            outputs = target(images, texts)[:3]
            losses = per_sample_contrastive_loss(*outputs)
        functions = dict(zip(layers, function_directions(distillation_losses(outputs, reference_outputs), list(weights.values()))))
        losses.mean().backward()  # after D's backward: the probes keep the batch loss's output gradients
        frame = {"uid": [data.uids[i] for i in index.tolist()], "step": np.full(len(index), step)}
        for layer, probe in probes.items():
            w_t = weights[layer].detach().float()
            scores = direction_scores(probe, {"score": reference_weights[layer] - w_t, "score_zero": -w_t,
                                              "score_function": functions[layer]}, batch)
            frame.update({f"{layer}/{column}": values.numpy() for column, values in scores.items()})
        frame["function_joint"] = joint_mimic_scores(list(probes.values()), list(functions.values()), batch).numpy()
        frame["score_loss"] = -losses.detach().numpy()
        frame["score_ref_clipscore"] = torch.nn.functional.cosine_similarity(reference_outputs[0], reference_outputs[1]).numpy()
        tables.append(pd.DataFrame(frame))
    target.zero_grad(set_to_none=True)
    return pd.concat(tables, ignore_index=True)


def _lift(aucs, column: str, controls: list[str]) -> dict:
    """Per question, the project's one reference lift of ``column`` over ``controls`` (either sign)."""
    from raymimic.score_table import reference_lift

    return {question: reference_lift({c: float(aucs.loc[c, question]) for c in [column, *controls]}, controls=controls)["lifts"][column]
            for question in aucs.columns}


def run(args) -> dict:
    import pandas as pd
    import torch

    from raymimic_experiments.reference_lift.data import load_split
    from raymimic_experiments.reference_lift.metrics import detection_aucs, gate_checks, per_uid
    from raymimic_experiments.reference_lift.train import RunSpec, per_sample_losses, train
    from raymimic_experiments.toy_pool import make_toy_pool

    torch.set_num_threads(args.threads)
    started, cpu_started = time.time(), time.process_time()
    pool, clean = os.path.join(args.workdir, "pool"), os.path.join(args.workdir, "clean_pool")
    make_toy_pool(pool, samples=args.samples, noise=args.noise, seed=args.seed, shard_size=2000, eval_samples=0, relabel=args.relabel,
                  relabel_pairs=4, workers=1, images=args.images)
    make_toy_pool(clean, samples=args.reference_samples, noise=0.0, seed=args.seed + 100, shard_size=2000, eval_samples=0, workers=1,
                  images=args.images)
    data, clean_data = load_split(pool, args.model), load_split(clean, args.model)
    truth = pd.read_parquet(os.path.join(pool, "ground_truth.parquet")).set_index("uid").loc[data.uids].reset_index()
    base = dict(model=args.model, batch=args.batch, lr=args.lr)
    _log("reference (another initialisation) on the clean pool")
    reference = train(RunSpec(**base, epochs=args.reference_epochs, seed=args.seed + 1000), clean_data).model.eval()
    _log("target, uniform weights, on the noisy pool")
    target = train(RunSpec(**base, epochs=args.epochs, seed=args.seed), data).model.train()
    gates = gate_checks(truth, per_sample_losses(reference, data, args.batch, args.seed),
                        per_sample_losses(target, data, args.batch, args.seed))
    target.train()
    _log(f"gates {gates}; one scoring pass")
    score_started, score_cpu = time.time(), time.process_time()
    rows = score_pass(target, reference.requires_grad_(False), data, args.batch, args.seed)
    scoring = {"wall_s": time.time() - score_started, "cpu_s": time.process_time() - score_cpu}
    columns = [c for c in rows.columns if c not in ("uid", "step")]
    aucs = detection_aucs(per_uid(rows, columns), truth)
    lifts = {}
    for layer in ("image-mlp", "text-mlp"):
        controls = [f"{layer}/score_zero", "score_loss"]
        for column in (f"{layer}/score", f"{layer}/score_function", "function_joint", "score_ref_clipscore"):
            lifts[f"{column} vs {layer} controls"] = _lift(aucs, column, controls)
    return {"settings": vars(args), "gates": gates, "aucs": aucs.to_dict(orient="index"), "lifts": lifts, "scoring": scoring,
            "seconds": time.time() - started, "cpu_seconds": time.process_time() - cpu_started}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workdir", default="/tmp/function_check", help="pools go here")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--model", default="raymimic-tiny")
    parser.add_argument("--images", default="mixed", choices=["shapes", "digits", "mixed"])
    parser.add_argument("--samples", type=int, default=6000, help="noisy pool size (the quickstart's)")
    parser.add_argument("--reference-samples", type=int, default=9000, help="clean pool size (the quickstart's)")
    parser.add_argument("--noise", type=float, default=0.3)
    parser.add_argument("--relabel", type=float, default=0.1)
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--reference-epochs", type=int, default=10)
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--threads", type=int, default=2, help="torch threads")
    parser.add_argument("--json", help="write the results here")
    args = parser.parse_args(argv)
    result = run(args)
    print(f"gates: {result['gates']}")
    print(f"{'column':<28}{'AUC all':>9}{'AUC random':>12}{'AUC systematic':>16}")
    for column, row in result["aucs"].items():
        print(f"{column:<28}{row.get('all', float('nan')):>9.3f}{row.get('random', float('nan')):>12.3f}"
              f"{row.get('systematic', float('nan')):>16.3f}")
    print("\nlift over the controls (the same layer's zero control, the target's loss):")
    for name, values in result["lifts"].items():
        print(f"  {name:<48}" + "  ".join(f"{q} {v:+.3f}" for q, v in values.items()))
    print(f"\nscoring pass: {result['scoring']['wall_s']:.1f} s wall, {result['scoring']['cpu_s']:.1f} s CPU; "
          f"whole check {result['seconds']:.0f} s wall")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2, default=str)
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
