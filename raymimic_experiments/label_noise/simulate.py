"""The whole label-noise simulation: reference, noisy runs per method and per control reference, detection, report."""
from __future__ import annotations

import dataclasses
import os
import time
from collections.abc import Callable

import numpy as np
import torch

from raymimic.mimic.controls import RANDOM_SEED_OFFSET
from raymimic_experiments.label_noise.analysis import noise_summary, score_auroc
from raymimic_experiments.label_noise.config import CONTROL_REFERENCES
from raymimic_experiments.label_noise.control_references import control_label, control_reference, initial_head
from raymimic_experiments.label_noise.data import load_dataset, symmetric_noise
from raymimic_experiments.label_noise.detect import evaluate_detection
from raymimic_experiments.label_noise.report import write_results
from raymimic_experiments.label_noise.train import MIMIC_LAYER, ClassifierTrainConfig, train_reference, train_run


def simulate(
    dataset: str = "digits",
    data_dir: str | None = None,
    noise_levels: list[float] = (0.4, 0.5, 0.6),
    methods: list[str] = ("sgd", "grad-mimic"),
    config: ClassifierTrainConfig | None = None,
    output_dir: str = "simulation-results",
    max_train: int | None = None,
    max_test: int | None = None,
    vote_rule: str | float = "majority",
    save_scores: bool = False,
    log: Callable[[str], None] | None = None,
    controls: list[str] = CONTROL_REFERENCES,
) -> tuple[dict, str, str]:
    """Run everything, write ``results.json`` / ``results.md``; return (results, json path, md path).

    ``controls`` (:data:`~raymimic_experiments.label_noise.config.CONTROL_REFERENCES`): Grad-Mimic is also run with each of
    these control references in place of the clean one (runs ``grad-mimic[<control>]``); only
    when ``grad-mimic`` is among ``methods``.
    """
    config = config or ClassifierTrainConfig()
    unknown = [c for c in controls if c not in CONTROL_REFERENCES]
    if unknown:
        raise ValueError(f"controls: unknown {unknown}; choose from {list(CONTROL_REFERENCES)}")
    controls = list(controls) if "grad-mimic" in methods else []
    log = log or (lambda message: None)
    started = time.perf_counter()
    data = load_dataset(dataset, data_dir, seed=config.seed, max_train=max_train, max_test=max_test)
    log(f"{data.name}: {len(data.y_train)} train / {len(data.y_test)} test samples, {data.num_classes} classes")
    reference = train_reference(data, config)
    log(f"reference model (clean labels): test accuracy {reference.test_accuracy:.3f}")
    control_info = _control_info(controls, data, config, reference.model)
    if "init" in controls and control_info["init_equals_zero"]:
        log("control init: the head starts at zero (W_0 = 0), so grad-mimic[init] coincides with grad-mimic[zero]")
    runs, summaries = [], []
    for noise in noise_levels:
        noisy_labels, is_noisy = symmetric_noise(data.y_train, noise, data.num_classes, seed=config.seed)
        sgd_model = None
        common = dict(data=data, labels=noisy_labels, noise=noise, is_noisy=is_noisy.numpy(), config=config, vote_rule=vote_rule,
                      runs=runs, log=log, scores_dir=os.path.join(output_dir, "scores") if save_scores else None)
        for method in methods:
            result = _record(method, method, "clean", reference.model, **common)
            if method == "sgd":
                sgd_model = result.model  # the noisy control's reference: plain SGD on these noisy labels
        if "noisy" in controls and sgd_model is None:
            sgd_model = train_run(data, noisy_labels, "sgd", config, reference=None).model
        if "noisy" in controls:
            control_info["noisy_reference_test_accuracy"][f"{noise:g}"] = _accuracy(sgd_model, data)
        for control in controls:
            reference_model = control_reference(control, data, config, reference.model, sgd_model)
            _record(control_label(control), "grad-mimic", control, reference_model, **common)
        summaries.append(noise_summary(runs, noise, controls))
    results = {
        "dataset": data.name,
        "reference_test_accuracy": reference.test_accuracy,
        "n_train": len(data.y_train),
        "n_test": len(data.y_test),
        "num_classes": data.num_classes,
        "noise_levels": list(noise_levels),
        "methods": list(methods),
        "controls": control_info,
        "mimic_layer": MIMIC_LAYER,
        "vote_rule": vote_rule,
        "config": dataclasses.asdict(config),
        "runs": runs,
        "summary": summaries,
        "seconds": round(time.perf_counter() - started, 1),
    }
    json_path, md_path = write_results(results, output_dir)
    return results, json_path, md_path


def _record(label: str, method: str, reference_name: str, reference_model, *, data, labels, noise: float, is_noisy: np.ndarray,
            config: ClassifierTrainConfig, vote_rule, runs: list, log, scores_dir: str | None):
    """Train one run, append its result entry (named ``label``) to ``runs``, log it, save its rows if asked."""
    run_started = time.perf_counter()
    result = train_run(data, labels, method, config, reference_model)
    entry = _run_entry(noise, label, result, is_noisy, vote_rule, config.seed)
    entry.update(weighting=method, reference=reference_name, seconds=round(time.perf_counter() - run_started, 2))
    runs.append(entry)
    log(_summary_line(entry))
    if scores_dir:
        os.makedirs(scores_dir, exist_ok=True)
        name = label.replace("[", "-").replace("]", "")
        result.rows.to_parquet(os.path.join(scores_dir, f"{noise:g}_{name}.parquet"), index=False)
    return result


def _control_info(controls: list[str], data, config: ClassifierTrainConfig, clean) -> dict:
    """What the control references are: which ran, whether ``init`` equals ``zero``, the random one's seed and norm."""
    w0 = initial_head(data, config)
    return {
        "names": list(controls),
        "init_equals_zero": bool(torch.count_nonzero(w0) == 0),
        "random_seed": config.seed + RANDOM_SEED_OFFSET,
        "clean_reference_norm": float(clean.get_parameter(MIMIC_LAYER).detach().norm()),
        "noisy_reference_test_accuracy": {},  # noise level -> test accuracy of the SGD model the noisy control uses
    }


def _accuracy(model, data) -> float:
    from raymimic_experiments.label_noise.train import accuracy

    return accuracy(model, data.x_test, data.y_test)


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
        # (steps taken, test accuracy) every eval_every steps: how fast the run learns
        "accuracy_curve": [[step, value] for step, value in result.curve],
    }
    if method == "sgd":
        # uniform weights carry no per-sample signal: nothing to binarize, nothing to rank
        entry.update(detection=None, quality_estimate=None, auroc=None, auroc_either_sign=None)
        return entry
    entry.update(score_auroc(rows, is_noisy))
    found = evaluate_detection(rows, is_noisy, rule=vote_rule, seed=seed)
    entry["detection"] = found["detection"]
    entry["quality_estimate"] = found["quality"]["fraction_kept"] if found["quality"] else None
    entry["quality"] = found["quality"]
    entry["binarizers"] = found["binarizers"]
    return entry


def _summary_line(entry: dict) -> str:
    line = f"noise {entry['noise']:g}  {entry['method']:<18} test accuracy {entry['test_accuracy']:.3f}"
    if entry.get("auroc") is not None:
        line += f"  AUROC {entry['auroc']:.3f}"
    if entry.get("detection"):
        f1 = {k: v.get("f1") for k, v in entry["detection"].items()}
        line += "  F1 " + " ".join(f"{k} {v:.3f}" if v is not None else f"{k} -" for k, v in f1.items())
    return line + f"  ({entry['seconds']:.1f}s)"
