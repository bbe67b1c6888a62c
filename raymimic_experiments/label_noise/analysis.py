"""Figures computed from the simulation's runs: score AUROC, steps to reach SGD, reference lift, the goal check.

- :func:`score_auroc`: the ROC-AUC of a run's per-sample mean statistic (``method_stat``, the
  number the method ranks samples by) against the noise mask, a low score flagging a noisy
  sample, and the "either sign" value ``max(AUC, 1 - AUC)``.
- :func:`steps_to_reach`: the first evaluated step of an accuracy curve at or above a target.
- :func:`noise_summary`: per noise level, the steps each run needs to reach SGD's final test
  accuracy, the reference lift (:func:`raymimic.score_table.columns.reference_lift`: the
  clean-reference AUC minus the best control run's either-sign AUC, every control run counting,
  ``noisy`` included; the accuracy gain over the best control) and the goal check (Grad-Mimic with the clean
  reference beats SGD and every control in test accuracy).
"""
from __future__ import annotations

import numpy as np
import pandas as pd

from raymimic.score_table.columns import reference_lift
from raymimic.select.quality import roc_auc

CLEAN = "grad-mimic"  # the Grad-Mimic run with the clean reference
ACCURACY_TOLERANCE = 1e-9  # accuracies are counts of test images over the same denominator


def score_auroc(rows: pd.DataFrame, is_noisy: np.ndarray, column: str = "method_stat") -> dict:
    """AUROC of each sample's mean ``column`` over all its rows as a detector of ``is_noisy`` (low = noisy).

    ``rows``' uids are ``f"{i:032x}"`` for sample ``i``. Returns ``{"auroc", "auroc_either_sign"}``;
    both None when every sample is clean or every one noisy.
    """
    means = rows.groupby("uid", sort=False)[column].mean()
    index = np.array([int(uid, 16) for uid in means.index], dtype=np.int64)
    truth = np.asarray(is_noisy, dtype=bool)[index]
    if truth.all() or not truth.any():
        return {"auroc": None, "auroc_either_sign": None}
    auc = roc_auc(truth, -means.to_numpy(np.float64))
    return {"auroc": auc, "auroc_either_sign": max(auc, 1.0 - auc)}


def steps_to_reach(curve, target: float, tolerance: float = ACCURACY_TOLERANCE) -> int | None:
    """The first step of ``curve`` (``[(step, accuracy), ...]`` in step order) with accuracy >= ``target``; None if never."""
    for step, value in curve:
        if value >= target - tolerance:
            return int(step)
    return None


def noise_summary(runs: list[dict], noise: float, controls: list[str]) -> dict:
    """Steps to SGD's final accuracy (written into each run of ``noise``), reference lift and the goal check.

    ``runs`` are the result entries (``method``, ``test_accuracy``, ``accuracy_curve``,
    ``auroc``, ``auroc_either_sign``); the control runs are named ``grad-mimic[<control>]``.
    Missing runs (no ``sgd``, no controls) leave the figures that need them None.
    """
    here = {r["method"]: r for r in runs if r["noise"] == noise}
    sgd = here.get("sgd")
    sgd_final = sgd["test_accuracy"] if sgd else None
    sgd_steps = steps_to_reach(sgd["accuracy_curve"], sgd_final) if sgd else None
    for run in here.values():
        steps = steps_to_reach(run["accuracy_curve"], sgd_final) if sgd else None
        run["steps_to_sgd_accuracy"] = steps
        run["steps_ratio_to_sgd"] = steps / sgd_steps if steps is not None and sgd_steps else None
    summary = {"noise": noise, "sgd_final_accuracy": sgd_final, "sgd_steps": sgd_steps, "lift": None, "goal": None}
    clean = here.get(CLEAN)
    present = {c: here[f"{CLEAN}[{c}]"] for c in controls if f"{CLEAN}[{c}]" in here}
    if clean is None or not present:
        return summary
    by_auc = reference_lift({CLEAN: clean.get("auroc"), **{c: r.get("auroc") for c, r in present.items()}}, controls=present)
    best_acc = max(present, key=lambda c: present[c]["test_accuracy"])
    summary["lift"] = {
        "clean_auroc": clean.get("auroc"),
        "best_control_auroc": by_auc["best_control"],
        "best_control_auroc_value": by_auc["best_control_value"],
        "auroc_lift": by_auc["lifts"][CLEAN],
        "clean_accuracy": clean["test_accuracy"],
        "best_control_accuracy": best_acc,
        "best_control_accuracy_value": present[best_acc]["test_accuracy"],
        "accuracy_gain": clean["test_accuracy"] - present[best_acc]["test_accuracy"],
    }
    if sgd is not None:
        rivals = {"sgd": sgd_final, **{f"{CLEAN}[{c}]": r["test_accuracy"] for c, r in present.items()}}
        closest = max(rivals, key=rivals.get)
        margin = clean["test_accuracy"] - rivals[closest]
        summary["goal"] = {"holds": bool(margin > ACCURACY_TOLERANCE), "margin": margin, "closest": closest,
                           "closest_accuracy": rivals[closest], "compared_with": sorted(rivals)}
    return summary
