"""How well the Stage-2 filter finds the mislabeled samples of a simulation run.

A sample counts as *flagged noisy* when the filter drops it. The Stage-2 binarizers and the
ensemble vote (:mod:`raymimic.select`) run unchanged on the run's score rows; each
binarizer's per-row decisions are combined over epochs by the same vote rule, and the
ensemble combines every binarizer over every epoch. Precision, recall and F1 of the drop
decisions are measured against the known noise mask.
"""
from __future__ import annotations

import numpy as np
import pandas as pd

from raymimic.select.binarize import make_binarizer
from raymimic.select.ensemble import ensemble_by_uid
from raymimic.select.quality import quality_estimate

BINARIZERS = ("threshold", "kmeans", "gmm")


def drop_metrics(keep: np.ndarray, is_noisy: np.ndarray) -> dict:
    """Precision/recall/F1 of ``~keep`` as a detector of ``is_noisy`` (one entry per sample)."""
    keep, is_noisy = np.asarray(keep, dtype=bool), np.asarray(is_noisy, dtype=bool)
    if keep.shape != is_noisy.shape:
        raise ValueError(f"keep {keep.shape} and is_noisy {is_noisy.shape} must have one entry per sample each")
    dropped = ~keep
    hits = int((dropped & is_noisy).sum())
    precision = hits / int(dropped.sum()) if dropped.any() else 0.0
    recall = hits / int(is_noisy.sum()) if is_noisy.any() else 0.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall > 0 else 0.0
    return {"precision": precision, "recall": recall, "f1": f1, "n_dropped": int(dropped.sum())}


def detection_table(rows: pd.DataFrame) -> pd.DataFrame:
    """The rows with ``score`` replaced by the method's own statistic (``method_stat``).

    For Grad-Mimic the two are the same number; for a baseline it means its weights, not
    the mimic score recorded beside them, are what gets binarized.
    """
    if "method_stat" not in rows:
        return rows
    return rows.assign(score=rows["method_stat"])


def evaluate_detection(rows: pd.DataFrame, is_noisy: np.ndarray, rule: str | float = "majority", seed: int = 0) -> dict:
    """Run every binarizer and the ensemble on ``rows``; score them against ``is_noisy``.

    ``rows`` are one run's score rows whose uids are ``f"{i:032x}"`` for sample ``i`` (so
    ``is_noisy[i]`` is that sample's truth). Returns ``{"detection": {name: metrics},
    "quality": quality_estimate(...) of the ensemble, "binarizers": fitted parameters}``;
    a binarizer that cannot fit this table (e.g. all weights equal) is reported with its
    error instead of metrics and left out of the ensemble.
    """
    table = detection_table(rows)
    fitted, detection, params = {}, {}, {}
    for name in BINARIZERS:
        try:
            fitted[name] = make_binarizer(name, seed=seed).fit(table)
        except ValueError as err:
            detection[name] = {"error": str(err)}
            continue
        params[name] = fitted[name].params()
        per_uid = ensemble_by_uid(table, {name: fitted[name]}, rule)
        detection[name] = drop_metrics(per_uid["keep"].to_numpy(), _truth(per_uid, is_noisy))
    if not fitted:
        return {"detection": detection, "quality": None, "binarizers": params}
    combined = ensemble_by_uid(table, fitted, rule)
    detection["ensemble"] = drop_metrics(combined["keep"].to_numpy(), _truth(combined, is_noisy))
    quality = quality_estimate(combined["keep"].to_numpy(), combined["mean_norm_weight"].to_numpy())
    return {"detection": detection, "quality": quality, "binarizers": params}


def _truth(per_uid: pd.DataFrame, is_noisy: np.ndarray) -> np.ndarray:
    index = np.array([int(uid, 16) for uid in per_uid["uid"]], dtype=np.int64)
    return np.asarray(is_noisy, dtype=bool)[index]
