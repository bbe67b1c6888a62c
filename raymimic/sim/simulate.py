"""The whole label-noise simulation: reference, noisy runs per method, detection, report."""
from __future__ import annotations

import dataclasses
import os
import time
from typing import Callable

import numpy as np

from raymimic.sim.data import load_dataset, symmetric_noise
from raymimic.sim.detect import evaluate_detection
from raymimic.sim.report import write_results
from raymimic.sim.train import TrainConfig, train_reference, train_run


def simulate(
    dataset: str = "digits",
    data_dir: str | None = None,
    noise_levels: list[float] = (0.4, 0.5, 0.6),
    methods: list[str] = ("sgd", "grad-mimic"),
    config: TrainConfig | None = None,
    output_dir: str = "simulation-results",
    max_train: int | None = None,
    max_test: int | None = None,
    vote_rule: str | float = "majority",
    save_scores: bool = False,
    log: Callable[[str], None] | None = None,
) -> tuple[dict, str, str]:
    """Run everything, write ``results.json`` / ``results.md``; return (results, json path, md path)."""
    config = config or TrainConfig()
    log = log or (lambda message: None)
    started = time.perf_counter()
    data = load_dataset(dataset, data_dir, seed=config.seed, max_train=max_train, max_test=max_test)
    log(f"{data.name}: {len(data.y_train)} train / {len(data.y_test)} test samples, {data.num_classes} classes")
    reference = train_reference(data, config)
    log(f"reference model (clean labels): test accuracy {reference.test_accuracy:.3f}")
    runs = []
    for noise in noise_levels:
        noisy_labels, is_noisy = symmetric_noise(data.y_train, noise, data.num_classes, seed=config.seed)
        for method in methods:
            run_started = time.perf_counter()
            result = train_run(data, noisy_labels, method, config, reference.model)
            entry = _run_entry(noise, method, result, is_noisy.numpy(), vote_rule, config.seed)
            entry["seconds"] = round(time.perf_counter() - run_started, 2)
            runs.append(entry)
            log(_summary_line(entry))
            if save_scores:
                folder = os.path.join(output_dir, "scores")
                os.makedirs(folder, exist_ok=True)
                result.rows.to_parquet(os.path.join(folder, f"{noise:g}_{method}.parquet"), index=False)
    results = {
        "dataset": data.name,
        "reference_test_accuracy": reference.test_accuracy,
        "n_train": len(data.y_train),
        "n_test": len(data.y_test),
        "num_classes": data.num_classes,
        "noise_levels": list(noise_levels),
        "methods": list(methods),
        "mimic_layer": "head.weight",
        "vote_rule": vote_rule,
        "config": dataclasses.asdict(config),
        "runs": runs,
        "seconds": round(time.perf_counter() - started, 1),
    }
    json_path, md_path = write_results(results, output_dir)
    return results, json_path, md_path


def _run_entry(noise: float, method: str, result, is_noisy: np.ndarray, vote_rule, seed: int) -> dict:
    rows = result.rows
    sample = np.array([int(uid, 16) for uid in rows["uid"]], dtype=np.int64)
    norm_weight = rows["weight"].to_numpy(np.float64) * rows["batch_size"].to_numpy()
    noisy_rows = is_noisy[sample]
    entry = {
        "noise": noise,
        "method": method,
        "test_accuracy": result.test_accuracy,
        "train_accuracy_on_clean_labels": result.train_accuracy_clean,
        # mean B*w (1.0 = uniform) of the mislabeled and the clean samples over all steps
        "mean_norm_weight_noisy": float(norm_weight[noisy_rows].mean()) if noisy_rows.any() else None,
        "mean_norm_weight_clean": float(norm_weight[~noisy_rows].mean()) if (~noisy_rows).any() else None,
    }
    if method == "sgd":
        # uniform weights carry no per-sample signal: nothing to binarize
        entry.update(detection=None, quality_estimate=None)
        return entry
    found = evaluate_detection(rows, is_noisy, rule=vote_rule, seed=seed)
    entry["detection"] = found["detection"]
    entry["quality_estimate"] = found["quality"]["fraction_kept"] if found["quality"] else None
    entry["quality"] = found["quality"]
    entry["binarizers"] = found["binarizers"]
    return entry


def _summary_line(entry: dict) -> str:
    line = f"noise {entry['noise']:g}  {entry['method']:<11} test accuracy {entry['test_accuracy']:.3f}"
    if entry.get("detection"):
        f1 = {k: v.get("f1") for k, v in entry["detection"].items()}
        line += "  F1 " + " ".join(f"{k} {v:.3f}" if v is not None else f"{k} -" for k, v in f1.items())
    return line + f"  ({entry['seconds']:.1f}s)"
