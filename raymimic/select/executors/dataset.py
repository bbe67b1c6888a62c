"""The mimic filter on a Ray Dataset of score rows: every round a ``map_batches`` of a kernel.

1. one ``map_batches`` returns each block's :func:`~raymimic.select.kernels.block_summary`
   (pickled into one row); the filter combines them and fits its binarizers;
2. a second ``map_batches`` computes every row's votes; a hash repartition on ``uid`` puts all
   rows of a uid in one block, where :func:`~raymimic.select.kernels.per_uid` reduces them;
3. a last ``map_batches`` applies the vote rule (top-fraction: at the histogram quantile).
"""
from __future__ import annotations

import pickle

import numpy as np
import pandas as pd

from raymimic.select import kernels
from raymimic.select.executors import Outcome
from raymimic.select.quantile import approximate_quantiles


def summarize_block(batch: pd.DataFrame, **kwargs) -> dict:
    """:func:`~raymimic.select.kernels.block_summary` of one block, pickled into one row."""
    return {"blob": np.array([pickle.dumps(kernels.block_summary(batch, **kwargs))], dtype=object)}


def block_totals(block: pd.DataFrame) -> pd.DataFrame:
    """:func:`~raymimic.select.kernels.totals` of one block as a one-row frame."""
    return pd.DataFrame({k: [v] for k, v in kernels.totals(block).items()})


def run(mimic, scores, n_rows: int) -> Outcome:
    """The three rounds on ``scores`` (a Dataset of ``n_rows`` score rows, checked by the filter) for ``mimic``."""
    blobs = scores.map_batches(summarize_block, fn_kwargs=mimic.summary_kwargs(n_rows), batch_format="pandas", batch_size=None)
    mimic.absorb([pickle.loads(blob) for batch in blobs.iter_batches(batch_format="numpy", batch_size=None) for blob in batch["blob"]],
                 n_rows)
    mimic.fit_binarizers()
    rows = scores.map_batches(kernels.row_votes, fn_kwargs=mimic.vote_kwargs(), batch_format="pandas")
    # hash-partition on uid (every row of a uid lands in one block), then reduce each block
    partitions = mimic.num_partitions or int(np.clip(n_rows // 125_000, 2, 256))
    per_uid = rows.repartition(partitions, keys=["uid"]).map_batches(
        kernels.per_uid, fn_kwargs={"methods": mimic.methods}, batch_format="pandas", batch_size=None).materialize()
    # block totals summed on the driver: a tiny map, cheaper than a global aggregate
    counts = per_uid.map_batches(block_totals, batch_format="pandas", batch_size=None).to_pandas().sum()
    mimic.count(int(counts["n_uids"]), int(counts["n_obs"]), int(counts["n_steps"]))
    threshold = None
    if mimic.method == "top-fraction":
        threshold = float(approximate_quantiles(per_uid, "mimic_score", [1 - mimic.fraction])[0])
    out = per_uid.map_batches(kernels.apply_vote, fn_kwargs={"methods": mimic.methods, "rule": mimic.rule, "threshold": threshold},
                              batch_format="pandas")
    return Outcome(out.materialize(), threshold)
