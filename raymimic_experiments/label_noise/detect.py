"""How well the Stage-2 filter finds the mislabeled samples of a simulation run.

A sample counts as *flagged noisy* when the filter drops it. The Stage-2 mimic filter
(:class:`~raymimic.select.mimic_filter.MimicFilter`, the ensemble of every binarizer) runs unchanged
on the run's score rows, in this process (a pandas table: the same fit, votes and rule as
on Ray, without starting Ray); each binarizer's per-uid decision combines its votes over
epochs, and the ensemble combines every binarizer over every epoch. Precision, recall and
F1 of the drop decisions (:func:`raymimic.select.quality.detection_metrics`) are measured
against the known noise mask.
"""
from __future__ import annotations

import numpy as np
import pandas as pd

from raymimic.select.mimic_filter import MimicFilter
from raymimic.select.quality import detection_metrics, quality_estimate

BINARIZERS = ("threshold", "kmeans", "gmm")


def detection_table(rows: pd.DataFrame) -> pd.DataFrame:
    """The rows with ``score`` replaced by the method's own statistic (``method_stat``).

    For Grad-Mimic the two are the same number; for a baseline it means its weights, not
    the mimic score recorded beside them, are what gets binarized.
    """
    if "method_stat" not in rows:
        return rows
    return rows.assign(score=rows["method_stat"])


def evaluate_detection(rows: pd.DataFrame, is_noisy: np.ndarray, rule: str | float = "majority", seed: int = 0) -> dict:
    """Run the ensemble mimic filter on ``rows``; score each binarizer and the ensemble against ``is_noisy``.

    ``rows`` are one run's score rows whose uids are ``f"{i:032x}"`` for sample ``i`` (so
    ``is_noisy[i]`` is that sample's truth). The binarizers are fitted on every row. Returns
    ``{"detection": {name: metrics}, "quality": quality_estimate(...) of the ensemble,
    "binarizers": fitted parameters}``; a binarizer that cannot fit this table (e.g. all
    weights equal) is reported with its error instead of metrics and left out of the ensemble.
    """
    table = detection_table(rows)
    stage = MimicFilter(table, method="ensemble", methods=list(BINARIZERS), rule=rule, seed=seed, fit_sample=max(2, len(table)),
                        unfit="skip")
    try:
        stage.fit()
    except ValueError as err:
        errors = stage.stats.get("unfit", {})
        return {"detection": {name: {"error": errors.get(name, str(err))} for name in BINARIZERS}, "quality": None, "binarizers": {}}
    decisions = stage.decisions
    truth = _truth(decisions, is_noisy)
    unfit = stage.stats.get("unfit", {})
    detection = {name: {"error": unfit[name]} if name in unfit else detection_metrics(decisions[f"keep_{name}"].to_numpy(), truth)
                 for name in BINARIZERS}
    keep = decisions["mimic_keep"].to_numpy(bool)
    detection["ensemble"] = detection_metrics(keep, truth)
    quality = quality_estimate(keep, decisions["mean_norm_weight"].to_numpy())
    return {"detection": detection, "quality": quality, "binarizers": {name: b.params() for name, b in stage.binarizers.items()}}


def _truth(per_uid: pd.DataFrame, is_noisy: np.ndarray) -> np.ndarray:
    index = np.array([int(uid, 16) for uid in per_uid["uid"]], dtype=np.int64)
    return np.asarray(is_noisy, dtype=bool)[index]
