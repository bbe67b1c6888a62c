"""The mimic-score filter on Ray Data: score tables in, per-uid keep decisions out.

Passes over the score table (all streaming, no full column on the driver):

1. one ``map_batches`` pass returns, per block, the per-step partial statistics
   (count, mean, M2 of the raw score), the count of NaN rows and a Bernoulli sample of
   rows (``fit_sample`` rows expected in total);
2. the binarizers are fitted on that sample on the driver (the per-step statistics come
   from the whole table);
3. a second ``map_batches`` pass computes every row's feature and keep votes; a hash
   repartition on ``uid`` puts all rows of a uid in one block, where pandas sums the votes
   (plus the mean score and the number of distinct steps); a last ``map_batches`` applies
   the vote rule.

Every row of the score table is one observation of a sample in one epoch (Stage 1 writes
one row per (uid, step); a uid is seen once per epoch unless the pool repeats it), and each
observation casts one vote per method. Bad input is handled explicitly:

- missing columns: ``ValueError`` listing them;
- NaN/inf score or weight: ``nan="drop"`` (default) drops those rows, counts them in
  :attr:`MimicFilter.stats` and warns; ``nan="error"`` raises;
- duplicate (uid, step) rows: ``duplicates="error"`` (default) raises with the count;
  ``duplicates="count"`` lets each row vote and reports the count;
- uids of the filtered dataset without any score (``annotate``): ``missing="drop"``
  (default: no evidence, not kept), ``"keep"`` or ``"error"``; counted either way.
"""
from __future__ import annotations

import logging
import pickle
import zlib
from typing import Any

import numpy as np
import pandas as pd

from raymimic.score_table import COLUMNS as SCORE_COLUMNS
from raymimic.score_table import STAGE2_COLUMNS, check_schema, read_score_dataset
from raymimic.select.binarize import Binarizer, StepStats, compute_feature, make_binarizer
from raymimic.select.ensemble import check_rule, vote_from_counts
from raymimic.select.quantile import approximate_quantiles
from raymimic.select.stages import FilterStage, drop_unkept

log = logging.getLogger(__name__)

MIMIC_METHODS = ("gmm", "kmeans", "threshold", "ensemble", "top-fraction")
ENSEMBLE_METHODS = ("gmm", "kmeans", "threshold")


def _finite_rows(batch: pd.DataFrame) -> np.ndarray:
    return np.isfinite(batch["score"].to_numpy(np.float64)) & np.isfinite(batch["weight"].to_numpy(np.float64))


def _block_summary(batch: pd.DataFrame, sample_prob: float, seed: int) -> dict:
    """Pass 1 (per block): per-step partials, NaN count and a reproducible Bernoulli sample."""
    finite = _finite_rows(batch)
    good = batch[finite]
    key = f"{batch['uid'].iloc[0]}:{batch['step'].iloc[0]}" if len(batch) else ""
    rng = np.random.default_rng([seed, zlib.crc32(key.encode())])
    sample = good[rng.random(len(good)) < sample_prob]
    first_bad = batch["uid"][~finite].iloc[0] if (~finite).any() else None
    return {"partials": StepStats.partials(good) if len(good) else None, "n": len(batch), "n_nan": int((~finite).sum()),
            "first_nan_uid": first_bad, "sample": sample[[c for c in batch.columns if c in SCORE_COLUMNS]]}


def _summarize_block(batch: pd.DataFrame, sample_prob: float, seed: int) -> dict:
    """:func:`_block_summary` of one Ray Data block, pickled into one row."""
    return {"blob": np.array([pickle.dumps(_block_summary(batch, sample_prob, seed))], dtype=object)}


def _row_votes(batch: pd.DataFrame, binarizers: dict, stats: StepStats | None, score_feature: str) -> pd.DataFrame:
    """Pass 3 (per block): every finite row's aggregated-score feature and keep votes."""
    batch = batch[_finite_rows(batch)]
    out = pd.DataFrame({"uid": batch["uid"].to_numpy(), "step": batch["step"].to_numpy(np.int64)})
    out["mimic_score"] = compute_feature(batch, score_feature, stats)
    out["norm_weight"] = batch["weight"].to_numpy(np.float64) * batch["batch_size"].to_numpy(np.float64)
    out["raw_score"] = batch["score"].to_numpy(np.float64)
    for name, binarizer in binarizers.items():
        out[f"votes_{name}"] = binarizer.keep(batch).astype(np.int64)
    return out


def _per_uid(block: pd.DataFrame, methods: list[str]) -> pd.DataFrame:
    """Per-uid sums of one hash partition (all rows of a uid are in the same block), or of a whole local table."""
    named = {"n_obs": ("step", "size"), "n_steps": ("step", "nunique"), "mimic_score": ("mimic_score", "mean"),
             "mean_norm_weight": ("norm_weight", "mean"), "mean_raw_score": ("raw_score", "mean")}
    named.update({f"votes_{m}": (f"votes_{m}", "sum") for m in methods})
    return block.groupby("uid", sort=False).agg(**named).reset_index()


def _block_totals(block: pd.DataFrame) -> pd.DataFrame:
    return pd.DataFrame({"n_uids": [len(block)], "n_obs": [int(block["n_obs"].sum())], "n_steps": [int(block["n_steps"].sum())]})


def _apply_vote(batch: pd.DataFrame, methods: list[str], rule, threshold: float | None) -> pd.DataFrame:
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


class MimicFilter(FilterStage):
    """Fit binarizers on a sample of the score table, vote per uid, keep the winners.

    ``scores``: a score-table URI (``RUN/scores``) or a Dataset with the score-table columns;
    or a pandas DataFrame of score rows, filtered in this process without Ray (small tables,
    e.g. the label-noise simulation): the same fit, votes and rule, ``decisions`` is then a
    DataFrame and ``top-fraction`` cuts at the exact quantile instead of the histogram one.
    ``method``: ``gmm`` | ``kmeans`` | ``threshold`` | ``ensemble`` (all three, voted) |
    ``top-fraction`` (keep the ``fraction`` of uids with the highest mean ``score_feature``).
    ``feature``: the binarizers' feature (default per method, see
    :mod:`raymimic.select.binarize`); ``score_feature`` (default ``step_z``) is averaged per
    uid into ``mimic_score``, the aggregated score used for ranking and in decisions.parquet.
    ``unfit``: a binarizer that cannot be fitted (e.g. fewer than 2 distinct values) raises
    (``"error"``, default) or is left out of the vote with its message in ``stats["unfit"]``
    (``"skip"``; ``methods`` then lists the binarizers that voted).
    """

    name = "mimic"

    def __init__(self, scores, method: str = "gmm", fraction: float = 0.3, feature: str | None = None, score_feature: str = "step_z",
                 rule: str | float = "majority", fit_sample: int = 100_000, seed: int = 0, nan: str = "drop", duplicates: str = "error",
                 missing: str = "drop", methods: list[str] | None = None, num_partitions: int | None = None, drop: bool = True,
                 unfit: str = "error"):
        super().__init__(drop)
        if method not in MIMIC_METHODS:
            raise ValueError(f"unknown mimic method {method!r}; choose one of {list(MIMIC_METHODS)}")
        choices = ((nan, ("drop", "error"), "nan"), (duplicates, ("error", "count"), "duplicates"),
                   (missing, ("drop", "keep", "error"), "missing"), (unfit, ("error", "skip"), "unfit"))
        for value, allowed, what in choices:
            if value not in allowed:
                raise ValueError(f"{what}={value!r} is not valid; use one of {list(allowed)}")
        if method == "top-fraction" and not 0 < fraction <= 1:
            raise ValueError(f"fraction must be in (0, 1] for top-fraction, got {fraction}")
        if fit_sample < 2:
            raise ValueError(f"fit_sample must be at least 2 rows, got {fit_sample}")
        self.scores, self.method, self.fraction = scores, method, fraction
        self.feature, self.score_feature, self.rule = feature, score_feature, check_rule(rule)
        self.fit_sample, self.seed, self.nan, self.duplicates, self.missing = fit_sample, seed, nan, duplicates, missing
        self.num_partitions, self.unfit = num_partitions, unfit
        if method == "ensemble":
            self.methods = list(methods or ENSEMBLE_METHODS)
        elif method == "top-fraction":
            self.methods = []
        else:
            self.methods = [method]
        self.binarizers: dict[str, Binarizer] = {}
        self.step_stats: StepStats | None = None
        self.sample: pd.DataFrame | None = None
        self.threshold: float | None = None
        self.decisions = None
        self.stats: dict[str, Any] = {}

    # ----------------------------------------------------------------- fitting
    def _score_dataset(self):
        if isinstance(self.scores, str):  # checks every file's columns, naming the file
            return read_score_dataset(self.scores, required=STAGE2_COLUMNS)
        check_schema(self.scores.schema(), "score dataset", required=STAGE2_COLUMNS)
        return self.scores

    def _sample_prob(self, n_rows: int) -> float:
        return min(1.0, self.fit_sample / max(n_rows, 1))

    def _summarize(self, ds, n_rows: int) -> None:
        fn_kwargs = {"sample_prob": self._sample_prob(n_rows), "seed": self.seed}
        blobs = ds.map_batches(_summarize_block, fn_kwargs=fn_kwargs, batch_format="pandas", batch_size=None)
        summaries = [pickle.loads(blob) for batch in blobs.iter_batches(batch_format="numpy", batch_size=None) for blob in batch["blob"]]
        self._absorb(summaries, n_rows)

    def _absorb(self, summaries: list[dict], n_rows: int) -> None:
        """Combine the blocks' summaries: NaN rows, per-step statistics of the whole table, the fit sample."""
        partials = [s["partials"] for s in summaries if s["partials"] is not None]
        n_nan = sum(s["n_nan"] for s in summaries)
        first_nan = next((s["first_nan_uid"] for s in summaries if s["first_nan_uid"]), None)
        self.stats.update(n_rows=n_rows, n_nan_rows=n_nan)
        if n_nan:
            message = f"{n_nan} of {n_rows} score rows have a NaN or infinite score/weight (first at uid {first_nan!r})"
            if self.nan == "error":
                raise ValueError(message + "; pass nan='drop' (--nan drop) to drop and count them")
            log.warning("%s; they are dropped and counted in summary.json", message)
        if not partials:
            raise ValueError(f"the score table has no usable row ({n_rows} rows, {n_nan} with NaN)")
        self.step_stats = StepStats.from_partials(pd.concat(partials, ignore_index=True))
        self.sample = pd.concat([s["sample"] for s in summaries], ignore_index=True)

    def _fit_binarizers(self) -> None:
        if len(self.sample) < 2:
            raise ValueError(f"the fit sample has {len(self.sample)} row(s); raise fit_sample")
        fitted = {}
        for m in self.methods:
            try:
                fitted[m] = make_binarizer(m, self.feature, seed=self.seed).fit(self.sample, step_stats=self.step_stats)
            except ValueError as err:
                if self.unfit == "error":
                    raise
                self.stats.setdefault("unfit", {})[m] = str(err)
                log.warning("binarizer %s left out of the vote: %s", m, err)
        if self.methods and not fitted:
            raise ValueError(f"no binarizer could be fitted: {self.stats['unfit']}")
        self.binarizers, self.methods = fitted, list(fitted)

    def fit(self, ds=None) -> "MimicFilter":
        """Fit on the score table (``ds``, the dataset to filter later, is not needed here)."""
        if isinstance(self.scores, pd.DataFrame):
            return self._fit_local(self.scores)
        scores = self._score_dataset()
        n_rows = scores.count()
        if n_rows == 0:
            raise ValueError("the score table is empty: nothing to filter")
        self._summarize(scores, n_rows)
        self._fit_binarizers()
        self.decisions = self._decide(scores, n_rows)
        self.fitted = True
        return self

    def _fit_local(self, table: pd.DataFrame) -> "MimicFilter":
        """:meth:`fit` on an in-memory table: the same block functions, run once on the whole table."""
        check_schema(list(table.columns), "score table", required=STAGE2_COLUMNS)
        if len(table) == 0:
            raise ValueError("the score table is empty: nothing to filter")
        self._absorb([_block_summary(table, self._sample_prob(len(table)), self.seed)], len(table))
        self._fit_binarizers()
        per_uid = _per_uid(_row_votes(table, self.binarizers, self.step_stats, self.score_feature), self.methods)
        self._count(len(per_uid), int(per_uid["n_obs"].sum()), int(per_uid["n_steps"].sum()))
        if self.method == "top-fraction":
            self.threshold = float(np.quantile(per_uid["mimic_score"].to_numpy(np.float64), 1 - self.fraction))
        self.decisions = _apply_vote(per_uid, self.methods, self.rule, self.threshold).sort_values("uid", ignore_index=True)
        self.fitted = True
        return self

    def _decide(self, scores, n_rows: int):
        fn_kwargs = {"binarizers": self.binarizers, "stats": self.step_stats, "score_feature": self.score_feature}
        rows = scores.map_batches(_row_votes, fn_kwargs=fn_kwargs, batch_format="pandas")
        # hash-partition on uid (every row of a uid lands in one block), then aggregate each
        # block with pandas: much faster than generic per-row aggregators, and exact
        partitions = self.num_partitions or int(np.clip(n_rows // 125_000, 2, 256))
        per_uid = rows.repartition(partitions, keys=["uid"]).map_batches(
            _per_uid, fn_kwargs={"methods": self.methods}, batch_format="pandas", batch_size=None).materialize()
        # block totals summed on the driver: a tiny map, cheaper than a global aggregate
        totals = per_uid.map_batches(_block_totals, batch_format="pandas", batch_size=None).to_pandas().sum()
        self._count(int(totals["n_uids"]), int(totals["n_obs"]), int(totals["n_steps"]))
        if self.method == "top-fraction":
            self.threshold = float(approximate_quantiles(per_uid, "mimic_score", [1 - self.fraction])[0])
        out = per_uid.map_batches(_apply_vote, fn_kwargs={"methods": self.methods, "rule": self.rule, "threshold": self.threshold},
                                  batch_format="pandas")
        return out.materialize()

    def _count(self, n_uids: int, n_obs: int, n_steps: int) -> None:
        """Record the uid count; duplicate (uid, step) rows raise or are counted (``duplicates``)."""
        self.stats["n_uids"] = n_uids
        self.stats["n_duplicate_rows"] = n_obs - n_steps
        if self.stats["n_duplicate_rows"]:
            message = (f"{self.stats['n_duplicate_rows']} score rows repeat a (uid, step) pair; "
                       "Stage 1 writes exactly one row per (uid, step)")
            if self.duplicates == "error":
                raise ValueError(message + " (a resumed run written twice?). "
                                 "Pass duplicates='count' (--duplicates count) to let each row vote")
            log.warning("%s; each row votes (duplicates='count')", message)

    # ----------------------------------------------------------------- applying
    def annotate(self, ds):
        """Join the per-uid decisions onto ``ds`` (which needs a ``uid`` column)."""
        if "uid" not in ds.schema().names:
            raise ValueError(f"the dataset to filter has no 'uid' column (columns: {ds.schema().names})")
        # per-method votes and the raw-score mean travel along: decisions.parquet and the
        # quality estimate need them whether or not a pool is joined
        wanted = ["uid", "mimic_score", "mean_norm_weight", "mean_raw_score", "n_obs", *[f"keep_{m}" for m in self.methods], "mimic_keep"]
        decisions = self.decisions
        if isinstance(decisions, pd.DataFrame):  # fitted locally: joined on Ray like the others
            import ray

            decisions = ray.data.from_pandas(decisions)
        have = set(decisions.schema().names)
        right = decisions.select_columns([c for c in wanted if c in have])
        joined = ds.join(right, join_type="left_outer", num_partitions=self.num_partitions or 4, on=("uid",))
        missing = self.missing

        def resolve(batch: pd.DataFrame) -> pd.DataFrame:
            unscored = batch["mimic_keep"].isna().to_numpy()
            if missing == "error" and unscored.any():
                raise ValueError(f"uid {batch['uid'][unscored].iloc[0]!r} (and {int(unscored.sum()) - 1} more in this block) has no mimic score; pass missing='drop' or 'keep'")
            batch["mimic_scored"] = (~unscored).astype(np.int64)
            batch["mimic_keep"] = np.where(unscored, missing == "keep", batch["mimic_keep"].fillna(False).to_numpy(dtype=bool))
            return batch

        return joined.map_batches(resolve, batch_format="pandas")

    def apply(self, ds=None):
        """With ``ds``: ``ds`` joined with the decisions (filtered when ``drop``); without: the decisions."""
        if not self.fitted:
            raise RuntimeError("MimicFilter is not fitted: call fit() first")
        if ds is None:
            if isinstance(self.decisions, pd.DataFrame):
                return self.decisions[self.decisions["mimic_keep"].to_numpy(bool)] if self.drop else self.decisions
            return drop_unkept(self.decisions, "mimic_keep") if self.drop else self.decisions
        return super().apply(ds)

    def params(self) -> dict:
        return {**super().params(), "method": self.method, "methods": self.methods, "feature": self.feature, "score_feature": self.score_feature,
                "rule": self.rule, "fraction": self.fraction if self.method == "top-fraction" else None, "threshold": self.threshold,
                "fit_sample": self.fit_sample, "seed": self.seed, "nan": self.nan, "duplicates": self.duplicates, "missing": self.missing,
                "binarizers": {m: b.params() for m, b in self.binarizers.items()}}
