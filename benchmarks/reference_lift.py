"""Does the mimic score select data because of the reference? The reference-lift grid.

    python benchmarks/reference_lift.py --models raymimic-tiny --seeds 0 1 2 --workdir /tmp/lift
    python benchmarks/reference_lift.py --summarize /tmp/lift --markdown lift_tables.md

For each (model, seed) cell, in one process and without Ray:

1. a toy pool with random corruption (``--noise``) and one-way class relabelling spread over
   four class pairs (``--relabel``), and a separate, larger clean pool;
2. two references trained on the clean pool: one from *another* initialisation (how public
   references are made: the primary reference everywhere) and one from the target's own
   initialisation (for comparison); the gate checks: the reference's own loss must flag the
   relabelled samples, the target's final loss must not;
3. the target trained on the noisy pool with uniform weights, its Stage-1 step recording
   online (image-mlp) the score, the controls (zero, init, random, fixed), the same-init
   reference and the baselines (loss, ref_loss, rho, ref_clipscore); checkpoints are then
   scored on every mimic layer (image-mlp, image-proj, text-proj, text-mlp) against the
   reference, the same-init one and the reference aligned to the target's basis;
4. the paper's mode: Grad-Mimic re-weighting (tau 0.05), direction current and fixed;
5. the Stage-2 filter on the online tables (F1), and zero-shot accuracy of models trained on
   the whole pool and on each kept subset (same number of steps).

Each cell writes ``cell_<model>_<seed>.json`` in the workdir; ``--summarize`` averages the cells
over seeds into Markdown tables (AUC on the random and systematic questions of
:mod:`raymimic_experiments.reference_lift.metrics`, reference lift, F1, zero-shot top-1).
"""
from __future__ import annotations

import argparse
import glob
import json
import os
import time

import numpy as np

LAYERS = ("image-mlp", "image-proj", "text-proj", "text-mlp")


def _log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", flush=True)


def _aucs(rows, truth) -> dict:
    from raymimic_experiments.reference_lift.metrics import detection_aucs, per_uid

    table = detection_aucs(per_uid(rows), truth)
    return {column: {q: (None if v is None or v != v else float(v)) for q, v in row.items()} for column, row in table.iterrows()}


def run_cell(model: str, seed: int, args) -> dict:
    import pandas as pd
    import torch

    from raymimic.clip import save_checkpoint
    from raymimic.score_table.columns import BASELINES
    from raymimic_experiments.reference_lift.data import load_split
    from raymimic_experiments.reference_lift.metrics import filter_detection, gate_checks, zero_shot_top1
    from raymimic_experiments.reference_lift.score import SCORED_CONTROLS, score_checkpoints
    from raymimic_experiments.reference_lift.train import RunSpec, per_sample_losses, train
    from raymimic_experiments.toy_pool import make_toy_pool

    torch.set_num_threads(args.threads)
    root = os.path.join(args.workdir, f"{model}_{seed}")
    pool, clean = os.path.join(root, "pool"), os.path.join(root, "clean_pool")
    started = time.time()
    summary = make_toy_pool(pool, samples=args.samples, noise=args.noise, seed=seed, shard_size=2000, eval_samples=args.eval_samples,
                            relabel=args.relabel, relabel_pairs=args.relabel_pairs, workers=1, images=args.images)
    make_toy_pool(clean, samples=args.reference_samples, noise=0.0, seed=seed + 100, shard_size=2000, eval_samples=0, workers=1,
                  images=args.images)
    data, clean_data = load_split(pool, model), load_split(clean, model)
    evaluation = load_split(pool, model, "eval")
    with open(os.path.join(pool, "eval", "classnames.json")) as f:
        classnames = json.load(f)
    with open(os.path.join(pool, "eval", "templates.json")) as f:
        templates = json.load(f)
    truth = pd.read_parquet(os.path.join(pool, "ground_truth.parquet")).set_index("uid").loc[data.uids].reset_index()
    cell = {"model": model, "seed": seed, "pool": summary, "settings": vars(args).copy()}
    base = dict(model=model, epochs=args.epochs, batch=args.batch, lr=args.lr)

    _log(f"{model}/{seed}: references")
    other = train(RunSpec(**{**base, "epochs": args.reference_epochs}, seed=seed + 1000), clean_data).model
    same = train(RunSpec(**{**base, "epochs": args.reference_epochs}, seed=seed), clean_data).model
    same_path = save_checkpoint(same, os.path.join(root, "reference_same_init.pt"), model)

    if args.gates_only:
        target_model = train(RunSpec(**base, seed=seed), data).model
        losses = [per_sample_losses(m, data, args.batch, seed) for m in (other, same, target_model)]
        cell["gates"] = gate_checks(truth, losses[0], losses[2])
        cell["gates_same_init"] = gate_checks(truth, losses[1], losses[2])
        cell["seconds"] = round(time.time() - started, 1)
        _log(f"{model}/{seed}: gates {cell['gates']}")
        return cell

    _log(f"{model}/{seed}: target, uniform weights, online scores")
    target = train(RunSpec(**base, seed=seed, weighting="sgd", controls=(*SCORED_CONTROLS, f"same={same_path}"), baselines=BASELINES,
                           checkpoints=args.checkpoints), data, reference=other)
    losses = {name: per_sample_losses(m, data, args.batch, seed) for name, m in (("reference", other), ("same_init", same),
                                                                                 ("target", target.model))}
    cell["gates"] = gate_checks(truth, losses["reference"], losses["target"])
    cell["gates_same_init"] = gate_checks(truth, losses["same_init"], losses["target"])
    cell["online_uniform"] = _aucs(target.rows, truth)

    cell["layers"], cell["alignment"] = {}, []
    for layer in args.layers:
        _log(f"{model}/{seed}: checkpoints scored on {layer}")
        rows, reports = score_checkpoints(target, model, data, other, layer, others={"same": same}, batch=args.batch, seed=seed)
        cell["layers"][layer] = _aucs(rows, truth)
        cell["alignment"] += reports

    modes = {"uniform": target.rows}
    for direction in args.paper_directions:
        _log(f"{model}/{seed}: Grad-Mimic re-weighting, direction {direction}")
        run = train(RunSpec(**base, seed=seed, weighting="grad-mimic", tau=args.tau, direction=direction, controls=SCORED_CONTROLS,
                            baselines=("loss",)), data, reference=other)
        modes[f"grad-mimic/{direction}"] = run.rows
        cell[f"online_grad-mimic/{direction}"] = _aucs(run.rows, truth)

    selections = {
        "uniform: score": (modes["uniform"], "score", False),
        "uniform: score_zero": (modes["uniform"], "score_zero", False),
        "uniform: score_loss": (modes["uniform"], "score_loss", False),
        "uniform: score_fixed": (modes["uniform"], "score_fixed", False),
        "uniform: score_ref_clipscore": (modes["uniform"], "score_ref_clipscore", False),
    }
    for direction in args.paper_directions:
        selections[f"grad-mimic/{direction}: paper rule"] = (modes[f"grad-mimic/{direction}"], "score", True)
        selections[f"grad-mimic/{direction}: score"] = (modes[f"grad-mimic/{direction}"], "score", False)
    cell["filters"], keeps = {}, {}
    for name, (rows, column, paper) in selections.items():
        result = filter_detection(rows, truth, column, paper_rule=paper)
        keeps[name] = result.pop("keep")
        kept = truth.loc[keeps[name], "kind"]
        cell["filters"][name] = {**result, "relabelled_kept": int((kept == "relabelled").sum()),
                                 "random_noise_kept": int(((kept != "clean") & (kept != "relabelled")).sum())}

    _log(f"{model}/{seed}: zero-shot of models trained on the kept subsets")
    cell["zero_shot"] = {"whole pool": zero_shot_top1(target.model, model, evaluation, classnames, templates)}
    steps = len(data) // args.batch * args.epochs
    for name in args.zero_shot:
        subset = data.subset(keeps[name])
        if len(subset) < args.batch:  # the filter kept too little to train on: say so, do not guess
            cell["zero_shot"][name] = None
            continue
        epochs = max(1, round(steps / max(1, len(subset) // args.batch)))
        trained = train(RunSpec(**{**base, "epochs": epochs}, seed=seed), subset).model
        cell["zero_shot"][name] = zero_shot_top1(trained, model, evaluation, classnames, templates)
    cell["seconds"] = round(time.time() - started, 1)
    _log(f"{model}/{seed}: done in {cell['seconds']:.0f} s")
    return cell


# ----------------------------------------------------------------------------- tables


def _mean_sd(values) -> str:
    values = [v for v in values if v is not None]
    if not values:
        return "n/a"
    return f"{np.mean(values):.3f} ± {np.std(values):.3f}" if len(values) > 1 else f"{values[0]:.3f}"


def _lift(aucs: dict, column: str, question: str) -> float | None:
    """``column``'s reference lift on ``question`` (the library's one definition; None for a control's own row)."""
    from raymimic.score_table.columns import reference_lift

    return reference_lift({c: by_question.get(question) for c, by_question in aucs.items()})["lifts"].get(column)


def _auc_table(cells: list[dict], pick, title: str) -> list[str]:
    columns = sorted({c for cell in cells for c in pick(cell)}, key=lambda c: (c != "score", c))
    lines = [f"#### {title}", "", "| column | AUC random | AUC systematic | lift random | lift systematic |", "|---|---|---|---|---|"]
    for column in columns:
        values = [pick(cell).get(column, {}) for cell in cells]
        lines.append(f"| `{column}` | {_mean_sd([v.get('random') for v in values])} | {_mean_sd([v.get('systematic') for v in values])} "
                     f"| {_mean_sd([_lift(pick(c), column, 'random') for c in cells])} "
                     f"| {_mean_sd([_lift(pick(c), column, 'systematic') for c in cells])} |")
    return lines + [""]


def summarize(workdir: str) -> str:
    paths = sorted(glob.glob(os.path.join(workdir, "cell_*.json")))
    if not paths:
        raise SystemExit(f"no cell_*.json under {workdir}")
    cells = [json.load(open(p)) for p in paths]
    out = []
    for model in sorted({c["model"] for c in cells}):
        group = [c for c in cells if c["model"] == model]
        seeds = ", ".join(str(c["seed"]) for c in group)
        out += [f"### {model} (seeds {seeds}; mean ± sd over seeds)", ""]
        out += ["| gate | reference (other init) | reference (same init) | target |", "|---|---|---|---|"]
        out.append(f"| loss AUC on relabelled vs clean of the same classes | {_mean_sd([c['gates']['reference_loss_auc'] for c in group])} "
                   f"| {_mean_sd([c['gates_same_init']['reference_loss_auc'] for c in group])} "
                   f"| {_mean_sd([c['gates']['target_loss_auc'] for c in group])} |")
        out.append(f"| gates passed | {sum(c['gates']['passed'] for c in group)}/{len(group)} | | |")
        out.append("")
        out += _auc_table(group, lambda c: c["online_uniform"], "Online scores, uniform weights (image-mlp)")
        for key in sorted(k for k in group[0] if k.startswith("online_grad-mimic")):
            out += _auc_table(group, lambda c, k=key: c[k], f"Online scores, {key.removeprefix('online_')} re-weighting (image-mlp)")
        for layer in group[0]["layers"]:
            out += _auc_table(group, lambda c, la=layer: c["layers"][la], f"Checkpoint scores on {layer}")
        out += ["#### Alignment of the other-init reference to the target (per layer, last checkpoint)", "",
                "| layer | input-side R² | output-side R² | cos(W_ref, W_t) | cos(aligned, W_t) |", "|---|---|---|---|---|"]
        for layer in group[0]["layers"]:
            last = [[r for r in c["alignment"] if r["layer"] == layer][-1] for c in group]
            out.append(f"| {layer} | {_mean_sd([r['in_fit'] for r in last])} | {_mean_sd([r['out_fit'] for r in last])} "
                       f"| {_mean_sd([r['cosine_before'] for r in last])} | {_mean_sd([r['cosine_after'] for r in last])} |")
        out += ["", "#### Stage-2 filter (ensemble) on the online tables", "",
                "| selection | F1 (all noise) | kept | relabelled kept | random noise kept |", "|---|---|---|---|---|"]
        for name in group[0]["filters"]:
            rows = [c["filters"][name] for c in group]
            out.append(f"| {name} | {_mean_sd([r['f1'] for r in rows])} | {_mean_sd([r['kept'] for r in rows])} "
                       f"| {_mean_sd([r['relabelled_kept'] for r in rows])} | {_mean_sd([r['random_noise_kept'] for r in rows])} |")
        out += ["", "#### Zero-shot top-1 of a model trained on each kept subset (same number of steps)", "",
                "| training data | zero-shot top-1 |", "|---|---|"]
        for name in group[0]["zero_shot"]:
            out.append(f"| {name} | {_mean_sd([c['zero_shot'].get(name) for c in group])} |")
        out.append("")
    return "\n".join(out)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=["raymimic-tiny"], help="open_clip model names (raymimic-tiny, raymimic-small)")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--workdir", default="/tmp/reference_lift", help="pools, references and cell_*.json go here")
    parser.add_argument("--samples", type=int, default=6000, help="noisy pool size")
    parser.add_argument("--reference-samples", type=int, default=9000, help="clean pool the references train on")
    parser.add_argument("--eval-samples", type=int, default=800)
    parser.add_argument("--noise", type=float, default=0.2, help="random corruption")
    parser.add_argument("--relabel", type=float, default=0.1, help="systematic noise: one-way relabelling")
    parser.add_argument("--relabel-pairs", type=int, default=4)
    parser.add_argument("--images", default="shapes", choices=["shapes", "digits", "mixed"], help="the toy pool's image source")
    parser.add_argument("--gates-only", action="store_true", help="train the references and the target, report the gate checks only")
    parser.add_argument("--epochs", type=int, default=8)
    parser.add_argument("--reference-epochs", type=int, default=8)
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--tau", type=float, default=0.05)
    parser.add_argument("--checkpoints", type=int, default=3, help="target checkpoints scored on every layer")
    parser.add_argument("--layers", nargs="+", default=list(LAYERS), choices=LAYERS)
    parser.add_argument("--paper-directions", nargs="*", default=["current", "fixed"], choices=["current", "fixed"])
    parser.add_argument("--zero-shot", nargs="*", default=["uniform: score", "uniform: score_zero", "grad-mimic/current: paper rule"],
                        help="selections to train a model on and evaluate zero-shot")
    parser.add_argument("--threads", type=int, default=1, help="torch threads per process")
    parser.add_argument("--summarize", metavar="WORKDIR", help="only write the tables of the cells found in WORKDIR")
    parser.add_argument("--markdown", help="write the tables here (with --summarize)")
    args = parser.parse_args()
    if args.summarize:
        text = summarize(args.summarize)
        if args.markdown:
            with open(args.markdown, "w") as f:
                f.write(text + "\n")
        print(text)
        return
    os.makedirs(args.workdir, exist_ok=True)
    for model in args.models:
        for seed in args.seeds:
            cell = run_cell(model, seed, args)
            name = f"gates_{model}_{seed}.json" if args.gates_only else f"cell_{model}_{seed}.json"
            with open(os.path.join(args.workdir, name), "w") as f:
                json.dump(cell, f, indent=1, default=str)


if __name__ == "__main__":
    main()
