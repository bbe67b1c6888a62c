"""The mimic-score filter: score tables in, per-uid keep decisions out.

:class:`MimicFilter` holds the settings, combines the blocks' summaries, fits the binarizers
and counts; the rounds themselves are the kernels of :mod:`raymimic.select.kernels`, moved by
an executor of :mod:`raymimic.select.executors` chosen by what ``scores`` is: a score-table URI
(what ``raymimic filter`` passes) runs Ray tasks over its files (memory flat in rows,
docs/scaling.md), a Dataset of score rows runs on Ray Data, a pandas DataFrame in this process.

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
rounds also standardise every score column within its step (per-step statistics of the whole
table, each column's own) and average it per uid: decisions gain one ``step_z_<column>`` per
score column, and :meth:`MimicFilter.reference_lift` turns a seeded sample of them (at most
:data:`LIFT_MAX_UIDS` uids) into the metrics of :func:`raymimic.select.quality.lift_metrics`.
"""
from __future__ import annotations

import logging
from typing import Any

import numpy as np
import pandas as pd

from raymimic.score_table import STAGE2_COLUMNS, check_schema, control_column, control_name, control_names
from raymimic.select import kernels
from raymimic.select.binarize import (
    PAPER_FEATURE,
    WEIGHT_FEATURES,
    Binarizer,
    StepStats,
    combine_weight_ranges,
    informative_weights,
    make_binarizer,
    uniform_weight_error,
)
from raymimic.select.ensemble import check_rule
from raymimic.select.executors import Outcome, dataset, local, tasks
from raymimic.select.kernels import lift_value_column
from raymimic.select.names import MIMIC_METHODS
from raymimic.select.quality import lift_metrics
from raymimic.select.stages import FilterStage, drop_unkept

log = logging.getLogger(__name__)

ENSEMBLE_METHODS = ("gmm", "kmeans", "threshold")
LIFT_MAX_UIDS = 1_000_000
"""The reference-lift metrics are computed on the driver over a seeded sample of at most this many uids."""

__all__ = ["ENSEMBLE_METHODS", "LIFT_MAX_UIDS", "MIMIC_METHODS", "MimicFilter", "check_feature_choice", "check_truth",
           "check_task_resources", "lift_value_column", "resolve_score_column", "score_columns"]


def resolve_score_column(name: str) -> str:
    """``score``, a ``score_<name>`` column, or a bare control name (``zero`` -> ``score_zero``); ``ValueError`` for a bad name."""
    if name == "score" or control_name(name) is not None:
        return name
    try:
        return control_column(name)
    except ValueError:
        raise ValueError(f"score column {name!r} is not valid: give score, a score_<name> column or a bare control name "
                         "(lower-case letters, digits and '_', e.g. zero for score_zero)") from None


def check_task_resources(resources) -> dict[str, float] | None:
    """Custom Ray resources for Stage 2's tasks as ``{name: amount}`` (None when none); ``ValueError`` naming a bad entry."""
    if resources is None:
        return None
    if not isinstance(resources, dict):
        raise ValueError(f"task_resources must be a dict of Ray resource name -> amount per task, got {resources!r}")
    checked = {}
    for name, amount in resources.items():
        if name in ("CPU", "GPU"):
            raise ValueError(f"task_resources may not set {name!r}: a Stage 2 task runs on one CPU and no GPU; give custom resources")
        if not isinstance(name, str) or not name or isinstance(amount, bool) or not isinstance(amount, (int, float)) or not amount > 0:
            raise ValueError(f"task_resources needs Ray resource name -> amount > 0 per task, got {name!r}: {amount!r}")
        checked[name] = float(amount)
    return checked or None


def score_columns(names) -> list[str]:
    """The score columns of a schema or column list: ``score`` (when present), then every ``score_<name>`` column."""
    names = list(names)
    return (["score"] if "score" in names else []) + [control_column(c) for c in control_names(names)]


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
    ``spill_dir``: where the task executor (a URI) commits its work (summaries, compact rows,
    decision parts, each with a completion marker); default a local temporary folder; on a
    multi-node cluster a folder every node can reach. A given folder survives a killed run: a
    rerun with the same table and settings skips every task that committed, and one with other
    inputs or settings is refused. :meth:`close` removes it once the decisions are consumed.
    ``task_resources``: custom Ray resources (name -> amount > 0) that each of the task
    executor's Ray tasks asks for besides its one CPU, e.g. ``{"cpu_node": 1}`` for a resource
    only the CPU nodes have: Stage 2 then stays off the GPU nodes (or runs on the nodes given).
    A table small enough to run in the driver's process ignores it.
    """

    name = "mimic"

    def __init__(self, scores, method: str = "gmm", fraction: float = 0.3, feature: str | None = None, score_feature: str = "step_z",
                 rule: str | float = "majority", fit_sample: int = 100_000, seed: int = 0, nan: str = "drop", duplicates: str = "error",
                 missing: str = "drop", methods: list[str] | None = None, num_partitions: int | None = None, drop: bool = True,
                 unfit: str = "error", score_column: str = "score", paper_rule: bool = False, lift: bool | None = None,
                 spill_dir: str | None = None, task_resources: dict[str, float] | None = None):
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
        self.task_resources = check_task_resources(task_resources)
        self._spill = None
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
        self._decisions = None
        self.stats: dict[str, Any] = {}

    def settings(self) -> dict:
        """What the decisions depend on besides the score table (a resumed run must have the same)."""
        return {"method": self.method, "methods": self.methods, "fraction": self.fraction, "feature": self.feature,
                "score_feature": self.score_feature, "rule": self.rule, "fit_sample": self.fit_sample, "seed": self.seed,
                "nan": self.nan, "duplicates": self.duplicates, "num_partitions": self.num_partitions, "unfit": self.unfit,
                "score_column": self.score_column, "paper_rule": self.paper_rule, "lift": self.lift}

    @property
    def decisions(self):
        """The per-uid decisions: a DataFrame (fitted in this process) or a Dataset (read from the decision parts on first use)."""
        if self._decisions is None and self.decision_parts is not None:
            self._decisions = tasks.read_parts(self.decision_parts)
        return self._decisions

    # ----------------------------------------------------------------- fitting
    def fit(self, ds=None) -> MimicFilter:
        """Fit on the score table (``ds``, the dataset to filter later, is not needed here)."""
        self.close()
        if isinstance(self.scores, pd.DataFrame):
            check_schema(list(self.scores.columns), "score table", required=STAGE2_COLUMNS)
            self._check_columns(self.scores.columns, len(self.scores))
            outcome = local.run(self, self.scores)
        elif isinstance(self.scores, str):
            files = tasks.ScoreFiles(self.scores, STAGE2_COLUMNS)  # checks every file's columns, naming the file
            self._check_columns(files.names, files.n_rows)
            outcome = tasks.run(self, files)
        else:
            check_schema(self.scores.schema(), "score dataset", required=STAGE2_COLUMNS)
            self._check_columns(self.scores.schema().names, n_rows := self.scores.count())
            outcome = dataset.run(self, self.scores, n_rows)
        self._take(outcome)
        return self

    def _take(self, outcome: Outcome) -> None:
        self._decisions, self.threshold = outcome.decisions, outcome.threshold
        self.decision_parts, self._spill = outcome.parts, outcome.spill
        self.stats.update(outcome.stats)
        self.fitted = True

    def _check_columns(self, names, n_rows: int) -> None:
        """The table must have rows and the filter's score column; choose the columns the lift aggregates."""
        have = score_columns(names)
        if self.score_column not in have:
            raise ValueError(f"score column {self.score_column!r} is not in the score table; its score columns are {have} "
                             "(give one of them, or a bare control name such as 'zero' for score_zero)")
        if n_rows == 0:
            raise ValueError("the score table is empty: nothing to filter")
        controls = [c for c in have if c != "score"]
        wanted = self.lift if self.lift is not None else bool(controls)
        self.lift_columns = have if wanted else []
        self.stats["score_column"] = self.score_column
        self.stats["score_columns"] = have

    def summary_kwargs(self, n_rows: int) -> dict:
        """Round 1's settings (:func:`raymimic.select.kernels.block_summary`) for a table of ``n_rows`` rows."""
        return {"sample_prob": min(1.0, self.fit_sample / max(n_rows, 1)), "seed": self.seed, "score_column": self.score_column,
                "lift_columns": self.lift_columns}

    def vote_kwargs(self) -> dict:
        """Round 2's settings (:func:`raymimic.select.kernels.row_values`), once the binarizers are fitted."""
        return {"binarizers": self.binarizers, "stats": self.step_stats, "score_feature": self.score_feature,
                "score_column": self.score_column, "lift_stats": self.lift_stats}

    def absorb(self, summaries: list[dict], n_rows: int) -> None:
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

    def fit_binarizers(self) -> None:
        """Fit every method's binarizer on the fit sample (after :meth:`absorb`)."""
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

    def close(self) -> None:
        """Remove the task executor's spill folder (its decision parts back :attr:`decisions`: read them first)."""
        if self._spill is not None:
            self._spill.remove()
            self._spill, self.decision_parts, self._decisions = None, None, None

    def count(self, n_uids: int, n_obs: int, n_steps: int) -> None:
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
            return frame[kernels.sampled(frame["uid"], fraction, self.seed)].reset_index(drop=True)
        if self.decision_parts is not None:  # streamed on the driver: no Ray Data execution for a sample
            parts = self.decision_parts.select_columns(columns)
            batches = [kernels.sampled_rows(b.to_pandas(), fraction, self.seed) for b in parts.iter_batches()]
            return pd.concat(batches, ignore_index=True).sort_values("uid", ignore_index=True)
        ds = self.decisions.select_columns(columns)
        if fraction < 1:
            ds = ds.map_batches(kernels.sampled_rows, fn_kwargs={"fraction": fraction, "seed": self.seed}, batch_format="pandas")
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
