"""Dataset-quality estimate from a filter's decisions (paper, Stage 2), and how well a filter
finds known noise (:func:`detection_metrics`, the one precision/recall/F1 of raymimic).

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

import numpy as np


class QualityAccumulator:
    def __init__(self):
        self.n = self.n_kept = 0
        self.total = self.total_kept = 0.0

    def update(self, keep: np.ndarray, scores: np.ndarray) -> "QualityAccumulator":
        keep = np.asarray(keep)
        scores = np.asarray(scores, dtype=np.float64)
        if keep.dtype != bool:
            raise ValueError(f"keep must be a boolean array, got dtype {keep.dtype}")
        if keep.shape != scores.shape or keep.ndim != 1:
            raise ValueError(f"keep {keep.shape} and scores {scores.shape} must be 1-D arrays of the same length (one entry per sample)")
        bad = ~np.isfinite(scores)
        if bad.any():
            raise ValueError(f"{int(bad.sum())} of {len(scores)} scores are NaN or infinite (first at position {self.n + int(np.flatnonzero(bad)[0])}); drop or repair them first")
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
