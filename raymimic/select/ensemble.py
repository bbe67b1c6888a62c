"""Ensemble filter: combine per-sample keep/drop decisions across epochs and methods.

Every observation of a sample (one per epoch in which it was trained, from each binarizer)
casts one keep/drop vote. The paper does not publish its rule; ours is a vote with the rule
as a parameter:

``"majority"`` (default)
    keep when *strictly* more than half of the votes say keep (a tie drops the sample:
    the filter only keeps what most evidence supports).
``"all"`` / ``"any"``
    unanimous keep / at least one keep.
a number ``f`` in (0, 1]
    keep when the fraction of keep votes is at least ``f``.

Missing votes (a sample not seen in some epoch: NaN or ``pd.NA`` in a decision frame) are
not counted; a sample with no vote at all is an error, never a silent keep or drop.
Because every rule depends only on ``(keep votes, total votes)``, the distributed filter
sums votes per uid with an aggregation and calls :func:`vote_from_counts`.
"""
from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np
import pandas as pd

from raymimic.select.binarize import Binarizer
from raymimic.select.names import RULES


def check_rule(rule: str | float) -> str | float:
    """Return ``rule`` if valid, else raise ``ValueError`` listing the valid rules."""
    if isinstance(rule, str):
        if rule in RULES:
            return rule
        try:
            rule = float(rule)
        except ValueError:
            raise ValueError(f"unknown vote rule {rule!r}; use one of {list(RULES)} or a fraction in (0, 1]") from None
    if isinstance(rule, (bool, np.bool_)) or not isinstance(rule, (int, float, np.number)) or not 0 < float(rule) <= 1:
        raise ValueError(f"vote rule {rule!r} is not valid; use one of {list(RULES)} or a fraction in (0, 1]")
    return float(rule)


def vote_from_counts(keep_votes: np.ndarray, total_votes: np.ndarray, rule: str | float = "majority") -> np.ndarray:
    """Apply ``rule`` to per-sample counts of keep votes out of ``total_votes``."""
    rule = check_rule(rule)
    keep_votes = np.asarray(keep_votes, dtype=np.int64)
    total_votes = np.asarray(total_votes, dtype=np.int64)
    if keep_votes.shape != total_votes.shape:
        raise ValueError(f"keep_votes {keep_votes.shape} and total_votes {total_votes.shape} differ in shape")
    if (total_votes <= 0).any():
        raise ValueError(f"{int((total_votes <= 0).sum())} samples have no vote at all; every sample needs at least one decision")
    if ((keep_votes < 0) | (keep_votes > total_votes)).any():
        raise ValueError("keep votes must lie between 0 and the number of votes")
    if rule == "majority":
        return 2 * keep_votes > total_votes
    if rule == "all":
        return keep_votes == total_votes
    if rule == "any":
        return keep_votes > 0
    # the tolerance absorbs rounding such as 0.6 * 5 = 3.0000000000000004
    return keep_votes >= rule * total_votes - 1e-9


def vote(decisions: np.ndarray | pd.DataFrame, rule: str | float = "majority") -> np.ndarray:
    """Combine decisions ``[n_samples, n_votes]`` (bool array or frame of bool columns)."""
    if isinstance(decisions, pd.DataFrame):
        present = decisions.notna().to_numpy()
        values = decisions.fillna(False).to_numpy(dtype=bool)
    else:
        array = np.asarray(decisions)
        if array.ndim == 1:
            array = array[:, None]
        if array.ndim != 2:
            raise ValueError(f"decisions must be 2-D [samples, votes], got shape {array.shape}")
        if array.dtype.kind == "f":
            present = ~np.isnan(array)
            values = np.nan_to_num(array, nan=0.0) != 0
        elif array.dtype.kind == "b":
            present, values = np.ones(array.shape, bool), array
        else:
            raise ValueError(f"decisions must be boolean (or float with NaN for a missing vote), got dtype {array.dtype}")
    keep_votes = (values & present).sum(axis=1)
    return vote_from_counts(keep_votes, present.sum(axis=1), rule)


def decide(table: Any, binarizers: Mapping[str, Binarizer]) -> pd.DataFrame:
    """One ``keep_<name>`` column per fitted binarizer, one row per row of ``table``."""
    if not binarizers:
        raise ValueError("no binarizer given: pass at least one, e.g. {'gmm': make_binarizer('gmm').fit(sample)}")
    return pd.DataFrame({f"keep_{name}": b.keep(table) for name, b in binarizers.items()})

