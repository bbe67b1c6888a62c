"""The mimic-score filter on Ray: score tables in, per-uid keep decisions out.

A score-table URI (what ``raymimic filter`` passes) runs the streaming path of
:mod:`raymimic.select.stream`: plain Ray tasks over the files, uids as two uint64 words, a
partition per uid prefix, memory flat in rows (docs/scaling.md). A Dataset of score rows takes
the Ray Data path below; a pandas DataFrame runs in this process.

Passes of the Ray Data path (all streaming, no full column on the driver):

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

Score columns. ``score_column`` (default ``score``) names the column that plays the raw
score's role (``step_z``, the score features, ``mean_raw_score``): ``score`` or any optional
``score_<name>`` column of the table (a control direction or a baseline, higher = keep). The
``weight`` column belongs to the primary ``score`` only, so the weight features are refused for
any other column.

Reference lift. When the table has ``score_<name>`` columns (or with ``lift=True``), the same
passes also standardise every score column within its step (per-step statistics of the whole
table, each column's own) and average it per uid: decisions gain one ``step_z_<column>`` per
score column, and :meth:`MimicFilter.reference_lift` turns a seeded sample of them (at most
:data:`LIFT_MAX_UIDS` uids) into the metrics of :func:`raymimic.select.quality.lift_metrics`.
The per-uid aggregation is one pandas function (``_per_uid``) for the Ray path (per hash
partition) and the local path (the whole table).
"""
from __future__ import annotations

import logging
import pickle
import weakref
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa

from raymimic.data.uids import arrow_uid_pairs, keyed_uniform
from raymimic.score_table import COLUMNS as SCORE_COLUMNS
from raymimic.score_table import STAGE2_COLUMNS, check_schema, control_column, control_name, control_names, read_score_dataset
from raymimic.select.binarize import (
    PAPER_FEATURE,
    WEIGHT_FEATURES,
    Binarizer,
    StepStats,
    combine_weight_ranges,
    compute_feature,
    informative_weights,
    make_binarizer,
    uniform_weight_error,
    weight_range,
)
from raymimic.select.ensemble import check_rule, vote_from_counts
from raymimic.select.names import MIMIC_METHODS
from raymimic.select.quality import LIFT_VALUE_PREFIX, lift_metrics
from raymimic.select.quantile import approximate_quantiles
from raymimic.select.stages import FilterStage, drop_unkept

log = logging.getLogger(__name__)

ENSEMBLE_METHODS = ("gmm", "kmeans", "threshold")
LIFT_MAX_UIDS = 1_000_000
"""The reference-lift metrics are computed on the driver over a seeded sample of at most this many uids."""


def resolve_score_column(name: str) -> str:
    """``score``, a ``score_<name>`` column, or a bare control name (``zero`` -> ``score_zero``); ``ValueError`` for a bad name."""
    if name == "score" or control_name(name) is not None:
        return name
    try:
        return control_column(name)
    except ValueError:
        raise ValueError(f"score column {name!r} is not valid: give score, a score_<name> column or a bare control name "
                         "(lower-case letters, digits and '_', e.g. zero for score_zero)") from None


def score_columns(names) -> list[str]:
    """The score columns of a schema or column list: ``score`` (when present), then every ``score_<name>`` column."""
    names = list(names)
    return (["score"] if "score" in names else []) + [control_column(c) for c in control_names(names)]


def lift_value_column(column: str) -> str:
    """The per-uid column holding ``column``'s mean step_z (``score_zero`` -> ``step_z_score_zero``)."""
    return LIFT_VALUE_PREFIX + column


def _with_score(batch: pd.DataFrame, score_column: str) -> pd.DataFrame:
    """``batch`` with ``score_column`` in the role of the raw score (the ``score`` column every feature reads)."""
    if score_column == "score":
        return batch
    return batch.assign(score=batch[score_column].to_numpy(np.float64))


def _finite_rows(batch: pd.DataFrame) -> np.ndarray:
    return np.isfinite(batch["score"].to_numpy(np.float64)) & np.isfinite(batch["weight"].to_numpy(np.float64))


def _lift_partials(batch: pd.DataFrame, finite: np.ndarray, columns) -> dict:
    """Per-step partials of each score column over the usable rows (``finite``) where that column has a value."""
    out = {}
    steps = batch["step"].to_numpy(np.int64)[finite]
    for column in columns:
        values = batch[column].to_numpy(np.float64)[finite]
        ok = np.isfinite(values)
        if ok.any():
            out[column] = StepStats.partials(pd.DataFrame({"step": steps[ok], "score": values[ok]}))
    return out


def _fit_sample_rows(rows: pd.DataFrame, sample_prob: float, seed: int) -> np.ndarray:
    """The rows of the binarizers' fit sample: a Bernoulli draw keyed by each row's (uid, step) and the seed.

    Keyed by the row, not drawn per block, so that the sample (and so every decision) is the same
    whichever files, Ray Data blocks or tasks the rows arrive in.
    """
    if sample_prob >= 1 or not len(rows):
        return np.full(len(rows), sample_prob >= 1)
    hi, lo = arrow_uid_pairs(pa.array(rows["uid"].array, pa.string()))
    return keyed_uniform(seed, hi, lo, rows["step"].to_numpy(np.int64)) < sample_prob


def _block_summary(batch: pd.DataFrame, sample_prob: float, seed: int, score_column: str = "score", lift_columns=()) -> dict:
    """Pass 1 (per block): per-step partials, NaN count, the range of B*w and a reproducible Bernoulli sample."""
    original, batch = batch, _with_score(batch, score_column)
    finite = _finite_rows(batch)
    good = batch[finite]
    sample = good[_fit_sample_rows(good, sample_prob, seed)]
    first_bad = batch["uid"][~finite].iloc[0] if (~finite).any() else None
    return {"partials": StepStats.partials(good) if len(good) else None, "n": len(batch), "n_nan": int((~finite).sum()),
            "first_nan_uid": first_bad, "sample": sample[[c for c in batch.columns if c in SCORE_COLUMNS]],
            "weights": weight_range(good) if len(good) else None,
            "lift_partials": _lift_partials(original, finite, lift_columns) if lift_columns else {}}


def _summarize_block(batch: pd.DataFrame, sample_prob: float, seed: int, score_column: str = "score", lift_columns=()) -> dict:
    """:func:`_block_summary` of one Ray Data block, pickled into one row."""
    summary = _block_summary(batch, sample_prob, seed, score_column, lift_columns)
    return {"blob": np.array([pickle.dumps(summary)], dtype=object)}


def _lift_z(stats: StepStats, steps: np.ndarray, values: np.ndarray) -> np.ndarray:
    """Per-step standardised ``values``; NaN where a value is missing or its step has no statistics for this column."""
    out = np.full(len(values), np.nan)
    index = np.clip(np.searchsorted(stats.steps, steps), 0, len(stats.steps) - 1)
    ok = np.isfinite(values) & (stats.steps[index] == steps)
    out[ok] = (values[ok] - stats.mean[index[ok]]) / stats.std[index[ok]]
    return out


def _row_votes(batch: pd.DataFrame, binarizers: dict, stats: StepStats | None, score_feature: str, score_column: str = "score",
               lift_stats: dict | None = None) -> pd.DataFrame:
    """Pass 3 (per block): every finite row's aggregated-score feature, keep votes and (for the lift) each score column's step_z."""
    finite = _finite_rows(_with_score(batch, score_column))
    out = pd.DataFrame({"uid": batch["uid"].to_numpy()[finite]})
    for name, values in _row_values(batch, finite, binarizers, stats, score_feature, score_column, lift_stats).items():
        out[name] = values
    return out


def _row_values(batch: pd.DataFrame, finite: np.ndarray, binarizers: dict, stats: StepStats | None, score_feature: str,
                score_column: str = "score", lift_stats: dict | None = None) -> dict[str, np.ndarray]:
    """:func:`_row_votes` without the uid, as numpy columns of the ``finite`` rows (the streaming path keeps uids as integers)."""
    original, batch = batch, _with_score(batch, score_column)[finite]
    steps = batch["step"].to_numpy(np.int64)
    out = {"step": steps, "mimic_score": compute_feature(batch, score_feature, stats),
           "norm_weight": batch["weight"].to_numpy(np.float64) * batch["batch_size"].to_numpy(np.float64),
           "raw_score": batch["score"].to_numpy(np.float64)}
    for name, binarizer in binarizers.items():
        out[f"votes_{name}"] = binarizer.keep(batch).astype(np.int64)
    for column, column_stats in (lift_stats or {}).items():
        out[lift_value_column(column)] = _lift_z(column_stats, steps, original[column].to_numpy(np.float64)[finite])
    return out


def _per_uid(block: pd.DataFrame, methods: list[str]) -> pd.DataFrame:
    """Per-uid sums of one hash partition (all rows of a uid are in the same block), or of a whole local table.

    ``step_z_<column>`` columns (the reference lift's) are averaged over the uid's rows that have a value.
    """
    named = {"n_obs": ("step", "size"), "n_steps": ("step", "nunique"), "mimic_score": ("mimic_score", "mean"),
             "mean_norm_weight": ("norm_weight", "mean"), "mean_raw_score": ("raw_score", "mean")}
    named.update({f"votes_{m}": (f"votes_{m}", "sum") for m in methods})
    named.update({c: (c, "mean") for c in block.columns if c.startswith(LIFT_VALUE_PREFIX)})
    return block.groupby("uid", sort=False).agg(**named).reset_index()


def _run_tasks(fn, calls: list[tuple], local: bool) -> list:
    """``fn`` over every argument tuple of ``calls``: in this process (``local``) or as one Ray task each, results in order."""
    from raymimic.select.stream import releasing

    if local:
        return [releasing(fn, *args) for args in calls]
    import ray

    task = ray.remote(num_cpus=1)(releasing).options(name=fn.__name__)
    return ray.get([task.remote(fn, *args) for args in calls])


def _read_parts(fs, paths: list[str]):
    """The merge tasks' decision parts as a Ray Dataset, read lazily (each consumer streams them from the spill folder)."""
    import pyarrow.fs
    import ray

    local = "file" in (fs.protocol if isinstance(fs.protocol, (tuple, list)) else (fs.protocol,))
    filesystem = None if local else pyarrow.fs.PyFileSystem(pyarrow.fs.FSSpecHandler(fs))
    return ray.data.read_parquet(paths, filesystem=filesystem)


def _sampled(uids: pd.Series, fraction: float, seed: int) -> np.ndarray:
    """A reproducible Bernoulli sample of uids (by a keyed hash of the uid: the same whatever the blocks)."""
    if fraction >= 1:
        return np.ones(len(uids), dtype=bool)
    hashed = pd.util.hash_pandas_object(uids.astype(str), index=False, hash_key=f"{seed % 10**16:016d}").to_numpy(np.uint64)
    return (hashed >> np.uint64(11)).astype(np.float64) / float(1 << 53) < fraction


def _lift_rows(batch: pd.DataFrame, fraction: float, seed: int) -> pd.DataFrame:
    return batch[_sampled(batch["uid"], fraction, seed)]


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
    ``feature``: the binarizers' feature (default per method and per what the table holds, see
    :mod:`raymimic.select.binarize`: on a table recorded under uniform weights every default is
    ``step_z`` and a weight feature raises); ``score_feature`` (default ``step_z``) is averaged per
    uid into ``mimic_score``, the aggregated score used for ranking and in decisions.parquet.
    ``score_column``: the column in the raw score's role (``score``, ``score_<name>`` or a bare
    control name such as ``zero``); weight features are refused for any column but ``score``.
    ``paper_rule``: the paper's Stage-2 rule, every binarizer on the weight (``feature``
    ``norm_weight``: threshold at ``B * w > 1``, GMM and k-means on ``w_i``); refused on a
    uniform-weight table and with another score column.
    ``lift``: also aggregate every score column's mean step_z per uid (``step_z_<column>``) for
    :meth:`reference_lift`: ``None`` (default) when the table has ``score_<name>`` columns,
    ``True`` always (``score`` alone without them), ``False`` never.
    ``unfit``: a binarizer that cannot be fitted (e.g. fewer than 2 distinct values) raises
    (``"error"``, default) or is left out of the vote with its message in ``stats["unfit"]``
    (``"skip"``; ``methods`` then lists the binarizers that voted).
    ``spill_dir``: where the streaming path (a URI) keeps its compact rows and decision parts;
    default a local temporary folder; on a multi-node cluster a folder every node can reach.
    :meth:`close` removes it once the decisions are consumed.
    """

    name = "mimic"

    def __init__(self, scores, method: str = "gmm", fraction: float = 0.3, feature: str | None = None, score_feature: str = "step_z",
                 rule: str | float = "majority", fit_sample: int = 100_000, seed: int = 0, nan: str = "drop", duplicates: str = "error",
                 missing: str = "drop", methods: list[str] | None = None, num_partitions: int | None = None, drop: bool = True,
                 unfit: str = "error", score_column: str = "score", paper_rule: bool = False, lift: bool | None = None,
                 spill_dir: str | None = None):
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
        self.score_column = resolve_score_column(score_column)
        check_feature_choice(method, feature, self.score_column, paper_rule)
        if self.score_column != "score" and score_feature in WEIGHT_FEATURES:
            raise ValueError(f"score_feature {score_feature!r} reads the weight, which belongs to the primary score only; "
                             f"the filter's score column is {self.score_column!r}: use step_z or score")
        self.paper_rule, self.lift = bool(paper_rule), lift
        self.scores, self.method, self.fraction = scores, method, fraction
        self.feature, self.score_feature, self.rule = feature, score_feature, check_rule(rule)
        self.fit_sample, self.seed, self.nan, self.duplicates, self.missing = fit_sample, seed, nan, duplicates, missing
        self.num_partitions, self.unfit, self.spill_dir = num_partitions, unfit, spill_dir
        self._spill = None
        self._n_partitions = None
        self.decision_parts = None  # streaming path: the decisions' parquet parts, readable on the driver without Ray Data
        if method == "ensemble":
            self.methods = list(methods or ENSEMBLE_METHODS)
        elif method == "top-fraction":
            self.methods = []
        else:
            self.methods = [method]
        self.binarizers: dict[str, Binarizer] = {}
        self.weights_informative: bool | None = None
        self.lift_columns: list[str] = []  # score columns aggregated per uid for the reference lift
        self.lift_stats: dict[str, StepStats] = {}
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

    def _check_columns(self, names) -> None:
        """The table must have the filter's score column; choose the columns the lift aggregates."""
        have = score_columns(names)
        if self.score_column not in have:
            raise ValueError(f"score column {self.score_column!r} is not in the score table; its score columns are {have} "
                             "(give one of them, or a bare control name such as 'zero' for score_zero)")
        controls = [c for c in have if c != "score"]
        wanted = self.lift if self.lift is not None else bool(controls)
        self.lift_columns = have if wanted else []
        self.stats["score_column"] = self.score_column
        self.stats["score_columns"] = have

    def _summarize(self, ds, n_rows: int) -> None:
        fn_kwargs = {"sample_prob": self._sample_prob(n_rows), "seed": self.seed, "score_column": self.score_column,
                     "lift_columns": self.lift_columns}
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
        sample = pd.concat([s["sample"] for s in summaries], ignore_index=True)
        # numpy columns in a canonical order: the fits (k-means++ seeding, GMM init) depend on row order, which follows
        # the layout, and Ray Data blocks arrive with arrow-backed columns where files give numpy ones
        sample = pd.DataFrame({c: sample[c].to_numpy(object if c == "uid" else None) for c in sample.columns})
        self.sample = sample.sort_values(list(sample.columns), kind="stable", ignore_index=True)
        weights = combine_weight_ranges([s["weights"] for s in summaries])
        self.weights_informative = bool(informative_weights(weights))
        self.stats["weights"] = {"informative": self.weights_informative, "norm_weight_min": None if weights is None else weights[0],
                                 "norm_weight_max": None if weights is None else weights[1],
                                 "n_rows_off_uniform": None if weights is None else weights[2]}
        self.lift_stats = {}
        for column in self.lift_columns:
            parts = [s["lift_partials"][column] for s in summaries if column in s["lift_partials"]]
            try:
                if not parts:
                    raise ValueError("no usable row has a value")
                self.lift_stats[column] = StepStats.from_partials(pd.concat(parts, ignore_index=True))
            except ValueError as err:  # e.g. a column constant in every step: no step_z, left out of the lift
                self.stats.setdefault("lift_skipped", {})[column] = str(err)
                log.warning("score column %s left out of the reference lift: %s", column, err)
        if self.lift_columns:
            self.stats["lift_columns"] = list(self.lift_stats)

    def _requested_feature(self) -> str | None:
        """The binarizers' feature asked for (None: each method's default for what the table holds), checked against the table.

        A weight feature on a table recorded under uniform weights raises, whatever ``unfit`` says.
        """
        requested = PAPER_FEATURE if self.paper_rule else self.feature
        if requested in WEIGHT_FEATURES and not self.weights_informative:
            what = " (the paper rule --paper-rule binarizes w_i)" if self.paper_rule else ""
            raise uniform_weight_error(requested, what)
        if self.score_feature in WEIGHT_FEATURES and not self.weights_informative:
            raise uniform_weight_error(self.score_feature, " (score_feature)")
        return requested

    def _fit_binarizers(self) -> None:
        if len(self.sample) < 2:
            raise ValueError(f"the fit sample has {len(self.sample)} row(s); raise fit_sample")
        fitted = {}
        feature = self._requested_feature()
        # the weight belongs to the primary score: another score column never gets a weight feature by default
        informative = bool(self.weights_informative and self.score_column == "score")
        for m in self.methods:
            try:
                fitted[m] = make_binarizer(m, feature, seed=self.seed).fit(self.sample, step_stats=self.step_stats,
                                                                             weights_informative=informative)
            except ValueError as err:
                if self.unfit == "error":
                    raise
                self.stats.setdefault("unfit", {})[m] = str(err)
                log.warning("binarizer %s left out of the vote: %s", m, err)
        if self.methods and not fitted:
            raise ValueError(f"no binarizer could be fitted: {self.stats['unfit']}")
        self.binarizers, self.methods = fitted, list(fitted)
        self.stats["features"] = {m: b.feature for m, b in fitted.items()}

    def fit(self, ds=None) -> MimicFilter:
        """Fit on the score table (``ds``, the dataset to filter later, is not needed here)."""
        if isinstance(self.scores, pd.DataFrame):
            return self._fit_local(self.scores)
        if isinstance(self.scores, str):
            return self._fit_files(self.scores)
        scores = self._score_dataset()
        self._check_columns(scores.schema().names)
        n_rows = scores.count()
        if n_rows == 0:
            raise ValueError("the score table is empty: nothing to filter")
        self._summarize(scores, n_rows)
        self._fit_binarizers()
        self.decisions = self._decide(scores, n_rows)
        self.fitted = True
        return self

    def _fit_local(self, table: pd.DataFrame) -> MimicFilter:
        """:meth:`fit` on an in-memory table: the same block functions, run once on the whole table."""
        check_schema(list(table.columns), "score table", required=STAGE2_COLUMNS)
        self._check_columns(table.columns)
        if len(table) == 0:
            raise ValueError("the score table is empty: nothing to filter")
        summary = _block_summary(table, self._sample_prob(len(table)), self.seed, self.score_column, self.lift_columns)
        self._absorb([summary], len(table))
        self._fit_binarizers()
        rows = _row_votes(table, self.binarizers, self.step_stats, self.score_feature, self.score_column, self.lift_stats)
        per_uid = _per_uid(rows, self.methods)
        self._count(len(per_uid), int(per_uid["n_obs"].sum()), int(per_uid["n_steps"].sum()))
        if self.method == "top-fraction":
            self.threshold = float(np.quantile(per_uid["mimic_score"].to_numpy(np.float64), 1 - self.fraction))
        self.decisions = _apply_vote(per_uid, self.methods, self.rule, self.threshold).sort_values("uid", ignore_index=True)
        self.fitted = True
        return self

    def _fit_files(self, uri: str) -> MimicFilter:
        """:meth:`fit` on a score-table URI with plain Ray tasks over its files (:mod:`raymimic.select.stream`).

        A table of at most :data:`raymimic.select.stream.LOCAL_ROWS` rows runs the same rounds in
        this process: starting workers and importing into them would cost more than the work.
        """
        from raymimic.select import stream

        files = stream.ScoreFiles(uri, STAGE2_COLUMNS)
        self._check_columns(files.names)
        if files.n_rows == 0:
            raise ValueError("the score table is empty: nothing to filter")
        names = [c for c in files.names if c in SCORE_COLUMNS or c in self.stats["score_columns"]]
        local = files.n_rows <= stream.LOCAL_ROWS
        n_cpus = 1 if local else stream.cpu_count()
        groups = files.groups(n_cpus)
        self._absorb(self._stream_summaries(stream, files, groups, names, local), files.n_rows)
        self._fit_binarizers()
        self.decisions = self._stream_decide(stream, files, groups, names, n_cpus, local)
        self.stats["stage2_tasks"] = {"in_process": local, "map_tasks": len(groups), "partitions": self._n_partitions}
        self.fitted = True
        return self

    def _stream_summaries(self, stream, files, groups: list[list[str]], names: list[str], local: bool) -> list[dict]:
        kwargs = {"sample_prob": self._sample_prob(files.n_rows), "seed": self.seed, "score_column": self.score_column,
                  "lift_columns": self.lift_columns}
        blobs = _run_tasks(stream.summarize_files, [(files.fs, group, names, kwargs) for group in groups], local)
        return [pickle.loads(blob) for group in blobs for blob in group]

    def _stream_decide(self, stream, files, groups: list[list[str]], names: list[str], n_cpus: int, local: bool):
        self.close()
        self._spill = spill = stream.SpillFolder(self.spill_dir)
        weakref.finalize(self, spill.remove)
        self._n_partitions = n_partitions = self.num_partitions or stream.partition_count(files.n_rows, n_cpus)
        kwargs = {"binarizers": self.binarizers, "stats": self.step_stats, "score_feature": self.score_feature,
                  "score_column": self.score_column, "lift_stats": self.lift_stats}
        written = _run_tasks(stream.partial_files, [(spill.fs, group, names, kwargs, spill.path, i, n_partitions)
                                                    for i, group in enumerate(groups)], local)
        by_partition: list[list[tuple]] = [[] for _ in range(n_partitions)]
        for path, layout in written:
            for p, columns in layout.items():
                by_partition[p].append((path, columns))
        # top-fraction ranks after every partition is reduced: its vote waits for the threshold
        vote = None if self.method == "top-fraction" else {"rule": self.rule, "threshold": None}
        totals = _run_tasks(stream.merge_partition, [(spill.fs, pieces, self.methods, vote, f"{spill.path}/decisions/part-{p:05d}.parquet")
                                                     for p, pieces in enumerate(by_partition)], local)
        spill.remove_rows()
        totals = [t for t in totals if t["path"]]
        self._count(sum(t["n_uids"] for t in totals), sum(t["n_obs"] for t in totals), sum(t["n_steps"] for t in totals))
        paths = [t["path"] for t in totals]
        if self.method == "top-fraction":
            self._stream_top_fraction(stream, spill.fs, paths, [t["range"] for t in totals], local)
        self.decision_parts = stream.DecisionParts(spill.fs, paths)
        return _read_parts(spill.fs, paths)

    def _stream_top_fraction(self, stream, fs, paths: list[str], ranges: list[dict], local: bool) -> None:
        """The rank cut of the streaming path: global histogram of the parts' mimic_score, then the vote on every part."""

        def histogram(edges: np.ndarray) -> np.ndarray:
            return np.sum(_run_tasks(stream.histogram_part, [(fs, p, edges) for p in paths], local), axis=0)

        self.threshold = stream.histogram_quantile(ranges, histogram, 1 - self.fraction)
        _run_tasks(stream.vote_part, [(fs, p, self.methods, self.rule, self.threshold) for p in paths], local)

    def close(self) -> None:
        """Remove the streaming path's spill folder (its decision parts back :attr:`decisions`: read them first)."""
        if self._spill is not None:
            self._spill.remove()
            self._spill, self.decision_parts = None, None

    def _decide(self, scores, n_rows: int):
        fn_kwargs = {"binarizers": self.binarizers, "stats": self.step_stats, "score_feature": self.score_feature,
                     "score_column": self.score_column, "lift_stats": self.lift_stats}
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
        wanted = ["uid", "mimic_score", "mean_norm_weight", "mean_raw_score", "n_obs", *[f"keep_{m}" for m in self.methods], "mimic_keep",
                  *self.lift_value_columns]
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
                raise ValueError(f"uid {batch['uid'][unscored].iloc[0]!r} (and {int(unscored.sum()) - 1} more in this block) has no "
                                 "mimic score; pass missing='drop' or 'keep'")
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

    # ----------------------------------------------------------------- reference lift
    @property
    def lift_value_columns(self) -> list[str]:
        """The per-uid ``step_z_<column>`` columns of the decisions (empty without the lift)."""
        return [lift_value_column(c) for c in self.lift_stats]

    def lift_sample(self, max_uids: int = LIFT_MAX_UIDS) -> pd.DataFrame:
        """``uid``, ``mimic_keep`` and the ``step_z_<column>`` columns of a seeded sample of at most ~``max_uids`` decisions.

        Every uid when there are at most ``max_uids``; otherwise each uid is taken with probability
        ``max_uids / n_uids`` by a keyed hash of the uid (seed: ``seed``), so the sample does not
        depend on the blocks. Collected on the driver.
        """
        if not self.fitted:
            raise RuntimeError("MimicFilter is not fitted: call fit() first")
        columns = ["uid", "mimic_keep", *self.lift_value_columns]
        fraction = min(1.0, max_uids / max(int(self.stats.get("n_uids", 0)), 1))
        if isinstance(self.decisions, pd.DataFrame):
            frame = self.decisions[columns]
            return frame[_sampled(frame["uid"], fraction, self.seed)].reset_index(drop=True)
        if self.decision_parts is not None:  # streamed on the driver: no Ray Data execution for a sample
            batches = [_lift_rows(b.to_pandas(), fraction, self.seed) for b in self.decision_parts.select_columns(columns).iter_batches()]
            return pd.concat(batches, ignore_index=True).sort_values("uid", ignore_index=True)
        ds = self.decisions.select_columns(columns)
        if fraction < 1:
            ds = ds.map_batches(_lift_rows, fn_kwargs={"fraction": fraction, "seed": self.seed}, batch_format="pandas")
        return ds.to_pandas().sort_values("uid", ignore_index=True)

    def reference_lift(self, truth: pd.DataFrame | None = None, max_uids: int = LIFT_MAX_UIDS) -> dict | None:
        """The reference-lift metrics (:func:`raymimic.select.quality.lift_metrics`) of the fitted filter; None without the lift.

        Computed on :meth:`lift_sample` (at most ~``max_uids`` uids). ``truth``: a frame with ``uid``
        and a boolean ``is_noisy``; the metrics then cover the sampled uids that it lists (ROC-AUC,
        F1 and the reference lift need it), and the counts of matched and unmatched uids are reported.
        """
        if not self.lift_stats:
            return None
        sample = self.lift_sample(max_uids)
        n_sampled = len(sample)
        is_noisy, matching = None, None
        if truth is not None:
            truth = check_truth(truth)
            sample = sample.merge(truth[["uid", "is_noisy"]], on="uid", how="inner")
            is_noisy = sample["is_noisy"].to_numpy(bool)
            matching = {"n_matched_uids": len(sample), "n_sampled_uids_without_truth": n_sampled - len(sample)}
        values = {c: sample[lift_value_column(c)].to_numpy(np.float64) for c in self.lift_stats}
        if self.score_column not in values:
            raise ValueError(f"the filter's score column {self.score_column!r} has no step_z ({self.stats.get('lift_skipped')})")
        out = lift_metrics(values, sample["mimic_keep"].to_numpy(bool), self.score_column, is_noisy)
        out.update(n_uids_total=int(self.stats.get("n_uids", 0)), n_uids_sampled=n_sampled, max_uids=int(max_uids),
                   sampled=n_sampled < int(self.stats.get("n_uids", 0)), sample_seed=self.seed, skipped=self.stats.get("lift_skipped", {}))
        if matching:
            out.update(matching)
        return out

    def params(self) -> dict:
        return {**super().params(), "method": self.method, "methods": self.methods, "feature": self.feature,
                "score_feature": self.score_feature,
                "score_column": self.score_column, "paper_rule": self.paper_rule, "weights_informative": self.weights_informative,
                "features": {m: b.feature for m, b in self.binarizers.items()},
                "rule": self.rule, "fraction": self.fraction if self.method == "top-fraction" else None, "threshold": self.threshold,
                "fit_sample": self.fit_sample, "seed": self.seed, "nan": self.nan, "duplicates": self.duplicates, "missing": self.missing,
                "binarizers": {m: b.params() for m, b in self.binarizers.items()}}


def check_feature_choice(method: str, feature: str | None, score_column: str = "score", paper_rule: bool = False) -> None:
    """Refuse, before any data is read, the combinations that cannot mean anything (the table's weights are checked at fit)."""
    if paper_rule:
        if method == "top-fraction":
            raise ValueError("the paper rule (--paper-rule) binarizes w_i with threshold, k-means or GMM; top-fraction ranks the "
                             "score and has no binarizer: use --method gmm, kmeans, threshold or ensemble")
        if feature not in (None, PAPER_FEATURE):
            raise ValueError(f"the paper rule (--paper-rule) binarizes the weight (feature {PAPER_FEATURE}); drop --feature {feature}")
    weight_feature = PAPER_FEATURE if paper_rule else feature
    if score_column != "score" and weight_feature in WEIGHT_FEATURES:
        what = "the paper rule (--paper-rule)" if paper_rule else f"feature {weight_feature!r}"
        raise ValueError(f"{what} reads the weight column, which belongs to the primary score only; the filter's score column is "
                         f"{score_column!r}: use a score feature (step_z, score) or leave --feature unset")


def check_truth(truth: pd.DataFrame, where: str = "ground truth") -> pd.DataFrame:
    """``truth`` with ``uid`` (str) and a boolean ``is_noisy``; ``ValueError`` naming what is wrong."""
    missing = [c for c in ("uid", "is_noisy") if c not in truth.columns]
    if missing:
        raise ValueError(f"{where} lacks column(s) {missing} (its columns: {list(truth.columns)}); it needs uid and a boolean is_noisy")
    noisy = truth["is_noisy"]
    if noisy.dtype != bool:
        values = pd.unique(noisy.dropna())
        if noisy.isna().any() or not set(values.tolist()) <= {0, 1}:
            raise ValueError(f"{where}: is_noisy must be boolean (true = noisy), got dtype {noisy.dtype} with values {values[:5].tolist()}")
    out = pd.DataFrame({"uid": truth["uid"].astype(str), "is_noisy": noisy.astype(bool)})
    duplicated = out["uid"].duplicated()
    if duplicated.any():
        raise ValueError(f"{where} lists {int(duplicated.sum())} uid(s) twice (first {out['uid'][duplicated].iloc[0]!r})")
    return out
