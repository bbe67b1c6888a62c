"""The mimic filter in this process, on a pandas DataFrame of score rows (small tables, e.g. the label-noise simulation).

The same kernels as the distributed executors, run once on the whole table; ``top-fraction``
cuts at the exact quantile instead of the histogram one.
"""
from __future__ import annotations

import numpy as np
import pandas as pd

from raymimic.select import kernels
from raymimic.select.executors import Outcome


def run(mimic, table: pd.DataFrame) -> Outcome:
    """Summary, fit, votes, per-uid reduce and vote rule of ``table`` (checked by the filter) for ``mimic``."""
    summary = kernels.block_summary(table, **mimic.summary_kwargs(len(table)))
    mimic.absorb([summary], len(table))
    mimic.fit_binarizers()
    per_uid = kernels.per_uid(kernels.row_votes(table, **mimic.vote_kwargs()), mimic.methods)
    mimic.count(**kernels.totals(per_uid))
    threshold = None
    if mimic.method == "top-fraction":
        threshold = float(np.quantile(per_uid["mimic_score"].to_numpy(np.float64), 1 - mimic.fraction))
    decisions = kernels.apply_vote(per_uid, mimic.methods, mimic.rule, threshold).sort_values("uid", ignore_index=True)
    return Outcome(decisions, threshold)
