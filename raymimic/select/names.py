"""The names of Stage 2's choices, as plain data (no imports).

The registries of :mod:`raymimic.select.mimic_filter` (methods), :mod:`raymimic.select.binarize`
(features) and :mod:`raymimic.select.ensemble` (vote rules) import them from here, and so do
:class:`raymimic.select.config.FilterConfig` and the command line's help.
"""
from __future__ import annotations

MIMIC_METHODS = ("gmm", "kmeans", "threshold", "ensemble", "top-fraction")
FEATURES = ("step_z", "log_norm_weight", "norm_weight", "score")
RULES = ("majority", "all", "any")
NAN_HANDLING = ("drop", "error")  # rows with NaN/inf score or weight
DUPLICATE_HANDLING = ("error", "count")  # repeated (uid, step) rows
MISSING_HANDLING = ("drop", "keep", "error")  # pool uids without any score (with a pool)
# the paper's DataComp Stage 2 (its Table 4) by name: the share of uids kept by aggregated mimic score
# (top-fraction) and the CLIP-score top fraction also required (None: no CLIP-score rule)
PAPER_DATACOMP_RULES = {
    "top30": (0.30, None),
    "top35": (0.35, None),
    "top40": (0.40, None),
    "clip30-minus15": (0.85, 0.30),  # CLIPScore top 30% minus the mimic score's bottom 15%
    "clip30-minus20": (0.80, 0.30),  # CLIPScore top 30% minus the mimic score's bottom 20%
}
