"""results.json and the Markdown tables of the label-noise simulation (paper Tables 1 and 2), with the controls.

Besides the paper's tables (test accuracy, detection F1, quality estimate) results.md has the
goal check (Grad-Mimic with the clean reference against SGD and every control), the reference
lift, the AUROC of every run's mean score and the steps each run needs to reach SGD's final
test accuracy (the figures of :mod:`raymimic_experiments.label_noise.analysis`).
"""
from __future__ import annotations

import json
import os

DETECTORS = ("threshold", "kmeans", "gmm", "ensemble")


def write_results(results: dict, output_dir: str) -> tuple[str, str]:
    """Write ``results.json`` and ``results.md`` under ``output_dir``; return both paths."""
    os.makedirs(output_dir, exist_ok=True)
    json_path = os.path.join(output_dir, "results.json")
    md_path = os.path.join(output_dir, "results.md")
    with open(json_path, "w") as f:
        json.dump(results, f, indent=2)
    with open(md_path, "w") as f:
        f.write(markdown(results))
    return json_path, md_path


def markdown(results: dict) -> str:
    """Accuracy table (methods x noise, like Table 1) and detection F1 tables (like Table 2)."""
    runs = results["runs"]
    noises = sorted({r["noise"] for r in runs})
    methods = list(dict.fromkeys(r["method"] for r in runs))
    by_key = {(r["method"], r["noise"]): r for r in runs}
    header = "| | " + " | ".join(f"noise {n:g}" for n in noises) + " | mean |"
    rule = "|---|" + "---:|" * (len(noises) + 1)
    lines = [
        f"## Test accuracy (%), {results['dataset']}, {_setting(results)}",
        "",
        header,
        rule,
    ]
    for method in methods:
        values = [by_key[(method, n)]["test_accuracy"] if (method, n) in by_key else None for n in noises]
        lines.append(_row(method, values))
    reference = results["reference_test_accuracy"]
    lines.append(_row("reference (clean labels)", [reference] * len(noises)))
    summaries = results.get("summary") or []
    lines += _controls_note(results)
    lines += _goal(summaries)
    lines += reference_lift_lines(summaries)
    lines += _auroc(methods, noises, by_key, header, rule)
    lines += _steps(methods, noises, by_key, summaries, results)
    lines += ["", "## F1 (%) of finding the mislabeled samples (dropped = flagged noisy)", ""]
    lines += [header.replace("| |", "| method / binarizer |", 1), rule]
    for method in methods:
        for detector in DETECTORS:
            values = [_f1(by_key.get((method, n)), detector) for n in noises]
            if any(v is not None for v in values):
                lines.append(_row(f"{method} / {detector}", values))
    lines += ["", "## Dataset-quality estimate (%): share of samples the ensemble keeps (100 - noise% if perfect)", ""]
    lines += [header, rule]
    for method in methods:
        values = [by_key[(method, n)].get("quality_estimate") if (method, n) in by_key else None for n in noises]
        if any(v is not None for v in values):
            lines.append(_row(method, values))
    return "\n".join(lines) + "\n"


def _controls_note(results: dict) -> list[str]:
    info = results.get("controls") or {}
    if not info.get("names"):
        return []
    lines = ["", "Rows `grad-mimic[<control>]` are Grad-Mimic with a control reference in place of the clean one: "
             "`zero` W_ref = 0 (V = -W_t), `init` the run's own initial head W_0, `random` a random matrix with the clean "
             "reference's norm, `noisy` a reference trained the same way (plain SGD) on the noisy labels, i.e. the `sgd` run."]
    if "init" in info["names"] and info.get("init_equals_zero"):
        lines.append("The head starts at zero (W_0 = 0), so `init` coincides with `zero` here.")
    return lines


def _goal(summaries: list[dict]) -> list[str]:
    checks = [s for s in summaries if s.get("goal")]
    if not checks:
        return []
    lines = ["", "## Goal: Grad-Mimic with the clean reference beats SGD and every control in test accuracy", ""]
    for s in checks:
        goal = s["goal"]
        verdict = "yes" if goal["holds"] else "**no**"
        lines.append(f"- noise {s['noise']:g}: {verdict}, margin {100 * goal['margin']:+.1f} points over the closest, "
                     f"{goal['closest']} ({100 * goal['closest_accuracy']:.1f}%)")
    held = sum(s["goal"]["holds"] for s in checks)
    lines += ["", f"The goal holds at {held} of {len(checks)} noise levels."]
    return lines


def reference_lift_lines(summaries: list[dict]) -> list[str]:
    lifts = [s for s in summaries if s.get("lift")]
    if not lifts:
        return []
    lines = ["", "## Reference lift: the clean reference against the best control", "",
             "AUROC lift = clean-reference AUROC minus the best control's either-sign AUROC max(AUC, 1 - AUC); "
             "accuracy gain = clean-reference test accuracy minus the best control's.", "",
             "| noise | clean AUROC | best control (either sign) | AUROC lift | clean acc (%) | best control acc (%) | gain (points) |",
             "|---:|---:|---|---:|---:|---|---:|"]
    plain = []
    for s in lifts:
        lift = s["lift"]
        auc_lift = lift["auroc_lift"]
        best_auc = f"{lift['best_control_auroc']} {_num(lift['best_control_auroc_value'])}"
        lines.append(f"| {s['noise']:g} | {_num(lift['clean_auroc'])} | {best_auc} | {_num(auc_lift, signed=True)} "
                     f"| {100 * lift['clean_accuracy']:.1f} | {lift['best_control_accuracy']} "
                     f"{100 * lift['best_control_accuracy_value']:.1f} | {100 * lift['accuracy_gain']:+.1f} |")
        if auc_lift is not None and auc_lift <= 0:
            plain.append(f"- noise {s['noise']:g}: the AUROC lift is {auc_lift:+.3f} <= 0: control `{lift['best_control_auroc']}` "
                         f"ranks the noisy samples at least as well as the clean reference (with either sign).")
        if lift["accuracy_gain"] <= 0:
            plain.append(f"- noise {s['noise']:g}: the accuracy gain is {100 * lift['accuracy_gain']:+.1f} points <= 0: control "
                         f"`{lift['best_control_accuracy']}` trains at least as well as the clean reference.")
    return lines + ([""] + plain if plain else ["", "The lift is positive at every noise level, in AUROC and in accuracy."])


def _auroc(methods: list[str], noises: list[float], by_key: dict, header: str, rule: str) -> list[str]:
    lines = ["", "## AUROC of each sample's mean score as a detector of its noisy label: AUC / max(AUC, 1 - AUC)", "",
             "The score is the number the method ranks by (a low score flags a noisy sample); 0.5 is chance, near 0 the right "
             "ranking with the sign flipped.", "", header.replace(" mean |", "").replace("|---:|" + "---:|" * len(noises), ""),
             "|---|" + "---:|" * len(noises)]
    for method in methods:
        runs = [by_key.get((method, n)) for n in noises]
        if not any(r and r.get("auroc") is not None for r in runs):
            continue
        cells = [f"{r['auroc']:.3f} / {r['auroc_either_sign']:.3f}" if r and r.get("auroc") is not None else "-" for r in runs]
        lines.append(f"| {method} | " + " | ".join(cells) + " |")
    return lines


def _steps(methods: list[str], noises: list[float], by_key: dict, summaries: list[dict], results: dict) -> list[str]:
    sgd = {s["noise"]: s for s in summaries if s.get("sgd_steps") is not None}
    if not sgd:
        return []
    every = results.get("config", {}).get("eval_every")
    lines = ["", "## Steps to reach SGD's final test accuracy: first step (ratio to SGD's steps)", "",
             f"Test accuracy evaluated every {every} steps; SGD's final accuracy and its own first step reaching it:", "",
             "| | " + " | ".join(f"noise {n:g}" for n in noises) + " |", "|---|" + "---:|" * len(noises),
             "| SGD final accuracy (%) | " + " | ".join(f"{100 * sgd[n]['sgd_final_accuracy']:.1f}" if n in sgd else "-" for n in noises)
             + " |"]
    for method in methods:
        cells = []
        for n in noises:
            run = by_key.get((method, n))
            if run is None or n not in sgd:
                cells.append("-")
            elif run.get("steps_to_sgd_accuracy") is None:
                cells.append("never")
            else:
                cells.append(f"{run['steps_to_sgd_accuracy']} ({run['steps_ratio_to_sgd']:.2f}x)")
        lines.append(f"| {method} | " + " | ".join(cells) + " |")
    return lines


def _num(value, signed: bool = False) -> str:
    if value is None:
        return "-"
    return f"{value:+.3f}" if signed else f"{value:.3f}"


def _setting(results: dict) -> str:
    c = results.get("config", {})
    keys = ("model", "epochs", "lr", "batch_size", "tau", "seed")
    return ", ".join(f"{k} {c[k]}" for k in keys if k in c) + (", all layers re-weighted" if c.get("reweight_all") else "")


def _f1(run: dict | None, detector: str) -> float | None:
    if not run or not run.get("detection"):
        return None
    return run["detection"].get(detector, {}).get("f1")


def _row(label: str, values: list) -> str:
    known = [v for v in values if v is not None]
    mean = sum(known) / len(known) if known and len(known) == len(values) else None
    cells = [f"{100 * v:.1f}" if v is not None else "-" for v in values + [mean]]
    return f"| {label} | " + " | ".join(cells) + " |"
