"""Dataset-quality estimate from a filter's decisions (paper, Stage 2), and how well a filter
finds known noise (:func:`detection_metrics`, the one precision/recall/F1 of raymimic;
:func:`roc_auc`, the ROC-AUC of a score against it), and how much the reference changes the
selection (:func:`lift_metrics`, with the one *reference lift* of :func:`raymimic.score_table.columns.reference_lift`).

Two numbers describe how clean a dataset looks to the mimic score:

- ``fraction_kept``: the share of samples the filter keeps. In the paper's label-noise
  simulation it tracks the true noise level closely (Pearson r = -0.903 for noise 0.3-0.7).
- ``mean_score``: the mean mimic score of the dataset (the paper's DataComp estimate). Use
  the raw score ``m_i`` (or its per-uid mean): the normalised weight ``B * w`` averages to
  exactly 1 over any full step, so its dataset mean carries no information.

Empty input, NaN scores and mismatched lengths raise ``ValueError``. On a cluster the
decisions arrive in batches: :class:`QualityAccumulator` adds them up with O(1) memory and
gives the same numbers as :func:`quality_estimate` on the concatenation.
"""
from __future__ import annotations

import warnings
from collections.abc import Mapping

import numpy as np

from raymimic.score_table.columns import CONTROLS, LIFT_DEFINITION, PRIMARY, column_kind, control_name, reference_lift, uses_reference


class QualityAccumulator:
    def __init__(self):
        self.n = self.n_kept = 0
        self.total = self.total_kept = 0.0

    def update(self, keep: np.ndarray, scores: np.ndarray) -> QualityAccumulator:
        keep = np.asarray(keep)
        scores = np.asarray(scores, dtype=np.float64)
        if keep.dtype != bool:
            raise ValueError(f"keep must be a boolean array, got dtype {keep.dtype}")
        if keep.shape != scores.shape or keep.ndim != 1:
            raise ValueError(f"keep {keep.shape} and scores {scores.shape} must be 1-D arrays of the same length (one entry per sample)")
        bad = ~np.isfinite(scores)
        if bad.any():
            first = self.n + int(np.flatnonzero(bad)[0])
            raise ValueError(f"{int(bad.sum())} of {len(scores)} scores are NaN or infinite (first at position {first}); "
                             "drop or repair them first")
        self.n += len(keep)
        self.n_kept += int(keep.sum())
        self.total += float(scores.sum())
        self.total_kept += float(scores[keep].sum())
        return self

    def result(self) -> dict:
        if self.n == 0:
            raise ValueError("cannot estimate the quality of an empty dataset (no samples)")
        n_dropped = self.n - self.n_kept
        return {
            "n_samples": self.n,
            "n_kept": self.n_kept,
            "fraction_kept": self.n_kept / self.n,
            "mean_score": self.total / self.n,
            "mean_score_kept": self.total_kept / self.n_kept if self.n_kept else None,
            "mean_score_dropped": (self.total - self.total_kept) / n_dropped if n_dropped else None,
        }


def quality_estimate(keep: np.ndarray, scores: np.ndarray) -> dict:
    """``fraction_kept``, ``mean_score`` and the means over kept / dropped samples."""
    return QualityAccumulator().update(keep, scores).result()


def detection_metrics(keep: np.ndarray, is_noisy: np.ndarray) -> dict:
    """Precision, recall and F1 of the dropped samples (``~keep``) as a detector of ``is_noisy``.

    One entry per sample in each array. Precision is 0 when nothing is dropped, recall 0
    when nothing is noisy, F1 0 when both are 0. Also returns ``n_dropped`` and ``n_noisy``.
    """
    keep, is_noisy = np.asarray(keep, dtype=bool), np.asarray(is_noisy, dtype=bool)
    if keep.shape != is_noisy.shape:
        raise ValueError(f"keep {keep.shape} and is_noisy {is_noisy.shape} must have one entry per sample each")
    dropped = ~keep
    hits, n_dropped, n_noisy = int((dropped & is_noisy).sum()), int(dropped.sum()), int(is_noisy.sum())
    precision = hits / n_dropped if n_dropped else 0.0
    recall = hits / n_noisy if n_noisy else 0.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall > 0 else 0.0
    return {"precision": precision, "recall": recall, "f1": f1, "n_dropped": n_dropped, "n_noisy": n_noisy}


def roc_auc(is_positive: np.ndarray, scores: np.ndarray) -> float:
    """Area under the ROC curve of ``scores`` as a detector of ``is_positive`` (a higher score flags a positive).

    The Mann-Whitney form: the probability that a random positive scores above a random
    negative, a tie counting one half; the value of ``sklearn.metrics.roc_auc_score(is_positive,
    scores)``. 0.5 is chance; a value near 0 is a good detector with the sign flipped, so
    ``max(auc, 1 - auc)`` says how well the ranking separates the two either way. Needs one entry
    per sample in each array and at least one positive and one negative; NaN scores raise ``ValueError``.
    """
    from scipy.stats import rankdata

    positive, scores = np.asarray(is_positive, dtype=bool), np.asarray(scores, dtype=np.float64)
    if positive.shape != scores.shape or positive.ndim != 1:
        raise ValueError(f"is_positive {positive.shape} and scores {scores.shape} must be 1-D arrays with one entry per sample each")
    if not np.isfinite(scores).all():
        raise ValueError(f"{int((~np.isfinite(scores)).sum())} of {len(scores)} scores are NaN or infinite")
    n_pos = int(positive.sum())
    n_neg = len(positive) - n_pos
    if n_pos == 0 or n_neg == 0:
        raise ValueError(f"ROC-AUC needs positives and negatives, got {n_pos} positive and {n_neg} negative samples")
    ranks = rankdata(scores)  # ties get their average rank
    return float((ranks[positive].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


# ------------------------------------------------------------------------------ reference lift
LIFT_VALUE_PREFIX = "step_z_"
"""Per-uid column ``step_z_<score column>``: the mean over the uid's rows of that column's per-step standardised value."""

LIFT_DEFINITIONS = {
    "uids": "uids where the column has a value (the per-uid mean of its per-step standardised value, step_z)",
    "spearman_zero": "Spearman rank correlation of the column's per-uid mean step_z with score_zero's (uids where both are defined)",
    "spearman_filter": "Spearman rank correlation with the filter's own score column",
    "overlap_filter": "share of the filter's kept uids that are also among this column's k highest uids, k = the number of uids "
                      "the filter keeps (1 = the same kept set; about k/n for an unrelated ranking)",
    "overlap_zero": "share of this column's top k uids also in score_zero's top k (same k)",
    "auc": "ROC-AUC of -score as a detector of the known noisy uids (noisy = positive, a low score flags it for dropping): "
           "1 = every noisy uid ranks below every clean one, 0.5 = chance, 0 = the opposite sign",
    "auc_either_sign": "max(AUC, 1 - AUC): how well the ranking separates noisy from clean uids whichever its sign",
    "f1": "F1 of dropping every uid outside the column's top k (the filter's kept count) as a detector of the noisy uids",
    "lift": f"the column's reference lift: {LIFT_DEFINITION}",
    "reference_lift": "the lift of `score` (the mimic score)",
    "reference_lift_f1": "F1 of `score` minus the highest F1 among the same controls, all at the filter's kept fraction",
}
"""What each lift metric means (the reports print these)."""


def spearman(a: np.ndarray, b: np.ndarray) -> float | None:
    """Spearman rank correlation over the pairs where both are finite; None with fewer than 3 pairs or a constant side."""
    from scipy.stats import spearmanr

    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    both = np.isfinite(a) & np.isfinite(b)
    if both.sum() < 3 or np.ptp(a[both]) == 0 or np.ptp(b[both]) == 0:
        return None
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        value = float(spearmanr(a[both], b[both])[0])
    return value if np.isfinite(value) else None


def top_k(values: np.ndarray, k: int) -> np.ndarray:
    """Boolean mask of the ``k`` highest finite values (ties: the earlier entry first); NaN is never in it."""
    values = np.asarray(values, dtype=np.float64)
    finite = np.isfinite(values)
    order = np.argsort(np.where(finite, -values, np.inf), kind="stable")
    mask = np.zeros(len(values), dtype=bool)
    mask[order[:max(0, int(k))]] = True
    return mask & finite


def drop_auc(values: np.ndarray, is_noisy: np.ndarray) -> float | None:
    """:func:`roc_auc` of ``-values`` for ``is_noisy`` over the finite values; None without both classes among them."""
    values, is_noisy = np.asarray(values, dtype=np.float64), np.asarray(is_noisy, dtype=bool)
    finite = np.isfinite(values)
    positives = int(is_noisy[finite].sum())
    if positives == 0 or positives == int(finite.sum()):
        return None
    return roc_auc(is_noisy[finite], -values[finite])


def lift_metrics(values: Mapping[str, np.ndarray], keep: np.ndarray, filter_column: str = "score",
                 is_noisy: np.ndarray | None = None) -> dict:
    """How much the reference changes the selection, per score column (docs/method.md section 7).

    ``values``: per score column (``score``, ``score_<name>``), one value per uid (its mean
    per-step standardised score; NaN where the uid has none), all aligned with ``keep`` (the
    filter's per-uid decisions) and, when given, ``is_noisy`` (the ground truth). Higher = keep
    for every column. Returns ``{"columns": {column: metrics}, "reference_lift", ...}``: the
    metrics are defined in :data:`LIFT_DEFINITIONS`; ``k`` is the number of uids the filter keeps.
    ``verdict`` says in words what the numbers mean, plainly "adds nothing measurable" when the
    reference lift is <= 0.
    """
    keep = np.asarray(keep, dtype=bool)
    columns = {c: np.asarray(v, dtype=np.float64) for c, v in values.items()}
    if filter_column not in columns:
        raise ValueError(f"the filter's score column {filter_column!r} is not among the columns {list(columns)}")
    for column, v in columns.items():
        if v.shape != keep.shape:
            raise ValueError(f"column {column!r} has {v.shape} values for {keep.shape} decisions")
    truth = None if is_noisy is None else np.asarray(is_noisy, dtype=bool)
    if truth is not None and truth.shape != keep.shape:
        raise ValueError(f"is_noisy {truth.shape} and keep {keep.shape} must have one entry per uid each")
    n, k = len(keep), int(keep.sum())
    zero = columns.get("score_zero")
    tops = {c: top_k(v, k) for c, v in columns.items()}
    rows = {}
    for column, v in columns.items():
        row = {"name": control_name(column) or column, "kind": column_kind(column), "uids": int(np.isfinite(v).sum()),
               "spearman_zero": spearman(v, zero) if zero is not None else None,
               "spearman_filter": spearman(v, columns[filter_column]),
               "overlap_filter": float((tops[column] & keep).sum() / k) if k else None,
               "overlap_zero": float((tops[column] & tops["score_zero"]).sum() / k) if k and zero is not None else None}
        if truth is not None:
            auc = drop_auc(v, truth)
            row.update(auc=auc, auc_either_sign=None if auc is None else max(auc, 1.0 - auc),
                       f1=detection_metrics(tops[column], truth)["f1"])
        rows[column] = row
    controls = [c for c in columns if not uses_reference(c)]
    out = {"filter_column": filter_column, "n_uids": n, "n_kept": k, "fraction_kept": k / n if n else None,
           "ground_truth": truth is not None, "n_noisy": None if truth is None else int(truth.sum()),
           "columns": rows, "controls": controls, "best_control": None, "reference_auc": None, "best_control_auc_either_sign": None,
           "reference_lift": None, "reference_lift_f1": None, "filter_detection": None}
    if truth is not None:
        out["filter_detection"] = detection_metrics(keep, truth)
        by_auc = reference_lift({c: row["auc"] for c, row in rows.items()})
        for column, value in by_auc["lifts"].items():
            rows[column]["lift"] = value
        out.update(reference_auc=rows.get(PRIMARY, {}).get("auc"), best_control=by_auc["best_control"],
                   best_control_auc_either_sign=by_auc["best_control_value"], reference_lift=by_auc["lifts"].get(PRIMARY))
        out["reference_lift_f1"] = reference_lift({c: row["f1"] for c, row in rows.items()}, either_sign=False)["lifts"].get(PRIMARY)
    out["verdict"] = _verdict(out)
    return out


def _verdict(lift: dict) -> str:
    rows, best = lift["columns"], lift["best_control"]
    if not lift["controls"]:
        return (f"no control direction ({', '.join(CONTROLS)}) and no loss of the target's own (score_loss) was recorded in the "
                "score table: the reference lift cannot be measured (record controls in Stage 1)")
    if not lift["ground_truth"]:
        zero = rows.get("score_zero")
        said = ""
        if zero is not None and "score" in rows and rows["score"]["spearman_zero"] is not None:
            overlap = rows["score"]["overlap_zero"]
            said = (f" Here `score` has Spearman {rows['score']['spearman_zero']:.3f} with `score_zero`"
                    + (f", and {overlap:.1%} of its top k uids are also in `score_zero`'s top k." if overlap is not None else "."))
        return ("no ground truth: the reference lift (an AUC difference) needs known noisy samples. The rank correlation and the "
                "overlap with the zero control say how much the reference changed the ranking: a high correlation or overlap means "
                "it changed little of what the target model alone would have chosen." + said)
    lift_value = lift["reference_lift"]
    if lift_value is None:
        return "the AUCs are undefined here (the ground truth of these uids is all noisy or all clean): no reference lift"
    ref, control = lift["reference_auc"], lift["best_control_auc_either_sign"]
    if lift_value <= 0:
        return (f"reference lift {lift_value:+.3f} <= 0: the reference adds nothing measurable here (the control `{best}` detects "
                f"the noisy samples as well or better: AUC either sign {control:.3f}, `score` {ref:.3f})")
    return (f"reference lift {lift_value:+.3f}: the reference score detects the noisy samples better than the best control "
            f"`{best}` (AUC {ref:.3f} against {control:.3f} either sign)")
