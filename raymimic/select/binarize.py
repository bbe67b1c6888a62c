"""Binarizers: turn mimic scores into keep/drop decisions (Stage 2, plain numpy/sklearn).

A binarizer is *fitted* on a sample of score-table rows and then *applied* to any number of
rows (one batch at a time on a cluster, or a whole table locally). It reads the Stage 1
score-table columns ``uid, step, epoch, rank, score, weight, batch_size`` from a pandas
DataFrame or a dict of columns.

The quantity each binarizer works on (its *feature*) is a parameter:

``step_z`` (default for ``kmeans`` and ``gmm``)
    The raw score standardised within its training step: ``(m_i - mean_step) / std_step``.
    Softmax weights are ``exp(m_i / tau)`` up to a per-step constant, so they are heavy
    tailed (a few samples carry most of the weight) and a 2-component fit on them spends a
    component on the tail. The log of the normalised weight is linear in ``m_i`` and fixes
    the tails, but the *spread* of the scores drifts during training (gradients shrink), so
    early steps would dominate one component and late steps the other. Standardising the
    score within each step removes both effects. Within a step it is the same number as the
    standardised log-weight, since ``log(B w_i) = m_i / tau - const``. The per-step mean and
    standard deviation come from a :class:`StepStats` built on the whole table (on a
    cluster: partial sums per block, combined on the driver), not from the fit sample.
``log_norm_weight``
    ``log(B * w_i)``; 0 = uniform weight. Robust to heavy tails, not to drifting scale.
    Weights that underflowed to 0 in float32 are clipped to the smallest positive float32.
``norm_weight`` (default for ``threshold`` when the weights are informative)
    ``B * w_i``; 1.0 = uniform weight. ``threshold`` keeps ``B * w_i > 1``, which is the
    paper's rule ``w_i > 1/B``. Note that with a small temperature the softmax is
    dominated by its tail and this rule keeps few samples; ``threshold`` with
    ``feature="step_z"`` (cut 0: above the step's mean score) is the scale-free variant.
``score``
    The raw mimic score ``m_i``, for tables with a single step or a user's own cut.

Uniform weights. A table recorded under uniform weights (``--weighting sgd``) has
``B * w_i = 1`` on every row: the weight features carry nothing there (``threshold`` on
``norm_weight`` would drop every sample). Whether the weights are informative is decided
at fit time (:func:`informative_weights`: some row has ``|B * w_i - 1| >`` :data:`UNIFORM_TOLERANCE`),
from the whole table's statistics when the caller passes them (``fit(weights_informative=...)``,
as :class:`~raymimic.select.mimic_filter.MimicFilter` does) or else from the fit table. Without
informative weights a binarizer built without a feature uses :data:`UNIFORM_DEFAULT_FEATURE`
(``step_z`` for every method; ``threshold`` then cuts at 0, above the step's mean score),
and one asked explicitly for a weight feature raises ``ValueError``.

The paper's own Stage-2 rule binarizes the weight ``w_i`` itself: ``threshold`` at ``1/B``
(``B * w_i > 1``), GMM and k-means on ``w_i``: every method with feature
:data:`PAPER_FEATURE` (``norm_weight``; ``B`` is fixed within a run, so the scale does not
change any of the three). It needs informative weights.

Degenerate input never yields a silent answer: empty tables, NaN or infinite values and
samples with fewer than two distinct values raise ``ValueError`` saying what is wrong. A
step whose scores are all equal (or that has a single row) cannot be standardised; its rows
use the median standard deviation of the other steps (documented fallback, counted in
``StepStats.degenerate_steps``); if every step is degenerate, ``ValueError``.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd

from raymimic.score_table import COLUMNS as SCORE_COLUMNS  # the Stage 1 score-table columns (raymimic.score_table owns them)
from raymimic.select.names import FEATURES

METHODS = ("threshold", "kmeans", "gmm")
DEFAULT_FEATURE = {"threshold": "norm_weight", "kmeans": "step_z", "gmm": "step_z"}
"""Each method's feature when the table's weights are informative."""
UNIFORM_DEFAULT_FEATURE = {"threshold": "step_z", "kmeans": "step_z", "gmm": "step_z"}
"""Each method's feature when they are not (uniform weights, or no weight columns)."""
WEIGHT_FEATURES = ("norm_weight", "log_norm_weight")
"""Features computed from the weight ``w_i`` (meaningless under uniform weights)."""
PAPER_FEATURE = "norm_weight"
"""The paper's Stage-2 rule: every binarizer on the weight (threshold at 1/B, GMM and k-means on w_i)."""
UNIFORM_TOLERANCE = 1e-5
"""``|B * w_i - 1|`` at or below this counts as uniform (float32 rounding of ``1/B`` is below 1e-6)."""
# Cut of `threshold` for each feature: "above uniform weight" / "above the step's mean".
DEFAULT_CUT = {"norm_weight": 1.0, "log_norm_weight": 0.0, "step_z": 0.0}


def _column(table: Any, name: str) -> np.ndarray:
    try:
        values = table[name]
    except (KeyError, IndexError) as exc:
        have = list(table.columns) if hasattr(table, "columns") else list(table)
        raise ValueError(f"score table has no column {name!r} (columns: {have}); "
                         f"expected the Stage 1 score-table columns {list(SCORE_COLUMNS)}") from exc
    return np.asarray(values)


def _length(table: Any) -> int:
    if hasattr(table, "__len__") and hasattr(table, "columns"):
        return len(table)
    first = next(iter(table.values()), None)
    return 0 if first is None else len(first)


def weight_range(table: Any) -> tuple[float, float, int] | None:
    """``(min, max, rows off uniform)`` of ``B * w_i`` over the finite rows of ``table``; None without weight columns.

    "Off uniform": ``|B * w_i - 1| >`` :data:`UNIFORM_TOLERANCE`. Blocks of a table combine by
    min, max and sum (:func:`combine_weight_ranges`).
    """
    have = list(table.columns) if hasattr(table, "columns") else list(table)
    if "weight" not in have or "batch_size" not in have:
        return None
    norm = np.asarray(table["weight"], dtype=np.float64) * np.asarray(table["batch_size"], dtype=np.float64)
    norm = norm[np.isfinite(norm)]
    if len(norm) == 0:
        return None
    return float(norm.min()), float(norm.max()), int((np.abs(norm - 1.0) > UNIFORM_TOLERANCE).sum())


def combine_weight_ranges(ranges) -> tuple[float, float, int] | None:
    """:func:`weight_range` of several blocks combined into the whole table's; None if no block had weights."""
    ranges = [r for r in ranges if r is not None]
    if not ranges:
        return None
    return min(r[0] for r in ranges), max(r[1] for r in ranges), sum(r[2] for r in ranges)


def informative_weights(table_or_range: Any) -> bool | None:
    """Whether some row's ``B * w_i`` differs from 1 (beyond :data:`UNIFORM_TOLERANCE`); None without weight columns.

    Takes a table or a :func:`weight_range` tuple (e.g. the whole table's, combined from blocks).
    """
    found = table_or_range if isinstance(table_or_range, tuple) or table_or_range is None else weight_range(table_or_range)
    return None if found is None else found[2] > 0


def default_feature(method: str, informative: bool | None = True) -> str:
    """The feature ``method`` uses when none is asked for: :data:`DEFAULT_FEATURE` with informative weights,
    :data:`UNIFORM_DEFAULT_FEATURE` without (uniform weights, or none)."""
    if method not in DEFAULT_FEATURE:
        raise ValueError(f"unknown binarizer {method!r}; choose one of {list(METHODS)}")
    return (DEFAULT_FEATURE if informative else UNIFORM_DEFAULT_FEATURE)[method]


def uniform_weight_error(feature: str, what: str = "") -> ValueError:
    """The error for a weight feature asked of a table recorded under uniform weights."""
    return ValueError(f"feature {feature!r}{what} needs informative weights, but the score table was recorded under uniform weights "
                      f"(B * w_i = 1 on every row: Stage 1's default, --weighting sgd): the weight says nothing about a sample there. "
                      f"Use a score feature (step_z, score), or leave the feature unset to get step_z; the paper's rule needs "
                      f"a table recorded with --weighting grad-mimic")


def _check_finite(values: np.ndarray, what: str, table: Any = None) -> None:
    bad = ~np.isfinite(values)
    if bad.any():
        where = ""
        if table is not None:
            try:
                uid = _column(table, "uid")[np.flatnonzero(bad)[0]]
                where = f" (first at uid {uid!r})"
            except ValueError:
                pass
        raise ValueError(f"{int(bad.sum())} of {len(values)} {what} values are NaN or infinite{where}; "
                         "drop or repair those rows before binarizing")


@dataclass
class StepStats:
    """Per-step mean and standard deviation of the raw score, for the ``step_z`` feature.

    Built from partial statistics (count, mean, M2 per step) so that blocks of a table can
    be summarised independently and combined exactly (Chan et al.'s parallel variance).
    """

    steps: np.ndarray
    mean: np.ndarray
    std: np.ndarray
    count: np.ndarray
    degenerate_steps: list[int] = field(default_factory=list)

    @staticmethod
    def partials(table: Any) -> pd.DataFrame:
        """Per-step ``count, mean, m2`` of one block: combine blocks with :meth:`from_partials`."""
        frame = pd.DataFrame({"step": _column(table, "step").astype(np.int64), "score": _column(table, "score").astype(np.float64)})
        _check_finite(frame["score"].to_numpy(), "score", table)
        grouped = frame.groupby("step")["score"]
        out = grouped.agg(["count", "mean"]).reset_index()
        out["m2"] = grouped.var(ddof=0).to_numpy() * out["count"].to_numpy()
        return out

    @classmethod
    def from_partials(cls, partials: pd.DataFrame) -> StepStats:
        if len(partials) == 0:
            raise ValueError("cannot compute per-step statistics of an empty score table")
        p = partials.copy()
        p["sum"] = p["mean"] * p["count"]
        totals = p.groupby("step").agg(count=("count", "sum"), total=("sum", "sum"))
        mean = totals["total"] / totals["count"]
        p = p.join(mean.rename("grand_mean"), on="step")
        p["m2c"] = p["m2"] + p["count"] * (p["mean"] - p["grand_mean"]) ** 2
        m2 = p.groupby("step")["m2c"].sum()
        count = totals["count"].to_numpy()
        std = np.sqrt(np.maximum(m2.to_numpy(), 0.0) / count)
        mean_values = mean.to_numpy()
        # a step's spread below 1e-12 of its typical magnitude is rounding noise, not spread
        degenerate = (count < 2) | (std <= 1e-12 * np.maximum(1.0, np.abs(mean_values)))
        steps = totals.index.to_numpy().astype(np.int64)
        if degenerate.all():
            raise ValueError(f"every step ({len(steps)}) has constant scores or a single row; the per-step standardised score "
                             "(feature 'step_z') is undefined. Use feature='score' or 'norm_weight' for such a table")
        std = std.copy()
        std[degenerate] = float(np.median(std[~degenerate]))
        order = np.argsort(steps)
        return cls(steps[order], mean_values[order], std[order], count[order], [int(s) for s in steps[degenerate]])

    @classmethod
    def from_table(cls, table: Any) -> StepStats:
        return cls.from_partials(cls.partials(table))

    def standardize(self, steps: np.ndarray, scores: np.ndarray) -> np.ndarray:
        steps = np.asarray(steps, dtype=np.int64)
        index = np.searchsorted(self.steps, steps)
        index = np.clip(index, 0, len(self.steps) - 1)
        unknown = self.steps[index] != steps
        if unknown.any():
            raise ValueError(f"step {int(steps[unknown][0])} is not in the per-step statistics (they cover {len(self.steps)} steps "
                             f"from {int(self.steps[0])} to {int(self.steps[-1])}); build StepStats from the whole score table")
        return (np.asarray(scores, dtype=np.float64) - self.mean[index]) / self.std[index]

    def summary(self) -> dict:
        return {"n_steps": int(len(self.steps)), "degenerate_steps": self.degenerate_steps[:100],
                "n_degenerate_steps": len(self.degenerate_steps)}


def compute_feature(table: Any, feature: str, step_stats: StepStats | None = None) -> np.ndarray:
    """The values of ``feature`` (one of :data:`FEATURES`) for every row of ``table``."""
    if feature not in FEATURES:
        raise ValueError(f"unknown feature {feature!r}; choose one of {list(FEATURES)}")
    if feature == "score":
        values = _column(table, "score").astype(np.float64)
        _check_finite(values, "score", table)
        return values
    if feature == "step_z":
        scores = _column(table, "score").astype(np.float64)
        _check_finite(scores, "score", table)
        stats = step_stats if step_stats is not None else StepStats.from_table(table)
        return stats.standardize(_column(table, "step"), scores)
    weight = _column(table, "weight").astype(np.float64)
    _check_finite(weight, "weight", table)
    batch = _column(table, "batch_size").astype(np.float64)
    if (batch <= 0).any():
        raise ValueError("batch_size must be positive (the global batch size B of the step)")
    norm = weight * batch
    if feature == "norm_weight":
        return norm
    if (norm < 0).any():
        raise ValueError(f"{int((norm < 0).sum())} rows have weight < 0; log_norm_weight needs softmax weights (>= 0). "
                         "Use feature='step_z' for raw, unnormalised scores")
    # float32 softmax weights of the lowest samples underflow to exactly 0: they sit at the
    # bottom of the scale, so clip them to the smallest positive float32 instead of -inf
    return np.log(np.maximum(norm, np.finfo(np.float32).tiny))


class Binarizer:
    """Keep/drop rule fitted on a sample of rows and applied to any rows.

    ``fit(table, step_stats=None)`` learns the rule; with feature ``step_z`` it needs the
    per-step statistics of the *whole* table (``StepStats``): when none are given they are
    computed from ``table`` itself, which is right when ``table`` holds whole steps.
    """

    method = "base"

    def __init__(self, feature: str | None = None, seed: int = 0):
        if feature is not None and feature not in FEATURES:
            raise ValueError(f"unknown feature {feature!r} for {self.method}; choose one of {list(FEATURES)}")
        self.requested_feature = feature  # None: chosen at fit time from what the table holds
        self.feature = feature or DEFAULT_FEATURE[self.method]
        self.weights_informative: bool | None = None
        self.seed = seed
        self.step_stats: StepStats | None = None
        self.fitted = False
        self.n_fit = 0

    def feature_values(self, table: Any) -> np.ndarray:
        stats = self.step_stats if self.feature == "step_z" else None
        if self.feature == "step_z" and stats is None:
            raise ValueError("binarizer with feature 'step_z' is not fitted: call fit() first (it records the per-step statistics)")
        return compute_feature(table, self.feature, stats)

    def fit(self, table: Any, step_stats: StepStats | None = None, weights_informative: bool | None = None) -> Binarizer:
        """Fit on ``table``. ``weights_informative``: whether the whole table's weights are informative
        (:func:`informative_weights`); by default decided from ``table`` itself. It picks the default
        feature and refuses an explicit weight feature on uniform weights."""
        if _length(table) == 0:
            raise ValueError(f"cannot fit the {self.method} binarizer on an empty score table")
        if weights_informative is None:
            weights_informative = informative_weights(table)
        self.weights_informative = weights_informative
        if self.requested_feature is None:
            self._set_feature(default_feature(self.method, weights_informative))
        elif self.requested_feature in WEIGHT_FEATURES and weights_informative is False:
            raise uniform_weight_error(self.requested_feature, f" ({self.method})")
        if self.feature == "step_z":
            self.step_stats = step_stats if step_stats is not None else StepStats.from_table(table)
        values = self.feature_values(table)
        self._fit_values(values)
        self.n_fit = int(len(values))
        self.fitted = True
        return self

    def _set_feature(self, feature: str) -> None:
        self.feature = feature

    def keep(self, table: Any) -> np.ndarray:
        if not self.fitted:
            raise ValueError(f"the {self.method} binarizer is not fitted: call fit() on a sample first")
        if _length(table) == 0:
            return np.zeros(0, dtype=bool)
        return self.keep_values(self.feature_values(table))

    def keep_values(self, values: np.ndarray) -> np.ndarray:
        values = np.asarray(values, dtype=np.float64)
        _check_finite(values, f"{self.feature} feature")
        return values > self.boundary

    # subclasses fill these
    boundary: float = math.nan

    def _fit_values(self, values: np.ndarray) -> None:
        raise NotImplementedError

    def params(self) -> dict:
        """JSON-friendly description: method, feature, fitted parameters, boundary."""
        out = {"method": self.method, "feature": self.feature, "boundary": _plain(self.boundary), "n_fit": self.n_fit, "seed": self.seed,
               "feature_requested": self.requested_feature, "weights_informative": self.weights_informative}
        if self.step_stats is not None:
            out["step_stats"] = self.step_stats.summary()
        return out


def _require_two_values(values: np.ndarray, method: str) -> None:
    _check_finite(values, "feature")
    if len(values) < 2 or np.unique(values).size < 2:
        raise ValueError(f"{method} needs at least 2 distinct values to split in two; the fit sample has {len(values)} rows and "
                         f"{np.unique(values).size} distinct value(s). Use method 'threshold' or a larger sample")


class ThresholdBinarizer(Binarizer):
    """Keep rows whose feature is above a fixed cut (default: above uniform weight)."""

    method = "threshold"

    def __init__(self, feature: str | None = None, cut: float | None = None, seed: int = 0):
        super().__init__(feature, seed)
        if cut is None:
            if self.feature not in DEFAULT_CUT:
                raise ValueError(f"threshold on feature {self.feature!r} needs an explicit cut (defaults exist for {list(DEFAULT_CUT)})")
        elif not math.isfinite(cut):
            raise ValueError(f"threshold cut must be a finite number, got {cut!r}")
        self.cut = cut  # None: the feature's default cut
        self.boundary = float(DEFAULT_CUT[self.feature] if cut is None else cut)

    def _set_feature(self, feature: str) -> None:
        super()._set_feature(feature)
        if self.cut is None:  # the default cut goes with the feature (B*w > 1, step_z > 0)
            self.boundary = float(DEFAULT_CUT[feature])

    def _fit_values(self, values: np.ndarray) -> None:
        _check_finite(values, "feature")  # nothing to learn; validate the input only


class KMeansBinarizer(Binarizer):
    """1-D k-means with 2 clusters; keep the upper cluster (boundary = midpoint of centres)."""

    method = "kmeans"

    def __init__(self, feature: str | None = None, seed: int = 0, n_init: int = 4, max_fit_rows: int = 200_000):
        super().__init__(feature, seed)
        self.n_init, self.max_fit_rows = n_init, max_fit_rows
        self.centers = np.full(2, np.nan)

    def _fit_values(self, values: np.ndarray) -> None:
        from sklearn.cluster import KMeans

        values = _subsample(values, self.max_fit_rows, self.seed)
        _require_two_values(values, self.method)
        model = KMeans(n_clusters=2, n_init=self.n_init, random_state=self.seed).fit(values.reshape(-1, 1))
        self.centers = np.sort(model.cluster_centers_.ravel())
        self.boundary = float(self.centers.mean())

    def params(self) -> dict:
        return {**super().params(), "centers": _plain(self.centers)}


class GMMBinarizer(Binarizer):
    """2-component 1-D Gaussian mixture; keep the component with the higher mean.

    The paper's rule is "posterior of the higher component > 0.5". Between the two means
    that is ``x > boundary`` where the posteriors cross; outside them we keep the rule
    monotone (everything above the high mean kept, below the low mean dropped), because a
    wider low component would otherwise reclaim the very best scores in the far tail.
    """

    method = "gmm"

    def __init__(self, feature: str | None = None, seed: int = 0, n_init: int = 2, max_fit_rows: int = 200_000):
        super().__init__(feature, seed)
        self.n_init, self.max_fit_rows = n_init, max_fit_rows
        self.means = self.variances = self.weights = np.full(2, np.nan)
        self.bic_1 = self.bic_2 = math.nan

    def _fit_values(self, values: np.ndarray) -> None:
        from sklearn.mixture import GaussianMixture

        values = _subsample(values, self.max_fit_rows, self.seed)
        _require_two_values(values, self.method)
        x = values.reshape(-1, 1)
        two = GaussianMixture(2, n_init=self.n_init, random_state=self.seed, reg_covar=1e-6 * float(np.var(values)) + 1e-12).fit(x)
        order = np.argsort(two.means_.ravel())
        self.means = two.means_.ravel()[order]
        self.variances = two.covariances_.reshape(-1)[order]
        self.weights = two.weights_[order]
        # how much better two components explain the sample than one (for the summary)
        self.bic_2 = float(two.bic(x))
        self.bic_1 = float(GaussianMixture(1, random_state=self.seed).fit(x).bic(x))
        self.boundary = _posterior_crossing(self.means, self.variances, self.weights)

    def posterior_high(self, values: np.ndarray) -> np.ndarray:
        """Posterior probability of the higher-mean component for each value."""
        values = np.asarray(values, dtype=np.float64)
        log_p = [np.log(w) - 0.5 * np.log(2 * np.pi * v) - (values - m) ** 2 / (2 * v)
                 for m, v, w in zip(self.means, self.variances, self.weights)]
        return 1.0 / (1.0 + np.exp(np.clip(log_p[0] - log_p[1], -700, 700)))

    def params(self) -> dict:
        return {**super().params(), "means": _plain(self.means), "variances": _plain(self.variances), "weights": _plain(self.weights),
                "bic_1_component": _plain(self.bic_1), "bic_2_components": _plain(self.bic_2)}


def _posterior_crossing(means: np.ndarray, variances: np.ndarray, weights: np.ndarray) -> float:
    """Where log(w_h N(x; m_h, v_h)) - log(w_l N(x; m_l, v_l)) = 0 between the means.

    That difference is a quadratic a x^2 + b x + c. If it does not change sign between the
    means, one component wins the whole interval and the boundary is the other mean.
    """
    (m_l, m_h), (v_l, v_h), (w_l, w_h) = means, variances, weights
    a = 1 / (2 * v_l) - 1 / (2 * v_h)
    b = m_h / v_h - m_l / v_l
    c = m_l**2 / (2 * v_l) - m_h**2 / (2 * v_h) + math.log(w_h / w_l) - 0.5 * math.log(v_h / v_l)
    coefficients = [b, c] if abs(a) < 1e-12 * max(abs(b), 1e-300) else [a, b, c]
    roots = [r.real for r in np.roots(coefficients) if abs(r.imag) < 1e-9 and m_l <= r.real <= m_h]
    if roots:
        return float(max(roots))
    high_wins = a * m_l**2 + b * m_l + c > 0
    return float(m_l if high_wins else m_h)


def _subsample(values: np.ndarray, limit: int, seed: int) -> np.ndarray:
    if len(values) <= limit:
        return values
    return np.random.default_rng(seed).choice(values, size=limit, replace=False)


def _plain(value: Any) -> Any:
    """numpy -> JSON-friendly python (NaN -> None)."""
    if isinstance(value, np.ndarray):
        return [_plain(v) for v in value.tolist()]
    if isinstance(value, (float, np.floating)):
        return None if not math.isfinite(float(value)) else float(value)
    return value


_BINARIZERS = {"threshold": ThresholdBinarizer, "kmeans": KMeansBinarizer, "gmm": GMMBinarizer}


def make_binarizer(method: str, feature: str | None = None, **params: Any) -> Binarizer:
    """``threshold`` | ``kmeans`` | ``gmm`` with ``feature`` (default per method, see module doc).

    Extra parameters: ``cut`` (threshold), ``seed``, ``n_init``, ``max_fit_rows`` (kmeans, gmm).
    """
    if method not in _BINARIZERS:
        raise ValueError(f"unknown binarizer {method!r}; choose one of {list(METHODS)}")
    try:
        return _BINARIZERS[method](feature=feature, **params)
    except TypeError as exc:
        raise ValueError(f"bad parameters {params} for binarizer {method!r}: {exc}") from exc

