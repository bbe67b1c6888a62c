"""results.json and the Markdown tables of the label-noise simulation (paper Tables 1 and 2)."""
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
