"""Stage 2's per-row and per-uid logic, written once: plain numpy/pandas, no Ray.

The mimic filter runs in three rounds, whatever moves the rows (the executors of
:mod:`raymimic.select.executors`: in this process, Ray Data, Ray tasks over score files):

1. :func:`block_summary` of every block of rows: per-step partial statistics, the NaN count, the
   range of ``B*w`` and a Bernoulli fit sample keyed by (uid, step). The filter combines them and
   fits its binarizers on the sample.
2. :func:`row_values` of every row: the aggregated-score feature, ``B*w``, the raw score, one keep
   vote per method and (for the reference lift) each score column's per-step z-score.
3. :func:`reduce_groups` of every uid's rows (observations, distinct steps, vote sums and
   NaN-skipping means), then :func:`apply_vote` (the vote rule per uid).

Uids are grouped by :func:`uid_groups` (two uint64 words per uid, from the arrow buffers) or
by :func:`string_groups` (any string uid): both number the uids in order of first appearance and
feed the same :func:`reduce_groups`.
"""
from __future__ import annotations

import numpy as np
import pandas as pd
import pyarrow as pa

from raymimic.data.uids import GOLDEN_GAMMA, arrow_uid_pairs, keyed_uniform
from raymimic.score_table import COLUMNS as SCORE_COLUMNS
from raymimic.select.binarize import StepStats, compute_feature, weight_range
from raymimic.select.ensemble import vote_from_counts
from raymimic.select.quality import LIFT_VALUE_PREFIX

ROW_MEANS = {"mimic_score": "mimic_score", "mean_norm_weight": "norm_weight", "mean_raw_score": "raw_score"}
"""Per-uid mean columns and the row column each averages (NaN-skipping)."""


def lift_value_column(column: str) -> str:
    """The per-uid column holding ``column``'s mean step_z (``score_zero`` -> ``step_z_score_zero``)."""
    return LIFT_VALUE_PREFIX + column


# ------------------------------------------------------------------ round 1: summary
def with_score(batch: pd.DataFrame, score_column: str) -> pd.DataFrame:
    """``batch`` with ``score_column`` in the role of the raw score (the ``score`` column every feature reads)."""
    if score_column == "score":
        return batch
    return batch.assign(score=batch[score_column].to_numpy(np.float64))


def finite_rows(batch: pd.DataFrame) -> np.ndarray:
    """Rows whose score and weight are both finite (the rows that vote)."""
    return np.isfinite(batch["score"].to_numpy(np.float64)) & np.isfinite(batch["weight"].to_numpy(np.float64))


def lift_partials(batch: pd.DataFrame, finite: np.ndarray, columns) -> dict:
    """Per-step partials of each score column over the usable rows (``finite``) where that column has a value."""
    out = {}
    steps = batch["step"].to_numpy(np.int64)[finite]
    for column in columns:
        values = batch[column].to_numpy(np.float64)[finite]
        ok = np.isfinite(values)
        if ok.any():
            out[column] = StepStats.partials(pd.DataFrame({"step": steps[ok], "score": values[ok]}))
    return out


def fit_sample_rows(rows: pd.DataFrame, sample_prob: float, seed: int) -> np.ndarray:
    """The rows of the binarizers' fit sample: a Bernoulli draw keyed by each row's (uid, step) and the seed.

    Keyed by the row, not drawn per block, so that the sample (and so every decision) is the same
    whichever files, Ray Data blocks or tasks the rows arrive in.
    """
    if sample_prob >= 1 or not len(rows):
        return np.full(len(rows), sample_prob >= 1)
    hi, lo = arrow_uid_pairs(pa.array(rows["uid"].array, pa.string()))
    return keyed_uniform(seed, hi, lo, rows["step"].to_numpy(np.int64)) < sample_prob


def block_summary(batch: pd.DataFrame, sample_prob: float, seed: int, score_column: str = "score", lift_columns=()) -> dict:
    """Round 1 on one block: per-step partials, NaN count, the range of B*w and a reproducible Bernoulli sample."""
    original, batch = batch, with_score(batch, score_column)
    sizes = batch["batch_size"].to_numpy()
    if (sizes <= 0).any():
        bad = sizes <= 0
        raise ValueError(f"{int(bad.sum())} rows have batch_size <= 0 (first {sizes[bad][0]} at uid {batch['uid'][bad].iloc[0]!r}); "
                         "batch_size is the global batch's sample count, a positive integer")
    finite = finite_rows(batch)
    good = batch[finite]
    sample = good[fit_sample_rows(good, sample_prob, seed)]
    first_bad = batch["uid"][~finite].iloc[0] if (~finite).any() else None
    return {"partials": StepStats.partials(good) if len(good) else None, "n": len(batch), "n_nan": int((~finite).sum()),
            "first_nan_uid": first_bad, "sample": sample[[c for c in batch.columns if c in SCORE_COLUMNS]],
            "weights": weight_range(good) if len(good) else None,
            "lift_partials": lift_partials(original, finite, lift_columns) if lift_columns else {}}


# ------------------------------------------------------------------ round 2: row votes
def lift_z(stats: StepStats, steps: np.ndarray, values: np.ndarray) -> np.ndarray:
    """Per-step standardised ``values``; NaN where a value is missing or its step has no statistics for this column."""
    out = np.full(len(values), np.nan)
    index = np.clip(np.searchsorted(stats.steps, steps), 0, len(stats.steps) - 1)
    ok = np.isfinite(values) & (stats.steps[index] == steps)
    out[ok] = (values[ok] - stats.mean[index[ok]]) / stats.std[index[ok]]
    return out


def row_values(batch: pd.DataFrame, finite: np.ndarray | None, binarizers: dict, stats: StepStats | None, score_feature: str,
               score_column: str = "score", lift_stats: dict | None = None) -> dict[str, np.ndarray]:
    """Round 2 on one block: the ``finite`` rows' (None: every row's) step, aggregated-score feature, B*w, raw score, keep
    votes and lift z-scores."""
    original, batch = batch, with_score(batch, score_column)
    if finite is not None:
        batch = batch[finite]
    steps = batch["step"].to_numpy(np.int64)
    out = {"step": steps, "mimic_score": compute_feature(batch, score_feature, stats),
           "norm_weight": batch["weight"].to_numpy(np.float64) * batch["batch_size"].to_numpy(np.float64),
           "raw_score": batch["score"].to_numpy(np.float64)}
    for name, binarizer in binarizers.items():
        out[f"votes_{name}"] = binarizer.keep(batch).astype(np.int64)
    for column, column_stats in (lift_stats or {}).items():
        values = original[column].to_numpy(np.float64)
        out[lift_value_column(column)] = lift_z(column_stats, steps, values if finite is None else values[finite])
    return out


def row_votes(batch: pd.DataFrame, **kwargs) -> pd.DataFrame:
    """:func:`row_values` of a block's finite rows as a frame that keeps the (string) uid first."""
    finite = finite_rows(with_score(batch, kwargs.get("score_column", "score")))
    out = pd.DataFrame({"uid": batch["uid"].to_numpy()[finite]})
    for name, values in row_values(batch, finite, **kwargs).items():
        out[name] = values
    return out


# ------------------------------------------------------------------ round 3: per uid
def uid_groups(hi: np.ndarray, lo: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Each row's uid group (numbered in order of first appearance) and each group's first row, for uids as two words.

    A hash table on one 64-bit key is several times faster than sorting 128-bit keys; the check
    against the first row of every group keeps it exact, and a collision falls back to sorting.
    """
    codes, _ = pd.factorize(hi ^ (lo * GOLDEN_GAMMA))  # one 64-bit key (an odd multiplier), checked exactly below
    first = first_rows(codes)
    if (hi[first][codes] == hi).all() and (lo[first][codes] == lo).all():
        return codes, first
    order = np.lexsort((lo, hi))
    new = np.ones(len(hi), bool)
    new[1:] = (hi[order][1:] != hi[order][:-1]) | (lo[order][1:] != lo[order][:-1])
    starts = np.flatnonzero(new)
    group_first = np.minimum.reduceat(order, starts)  # each sorted group's first row
    rank = np.empty(len(starts), np.int64)
    rank[np.argsort(group_first)] = np.arange(len(starts))
    codes = np.empty(len(hi), np.int64)
    codes[order] = rank[np.cumsum(new) - 1]
    return codes, np.sort(group_first)


def first_rows(codes: np.ndarray) -> np.ndarray:
    """The first row of each group, for codes numbered in order of first appearance."""
    seen = np.maximum.accumulate(np.concatenate([[-1], codes[:-1]])) if len(codes) else codes
    return np.flatnonzero(codes > seen)


def string_groups(uids) -> tuple[np.ndarray, np.ndarray]:
    """Each row's uid group (in order of first appearance) and the distinct uids, for uids as strings."""
    codes, uniques = pd.factorize(np.asarray(uids, dtype=object) if not isinstance(uids, pd.Series) else uids)
    return codes, np.asarray(uniques, dtype=object)


def distinct_steps(codes: np.ndarray, steps: np.ndarray, n_groups: int) -> np.ndarray:
    """Distinct steps per group: a hash of (group, step) when that key fits in 63 bits, else a sort."""
    if not len(codes):
        return np.zeros(n_groups, np.int64)
    low = int(steps.min())
    span = int(steps.max()) - low + 1
    if n_groups * span < 2**62:
        keys = pd.unique(codes.astype(np.int64) * span + (steps - low))
        return np.bincount(keys // span, minlength=n_groups)
    pairs = np.unique(np.stack([codes.astype(np.int64), steps.astype(np.int64)]), axis=1)
    return np.bincount(pairs[0], minlength=n_groups)


def reduce_groups(codes: np.ndarray, n_groups: int, rows: dict[str, np.ndarray], methods: list[str]) -> pd.DataFrame:
    """Per-uid observations, distinct steps, NaN-skipping means, vote sums and lift means of rows grouped by ``codes``."""

    def group_sum(values: np.ndarray) -> np.ndarray:
        return np.bincount(codes, weights=values, minlength=n_groups)

    def mean(values: np.ndarray) -> np.ndarray:  # NaN-skipping, as pandas' groupby mean
        ok = ~np.isnan(values)
        count, total = group_sum(ok.astype(np.float64)), group_sum(np.where(ok, values, 0.0))
        with np.errstate(invalid="ignore", divide="ignore"):
            return np.where(count > 0, total / np.maximum(count, 1), np.nan)

    frame = pd.DataFrame({"n_obs": np.bincount(codes, minlength=n_groups), "n_steps": distinct_steps(codes, rows["step"], n_groups)})
    for name, source in ROW_MEANS.items():
        frame[name] = mean(rows[source])
    for m in methods:
        frame[f"votes_{m}"] = np.rint(group_sum(rows[f"votes_{m}"])).astype(np.int64)
    for name in sorted(k for k in rows if k.startswith(LIFT_VALUE_PREFIX)):
        frame[name] = mean(rows[name])
    return frame


def per_uid(rows: pd.DataFrame, methods: list[str]) -> pd.DataFrame:
    """:func:`reduce_groups` of row votes with string uids (a hash partition or a whole local table); ``uid`` first."""
    codes, uniques = string_groups(rows["uid"])
    frame = reduce_groups(codes, len(uniques), {c: rows[c].to_numpy() for c in rows.columns if c != "uid"}, methods)
    frame.insert(0, "uid", uniques)
    return frame


def per_uid_words(rows: dict[str, np.ndarray], methods: list[str]) -> tuple[pd.DataFrame, np.ndarray, np.ndarray]:
    """:func:`reduce_groups` of row values whose uids are the words ``hi, lo``; the frame and each uid's words."""
    codes, first = uid_groups(rows["hi"], rows["lo"])
    return reduce_groups(codes, len(first), rows, methods), rows["hi"][first], rows["lo"][first]


def apply_vote(batch: pd.DataFrame, methods: list[str], rule, threshold: float | None) -> pd.DataFrame:
    """The vote rule on per-uid counts: ``keep_<method>`` per method and ``mimic_keep`` (all methods, or the rank cut)."""
    n_obs = batch["n_obs"].to_numpy(np.int64)
    total = np.zeros(len(batch), dtype=np.int64)
    for name in methods:
        votes = batch[f"votes_{name}"].to_numpy(np.int64)
        batch[f"keep_{name}"] = vote_from_counts(votes, n_obs, rule)
        total += votes
    if threshold is not None:  # top-fraction: rank the aggregated score
        batch["mimic_keep"] = batch["mimic_score"].to_numpy(np.float64) > threshold
    else:
        batch["mimic_keep"] = vote_from_counts(total, n_obs * len(methods), rule)
    return batch


def totals(frame: pd.DataFrame) -> dict:
    """Uid, observation and distinct-step counts of per-uid rows (summed over parts, they give the duplicate count)."""
    return {"n_uids": len(frame), "n_obs": int(frame["n_obs"].sum()), "n_steps": int(frame["n_steps"].sum())}


def sampled(uids: pd.Series, fraction: float, seed: int) -> np.ndarray:
    """A reproducible Bernoulli sample of uids (by a keyed hash of the uid: the same whatever the blocks)."""
    if fraction >= 1:
        return np.ones(len(uids), dtype=bool)
    hashed = pd.util.hash_pandas_object(uids.astype(str), index=False, hash_key=f"{seed % 10**16:016d}").to_numpy(np.uint64)
    return (hashed >> np.uint64(11)).astype(np.float64) / float(1 << 53) < fraction


def sampled_rows(batch: pd.DataFrame, fraction: float, seed: int) -> pd.DataFrame:
    """The rows of ``batch`` whose uid is in the :func:`sampled` sample."""
    return batch[sampled(batch["uid"], fraction, seed)]
