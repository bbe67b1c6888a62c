"""Chainable Ray Data filter stages: ``fit(ds)`` learns, ``apply(ds)`` returns a new Dataset.

A stage adds ``<name>_score`` (float) and ``<name>_keep`` (bool) columns; with ``drop=True``
(the default) ``apply`` also removes the rows it does not keep, so stages chain like any
other Ray Data step. With ``drop=False`` several stages can vote on the same rows and a
final :func:`keep_where` combines their keep columns.

Ranking stages (``top_fraction``) compute a global threshold across the cluster with
:func:`raymimic.select.quantile.approximate_quantiles` at ``fit`` time, so "top 30%" is
relative to the dataset the stage was fitted on (the pool), not to a later subset.
"""
from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any

import numpy as np
import pandas as pd

from raymimic.select.quantile import approximate_quantiles


class FilterStage:
    """Base class: keep/drop rows with a reason recorded in ``<name>_keep``."""

    name = "filter"

    def __init__(self, drop: bool = True):
        self.drop = drop
        self.fitted = False

    @property
    def keep_column(self) -> str:
        return f"{self.name}_keep"

    def fit(self, ds) -> FilterStage:
        self.fitted = True
        return self

    def annotate(self, ds):
        """``ds`` with this stage's columns added (no row removed)."""
        raise NotImplementedError

    def apply(self, ds):
        if not self.fitted:
            raise RuntimeError(f"{type(self).__name__} is not fitted: call fit(ds) first (or use fit_apply)")
        out = self.annotate(ds)
        return drop_unkept(out, self.keep_column) if self.drop else out

    def fit_apply(self, ds):
        return self.fit(ds).apply(ds)

    def params(self) -> dict:
        return {"stage": type(self).__name__, "name": self.name, "drop": self.drop}


def run_stages(ds, stages: Iterable[FilterStage]):
    """Fit each stage on the output of the previous one and apply it."""
    for stage in stages:
        ds = stage.fit_apply(ds)
    return ds


def keep_where(ds, keep_columns: list[str], output: str = "keep", drop: bool = False):
    """AND of several boolean keep columns (null counts as drop) into ``output``."""

    def combine(batch: pd.DataFrame) -> pd.DataFrame:
        keep = np.ones(len(batch), dtype=bool)
        for column in keep_columns:
            keep &= batch[column].fillna(False).to_numpy(dtype=bool)
        batch[output] = keep
        return batch

    out = ds.map_batches(combine, batch_format="pandas")
    return drop_unkept(out, output) if drop else out


def _keep_rows(batch: pd.DataFrame, column: str) -> pd.DataFrame:
    return batch[batch[column].fillna(False).to_numpy(dtype=bool)]


def drop_unkept(ds, keep_column: str):
    """Rows whose boolean ``keep_column`` is True (null counts as False)."""
    return ds.map_batches(_keep_rows, fn_kwargs={"column": keep_column}, batch_format="pandas")


class ScoreFilter(FilterStage):
    """A stage that scores every row and keeps the top fraction or scores >= ``min_score``.

    Subclasses implement ``score_batch(batch: pandas.DataFrame) -> np.ndarray``. Rows whose
    score is NaN are not kept (``<name>_keep`` False: a comparison with NaN is false).
    """

    name = "score"
    #: map_batches keyword arguments for scoring (e.g. an actor pool for a model)
    map_kwargs: dict[str, Any] = {}

    def __init__(self, top_fraction: float | None = None, min_score: float | None = None, drop: bool = True):
        super().__init__(drop)
        if (top_fraction is None) == (min_score is None):
            raise ValueError(f"{type(self).__name__}: give exactly one of top_fraction (e.g. 0.3) or min_score")
        if top_fraction is not None and not 0 < top_fraction <= 1:
            raise ValueError(f"top_fraction must be in (0, 1], got {top_fraction}")
        self.top_fraction, self.min_score = top_fraction, min_score
        self.threshold = min_score
        self._scored = None
        self._scored_source = None

    @property
    def score_column(self) -> str:
        return f"{self.name}_score"

    def score_batch(self, batch: pd.DataFrame) -> np.ndarray:
        raise NotImplementedError

    def _add_score(self, batch: pd.DataFrame) -> pd.DataFrame:
        batch[self.score_column] = np.asarray(self.score_batch(batch), dtype=np.float64)
        return batch

    def scored(self, ds):
        """``ds`` with the score column; computed once per input dataset (scoring can be costly)."""
        if self._scored is not None and self._scored_source is ds:
            return self._scored
        out = ds.map_batches(self._add_score, batch_format="pandas", **self.map_kwargs)
        if self.top_fraction is not None:
            out = out.materialize()  # read twice (quantile, then apply): score only once
        self._scored, self._scored_source = out, ds
        return out

    def fit(self, ds) -> ScoreFilter:
        if self.top_fraction is not None:
            scored = self.scored(ds)
            self.threshold = float(approximate_quantiles(scored, self.score_column, [1 - self.top_fraction])[0])
        self.fitted = True
        return self

    def annotate(self, ds):
        threshold, score_column, keep_column = self.threshold, self.score_column, self.keep_column
        top = self.top_fraction is not None

        def decide(batch: pd.DataFrame) -> pd.DataFrame:
            scores = batch[score_column].to_numpy(dtype=np.float64, na_value=np.nan)
            # ">" for a top fraction so that ties at the quantile do not inflate the kept share
            batch[keep_column] = (scores > threshold) if top else (scores >= threshold)
            return batch

        return self.scored(ds).map_batches(decide, batch_format="pandas")

    def params(self) -> dict:
        threshold = None if self.threshold is None or not math.isfinite(self.threshold) else float(self.threshold)
        return {**super().params(), "top_fraction": self.top_fraction, "min_score": self.min_score, "threshold": threshold}
