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
   online (image-mlp, or ``--online-layer``) the score, the controls (zero, init, random, fixed), the same-init
   reference, the reference variants of ``--online-controls`` (function, aligned, output) and
   the baselines (loss, ref_loss, rho, ref_clipscore); with ``--layers``, checkpoints are then
   scored on those mimic layers against the reference, the same-init one and the reference
   aligned to the target's basis;
4. the Grad-Mimic re-weighting runs of ``--reweighting`` (the paper's: image-mlp, direction
   current, tau 0.05; others along the function, aligned, fixed direction, along a control that
   holds no reference, on text-mlp, at other taus, against the same-init reference); every
   Stage-1 run, the uniform one included, is evaluated every ``--eval-every`` steps on the clean
   held-out split (zero-shot top-1/top-5, image<->text recall@5): equal steps, and the steps
   each needs to reach uniform training's final zero-shot;
5. the Stage-2 filter on the online tables (F1; the best no-reference column as "best
   control"), and models trained on each kept subset of ``--zero-shot`` (same number of steps);
6. with ``--seen-fraction``, a reference trained on a known random share of the noisy pool and
   how well each column tells the samples it saw from the rest.

Each cell writes ``cell_<images>_<model>_<seed>.json`` in the workdir; ``--summarize`` averages the
cells over seeds into Markdown tables (AUC on the random and systematic questions of
:mod:`raymimic_experiments.reference_lift.metrics`, reference lift, F1, zero-shot, retrieval,
steps to uniform's final zero-shot, seen-vs-unseen AUC).
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


def parse_reweighting(spec: str) -> dict:
    """``LAYER:DIRECTION:TAU[:same]`` -> the settings of one Grad-Mimic re-weighting run (``same``: the same-init reference)."""
    parts = spec.split(":")
    if len(parts) not in (3, 4) or parts[0] not in LAYERS or (len(parts) == 4 and parts[3] != "same"):
        raise argparse.ArgumentTypeError(f"--reweighting {spec!r}: expected LAYER:DIRECTION:TAU[:same], LAYER one of {LAYERS}")
    from raymimic.train.step import STEP_DIRECTIONS

    if parts[1] not in STEP_DIRECTIONS:
        raise argparse.ArgumentTypeError(f"--reweighting {spec!r}: direction {parts[1]!r} is not one of {STEP_DIRECTIONS}")
    same = len(parts) == 4
    name = f"grad-mimic {parts[1]} ({parts[0]}, tau {float(parts[2]):g}{', same-init reference' if same else ''})"
    return {"name": name, "layer": parts[0], "direction": parts[1], "tau": float(parts[2]), "same": same}


PAPER_MODE = "grad-mimic current (image-mlp, tau 0.05)"
"""The paper's Stage 1: re-weighting along W_ref - W_t of the image tower's last MLP, tau 0.05."""


def _best_control(aucs: dict, question: str = "all") -> str | None:
    """The column computed without the reference with the highest AUC on ``question`` (the selection a reference must beat)."""
    from raymimic.score_table.columns import uses_reference

    candidates = {c: v.get(question) for c, v in aucs.items() if c != "score" and not uses_reference(c) and v.get(question) is not None}
    return max(candidates, key=candidates.get) if candidates else None


def run_cell(model: str, seed: int, args) -> dict:
    import pandas as pd
    import torch

    from raymimic.clip import save_checkpoint
    from raymimic.score_table.columns import BASELINES
    from raymimic_experiments.reference_lift.data import load_split
    from raymimic_experiments.reference_lift.metrics import evaluate_model, filter_detection, gate_checks, per_uid, seen_aucs
    from raymimic_experiments.reference_lift.score import SCORED_CONTROLS, score_checkpoints
    from raymimic_experiments.reference_lift.train import RunSpec, per_sample_losses, train
    from raymimic_experiments.toy_pool import make_toy_pool

    torch.set_num_threads(args.threads)
    root = os.path.join(args.workdir, f"{args.images}_{model}_{seed}")
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
    cell = {"model": model, "seed": seed, "images": args.images, "pool": summary, "settings": vars(args).copy()}
    base = dict(model=model, epochs=args.epochs, batch=args.batch, lr=args.lr)

    def evaluate(m):
        return evaluate_model(m, model, evaluation, classnames, templates)

    _log(f"{model}/{seed}: references")
    other = train(RunSpec(**{**base, "epochs": args.reference_epochs}, seed=seed + 1000), clean_data).model
    same = train(RunSpec(**{**base, "epochs": args.reference_epochs}, seed=seed), clean_data).model
    same_path = save_checkpoint(same, os.path.join(root, "reference_same_init.pt"), model)
    cell["references"] = {"other init": evaluate(other), "same init": evaluate(same)}

    if args.gates_only:
        target_model = train(RunSpec(**base, seed=seed), data).model
        losses = [per_sample_losses(m, data, args.batch, seed) for m in (other, same, target_model)]
        cell["gates"] = gate_checks(truth, losses[0], losses[2])
        cell["gates_same_init"] = gate_checks(truth, losses[1], losses[2])
        cell["seconds"] = round(time.time() - started, 1)
        _log(f"{model}/{seed}: gates {cell['gates']}")
        return cell

    _log(f"{model}/{seed}: target, uniform weights, online scores")
    online = (*SCORED_CONTROLS, f"same={same_path}", *args.online_controls)
    target = train(RunSpec(**base, seed=seed, weighting="sgd", mimic_layer=args.online_layer, controls=online, baselines=BASELINES,
                           checkpoints=args.checkpoints), data,
                   reference=other, evaluate=evaluate, eval_every=args.eval_every, align_every=args.align_every)
    losses = {name: per_sample_losses(m, data, args.batch, seed) for name, m in (("reference", other), ("same_init", same),
                                                                                 ("target", target.model))}
    cell["gates"] = gate_checks(truth, losses["reference"], losses["target"])
    cell["gates_same_init"] = gate_checks(truth, losses["same_init"], losses["target"])
    cell["online_uniform"] = _aucs(target.rows, truth)
    cell["curves"] = {"uniform": target.curve}

    cell["layers"], cell["alignment"] = {}, []
    for layer in args.layers:
        _log(f"{model}/{seed}: checkpoints scored on {layer}")
        rows, reports = score_checkpoints(target, model, data, other, layer, others={"same": same}, batch=args.batch, seed=seed)
        cell["layers"][layer] = _aucs(rows, truth)
        cell["alignment"] += reports

    modes = {"uniform": target.rows}
    for run_spec in args.reweighting:
        _log(f"{model}/{seed}: {run_spec['name']}")
        run = train(RunSpec(**base, seed=seed, weighting="grad-mimic", tau=run_spec["tau"], direction=run_spec["direction"],
                            mimic_layer=run_spec["layer"], controls=("zero", "init", "random"), baselines=("loss",)), data,
                    reference=same if run_spec["same"] else other, evaluate=evaluate, eval_every=args.eval_every,
                    align_every=args.align_every)
        modes[run_spec["name"]] = run.rows
        cell[f"online_{run_spec['name']}"] = _aucs(run.rows, truth)
        cell["curves"][run_spec["name"]] = run.curve

    columns = set(target.rows.columns)
    selections = {f"uniform: {c}": (modes["uniform"], c, False) for c in (
        "score", "score_zero", "score_loss", "score_fixed", "score_same", "score_aligned", "score_function", "score_output", "score_rho",
        "score_ref_clipscore") if c in columns}
    best = _best_control(cell["online_uniform"])
    cell["best_control"] = best
    if best is not None:
        selections["uniform: best control"] = (modes["uniform"], best, False)
    if PAPER_MODE in modes:
        selections[f"{PAPER_MODE}: paper rule"] = (modes[PAPER_MODE], "score", True)
        selections[f"{PAPER_MODE}: score"] = (modes[PAPER_MODE], "score", False)
    cell["filters"], keeps = {}, {}
    for name, (rows, column, paper) in selections.items():
        result = filter_detection(rows, truth, column, paper_rule=paper)
        keeps[name] = result.pop("keep")
        kept = truth.loc[keeps[name], "kind"]
        cell["filters"][name] = {**result, "column": column, "relabelled_kept": int((kept == "relabelled").sum()),
                                 "random_noise_kept": int(((kept != "clean") & (kept != "relabelled")).sum())}

    _log(f"{model}/{seed}: models trained on the kept subsets")
    cell["zero_shot"] = {"whole pool": target.curve[-1]}
    steps = len(data) // args.batch * args.epochs
    for name in args.zero_shot:
        if name not in keeps:
            continue
        subset = data.subset(keeps[name])
        if len(subset) < args.batch:  # the filter kept too little to train on: say so, do not guess
            cell["zero_shot"][name] = None
            continue
        epochs = max(1, round(steps / max(1, len(subset) // args.batch)))
        cell["zero_shot"][name] = evaluate(train(RunSpec(**{**base, "epochs": epochs}, seed=seed), subset).model)

    if args.seen_fraction > 0:
        _log(f"{model}/{seed}: a reference trained on a known part of the pool")
        seen_mask = np.zeros(len(data), bool)
        seen_mask[np.random.default_rng([seed, 77]).permutation(len(data))[:int(round(args.seen_fraction * len(data)))]] = True
        partial = train(RunSpec(**{**base, "epochs": args.reference_epochs}, seed=seed + 2000), data.subset(seen_mask)).model
        run = train(RunSpec(**base, seed=seed, weighting="sgd", controls=(*SCORED_CONTROLS, *args.online_controls), baselines=BASELINES),
                    data, reference=partial, align_every=args.align_every)
        values = per_uid(run.rows)
        seen = {data.uids[i] for i in np.flatnonzero(seen_mask)}
        clean_uids = set(truth.loc[truth["kind"] == "clean", "uid"])
        cell["seen"] = {"all": seen_aucs(values, seen), "clean": seen_aucs(values.loc[values.index.isin(list(clean_uids))], seen),
                        "fraction": args.seen_fraction}
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


def _curve_table(group: list[dict]) -> list[str]:
    """Final metrics of every Stage-1 run and the steps each needs to reach uniform training's final zero-shot top-1."""
    from raymimic_experiments.reference_lift.metrics import steps_to_reach

    total = group[0]["curves"]["uniform"][-1]["step"]
    lines = ["#### Stage-1 targets: uniform weights vs Grad-Mimic re-weighting (equal steps, clean held-out split)", "",
             f"Steps to uniform's final top-1: the first evaluation (every {group[0]['settings']['eval_every']} of {total} steps) at or "
             "above the uniform run's own final top-1 of the same seed; `-` where a run never reaches it.", "",
             "| Stage-1 run | zero-shot top-1 | top-5 | image->text R@5 | text->image R@5 | steps to uniform's final top-1 (per seed) |",
             "|---|---|---|---|---|---|"]
    for name in group[0]["curves"]:
        finals = [c["curves"][name][-1] for c in group if name in c["curves"]]
        reach = [steps_to_reach(c["curves"][name], c["curves"]["uniform"][-1]["top1"]) for c in group if name in c["curves"]]
        lines.append(f"| {name} | {_mean_sd([f['top1'] for f in finals])} | {_mean_sd([f['top5'] for f in finals])} "
                     f"| {_mean_sd([f['image_to_text_r5'] for f in finals])} | {_mean_sd([f['text_to_image_r5'] for f in finals])} "
                     f"| {' / '.join('-' if r is None else str(r) for r in reach)} |")
    return lines + [""]


def _seen_table(group: list[dict]) -> list[str]:
    from raymimic.score_table.columns import uses_reference

    fraction = group[0]["seen"]["fraction"]
    lines = [f"#### Which samples did the reference train on? (a reference trained on a random {fraction:.0%} of the noisy pool)", "",
             "AUC of telling the samples the reference saw from the rest (0.5 = no idea; a column computed without the reference "
             "cannot know which half it saw, so its AUC is 0.5 up to noise).", "",
             "| column | uses the reference | AUC, all samples | AUC, clean samples only |", "|---|---|---|---|"]
    for column in sorted(group[0]["seen"]["all"], key=lambda c: (c != "score", c)):
        knows = "yes" if column == "score" or uses_reference(column) else "no"
        lines.append(f"| `{column}` | {knows} | {_mean_sd([c['seen']['all'].get(column) for c in group])} "
                     f"| {_mean_sd([c['seen']['clean'].get(column) for c in group])} |")
    return lines + [""]


def _metric(value, key: str):
    return None if value is None else value[key]


def summarize(workdir: str) -> str:
    paths = sorted(glob.glob(os.path.join(workdir, "cell_*.json")))
    if not paths:
        raise SystemExit(f"no cell_*.json under {workdir}")
    cells = [json.load(open(p)) for p in paths]
    out = []
    for images, model in sorted({(c["images"], c["model"]) for c in cells}):
        group = [c for c in cells if (c["images"], c["model"]) == (images, model)]
        seeds = ", ".join(str(c["seed"]) for c in group)
        samples = group[0]["settings"]["samples"]
        out += [f"### {model}, `{images}` pool of {samples:,d} samples (seeds {seeds}; mean ± sd over seeds)", ""]
        out += ["| gate | reference (other init) | reference (same init) | target |", "|---|---|---|---|"]
        out.append(f"| loss AUC on relabelled vs clean of the same classes | {_mean_sd([c['gates']['reference_loss_auc'] for c in group])} "
                   f"| {_mean_sd([c['gates_same_init']['reference_loss_auc'] for c in group])} "
                   f"| {_mean_sd([c['gates']['target_loss_auc'] for c in group])} |")
        out.append(f"| gates passed | {sum(c['gates']['passed'] for c in group)}/{len(group)} | | |")
        out.append(f"| zero-shot top-1 on the clean held-out split | {_mean_sd([c['references']['other init']['top1'] for c in group])} "
                   f"| {_mean_sd([c['references']['same init']['top1'] for c in group])} "
                   f"| {_mean_sd([c['curves']['uniform'][-1]['top1'] for c in group])} |")
        out.append("")
        layer = group[0]["settings"].get("online_layer", "image-mlp")
        out += _auc_table(group, lambda c: c["online_uniform"], f"Online scores, uniform weights ({layer})")
        for key in sorted(k for k in group[0] if k.startswith("online_grad-mimic")):
            out += _auc_table(group, lambda c, k=key: c[k], f"Online scores, {key.removeprefix('online_')}")
        for layer in group[0]["layers"]:
            out += _auc_table(group, lambda c, la=layer: c["layers"][la], f"Checkpoint scores on {layer}")
        out += ["#### Stage-2 filter (ensemble) on the online tables", "",
                f"`best control`: per seed, the column without the reference with the best AUC over all noise "
                f"({', '.join(str(c['best_control']) for c in group)}).", "",
                "| selection | F1 (all noise) | kept | relabelled kept | random noise kept |", "|---|---|---|---|---|"]
        for name in group[0]["filters"]:
            rows = [c["filters"][name] for c in group if name in c["filters"]]
            out.append(f"| {name} | {_mean_sd([r['f1'] for r in rows])} | {_mean_sd([r['kept'] for r in rows])} "
                       f"| {_mean_sd([r['relabelled_kept'] for r in rows])} | {_mean_sd([r['random_noise_kept'] for r in rows])} |")
        out += ["", "#### Models trained on each kept subset (same number of steps), clean held-out split", "",
                "| training data | zero-shot top-1 | top-5 | image->text R@5 | text->image R@5 |", "|---|---|---|---|---|"]
        for name in group[0]["zero_shot"]:
            values = [c["zero_shot"].get(name) for c in group]
            out.append(f"| {name} | " + " | ".join(_mean_sd([_metric(v, k) for v in values])
                                                   for k in ("top1", "top5", "image_to_text_r5", "text_to_image_r5")) + " |")
        out.append("")
        if len(group[0]["curves"]) > 1:
            out += _curve_table(group)
        if "seen" in group[0]:
            out += _seen_table(group)
        out.append(f"Seconds per seed: {', '.join(str(c['seconds']) for c in group)}.")
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
    parser.add_argument("--checkpoints", type=int, default=3, help="target checkpoints scored on every layer of --layers")
    parser.add_argument("--layers", nargs="*", default=list(LAYERS), choices=LAYERS, help="layers the checkpoints are scored on")
    parser.add_argument("--online-layer", default="image-mlp", choices=LAYERS, help="the mimic layer of the uniform run's online scores")
    parser.add_argument("--online-controls", nargs="*", default=["function", "aligned"],
                        help="reference variants the uniform run records beside score, the controls and score_same")
    parser.add_argument("--align-every", type=int, default=47, help="steps between re-fits of the aligned control or direction")
    parser.add_argument("--reweighting", nargs="*", type=parse_reweighting,
                        default=[parse_reweighting("image-mlp:current:0.05"), parse_reweighting("image-mlp:function:0.05")],
                        metavar="LAYER:DIRECTION:TAU[:same]",
                        help="Grad-Mimic re-weighting runs (direction: current, fixed, function, aligned, or a control zero/init/random; "
                             "same: the same-init reference); image-mlp:current:0.05 is the paper's Stage 1")
    parser.add_argument("--eval-every", type=int, default=23, help="steps between evaluations of every Stage-1 run (zero-shot, retrieval)")
    parser.add_argument("--zero-shot", nargs="*", default=["uniform: score", "uniform: score_function", "uniform: best control",
                                                           "uniform: score_ref_clipscore"],
                        help="selections to train a model on and evaluate (zero-shot, retrieval)")
    parser.add_argument("--seen-fraction", type=float, default=0.0,
                        help="train a reference on this random share of the noisy pool and measure which samples each column says it saw")
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
            name = f"{'gates' if args.gates_only else 'cell'}_{args.images}_{model}_{seed}.json"
            with open(os.path.join(args.workdir, name), "w") as f:
                json.dump(cell, f, indent=1, default=str)


if __name__ == "__main__":
    main()
