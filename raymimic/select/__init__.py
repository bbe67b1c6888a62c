"""Stage 2: turn mimic scores (and other signals) into a keep list.

The maths (binarizers, ensemble vote, quality estimate) is plain numpy/sklearn; the mimic
filter's rounds are the kernels of :mod:`raymimic.select.kernels`, moved by the executors of
:mod:`raymimic.select.executors`; the Ray Data stages live in :mod:`raymimic.select.filters` and
:mod:`raymimic.select.pipeline`.
"""
from raymimic.select.binarize import (
    FEATURES,
    METHODS,
    Binarizer,
    GMMBinarizer,
    KMeansBinarizer,
    StepStats,
    ThresholdBinarizer,
    compute_feature,
    make_binarizer,
)
from raymimic.select.ensemble import decide, vote, vote_from_counts
from raymimic.select.filters import BasicFilter, CLIPScoreFilter, NegCLIPLossFilter, NormSimFilter
from raymimic.select.mimic_filter import MimicFilter
from raymimic.select.quality import quality_estimate
from raymimic.select.stages import FilterStage, keep_where, run_stages

__all__ = [
    "FEATURES", "METHODS", "Binarizer", "GMMBinarizer", "KMeansBinarizer", "StepStats", "ThresholdBinarizer",
    "compute_feature", "make_binarizer", "decide", "vote", "vote_from_counts", "quality_estimate",
    "BasicFilter", "CLIPScoreFilter", "FilterStage", "MimicFilter", "NegCLIPLossFilter", "NormSimFilter", "keep_where", "run_stages",
]
