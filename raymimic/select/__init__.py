"""Stage 2: turn mimic scores (and other signals) into a keep list.

The maths (binarizers, ensemble vote, quality estimate) is plain numpy/sklearn; the mimic
filter's rounds are the kernels of :mod:`raymimic.select.kernels`, moved by the executors of
:mod:`raymimic.select.executors`; the Ray Data stages live in :mod:`raymimic.select.filters` and
:mod:`raymimic.select.pipeline`;
:mod:`raymimic.select.config` holds the settings and :mod:`raymimic.select.names` the names
of the choices, as plain data.

Names are imported lazily so that ``import raymimic.select.config`` does not pull in pandas or ray.
"""
from __future__ import annotations

import importlib

_LAZY = {
    **dict.fromkeys(("FEATURES", "METHODS", "Binarizer", "GMMBinarizer", "KMeansBinarizer", "StepStats", "ThresholdBinarizer",
                     "compute_feature", "make_binarizer"), "raymimic.select.binarize"),
    **dict.fromkeys(("decide", "vote", "vote_from_counts"), "raymimic.select.ensemble"),
    **dict.fromkeys(("BasicFilter", "CLIPScoreFilter", "NegCLIPLossFilter", "NormSimFilter"), "raymimic.select.filters"),
    "MimicFilter": "raymimic.select.mimic_filter",
    "quality_estimate": "raymimic.select.quality",
    **dict.fromkeys(("FilterStage", "keep_where", "run_stages"), "raymimic.select.stages"),
}

__all__ = sorted(_LAZY)


def __getattr__(name: str):
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'raymimic.select' has no attribute {name!r}")
