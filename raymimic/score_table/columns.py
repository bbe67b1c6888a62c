"""The score columns' vocabulary: their names, what each one is, and the one *reference lift*.

Plain Python on purpose (no third-party import): the mathematics (:mod:`raymimic.mimic`),
Stage 1's settings (:mod:`raymimic.train.config`), the command line's help and every report
read the names from here, and importing it costs nothing.

A score table holds the primary mimic score in ``score`` and, optionally, one float32 column
``score_<name>`` (``<name>`` in ``[a-z0-9_]+``) per other score of the same sample and step,
all with higher = more likely to keep. Each column has a *kind*, and the kind says whether the
column was computed with the reference's knowledge:

- ``reference``: ``score`` (``W_ref - W_t``, or ``W_ref - W_0``) -- uses the reference;
- ``control``: ``zero``, ``init``, ``random`` -- do not (``random`` takes only the reference's norm);
- ``reference variant``: ``fixed``, ``current``, ``aligned``, ``function``, ``output`` -- use it;
- ``baseline``: ``loss`` (``-loss``, the target's own) does not; ``ref_loss``, ``rho``,
  ``ref_clipscore`` run the reference forward and use it;
- ``other reference``: any other name (another reference model) -- uses that reference.

**Reference lift** (:func:`reference_lift`): for every column computed with the reference's
knowledge, its detection figure (the ROC-AUC of the known noisy samples) minus the best among
the columns computed without it (the controls and the target's own loss, where recorded), a
control's AUC counting with either sign (``max(AUC, 1 - AUC)``: a ranking that flags the noise
upside down is still knowledge the reference did not supply). A lift <= 0 says the reference
adds nothing measurable to what the target model alone ranks.
"""
from __future__ import annotations

import math
import re
from collections.abc import Iterable, Mapping

PRIMARY = "score"
"""The primary mimic score's column (the raw ``m_i`` against the reference direction)."""
CONTROL_PREFIX = "score_"
"""Every other score column is ``score_<name>``."""
CONTROL_NAME = re.compile(r"[a-z0-9_]+")
"""What ``<name>`` may be."""

CONTROLS = ("zero", "init", "random")
"""Control directions that carry no knowledge of the reference: ``-W_t``, ``W_0 - W_t``, ``R - W_t``."""
ALIGNED = "aligned"
"""The reference variant that needs both models' activations (Stage 1 builds it, :mod:`raymimic.clip.align`)."""
FUNCTION = "function"
"""The function-space direction ``V_fn = -dD/dW`` (D: the distillation loss towards the reference's batch similarities)."""
OUTPUT = "output"
"""The output-space score: the function direction's question asked of the batch's logits, the identity in place of the layer's kernel."""
REFERENCE_VARIANTS = ("fixed", "current", ALIGNED, FUNCTION, OUTPUT)
"""Scores derived from the reference: ``W_ref - W_0``, ``W_ref - W_t``, the reference brought into the target's basis,
the direction that makes the target behave like the reference on the batch, the same in the batch's logits."""
BUILTIN_CONTROLS = (*CONTROLS, *REFERENCE_VARIANTS)
"""Every direction Stage 1 records by name beside the score (``NAME=SPEC`` adds another reference)."""
TARGET_BASELINES = ("loss",)
"""Baselines of the target model alone: ``score_loss = -loss`` (small-loss selection)."""
REFERENCE_BASELINES = ("ref_loss", "rho", "ref_clipscore")
"""Baselines that run the reference forward: ``-ref_loss``, ``loss - ref_loss`` (RHO-loss), the reference's CLIPScore."""
BASELINES = (*TARGET_BASELINES, *REFERENCE_BASELINES)
"""Every per-sample baseline score Stage 1 records on request."""
WITHOUT_REFERENCE = (*CONTROLS, *TARGET_BASELINES)
"""Names of the columns computed without the reference's knowledge: the controls of the reference lift."""

REFERENCE, CONTROL, REFERENCE_VARIANT, BASELINE, OTHER_REFERENCE = KINDS = (
    "reference", "control", "reference variant", "baseline", "other reference")

LIFT_DEFINITION = (
    "AUC of a column computed with the reference's knowledge minus the highest AUC-either-sign max(AUC, 1 - AUC) among the "
    f"recorded columns computed without it (controls {', '.join(CONTROLS)} and the target's own loss score_loss); "
    "a lift <= 0 shows no measurable effect of the reference")
"""The reference lift in one sentence (reports print it)."""


def control_column(name: str) -> str:
    """The column of control ``name`` (``"zero"`` -> ``"score_zero"``); ``ValueError`` for a bad name."""
    if not isinstance(name, str) or not CONTROL_NAME.fullmatch(name):
        raise ValueError(f"control name {name!r} is not valid: use lower-case letters, digits and '_' (e.g. 'zero', 'init'); "
                         f"its column is {CONTROL_PREFIX}<name>")
    return CONTROL_PREFIX + name


def control_name(column: str) -> str | None:
    """The name of an optional ``score_<name>`` column; ``None`` for any other column."""
    if isinstance(column, str) and column.startswith(CONTROL_PREFIX) and CONTROL_NAME.fullmatch(column[len(CONTROL_PREFIX):]):
        return column[len(CONTROL_PREFIX):]
    return None


def _score_name(column: str) -> str:
    """``""`` for ``score``, ``<name>`` for ``score_<name>``; ``ValueError`` for any other column."""
    if column == PRIMARY:
        return ""
    name = control_name(column)
    if name is None:
        raise ValueError(f"{column!r} is not a score column ({PRIMARY} or {CONTROL_PREFIX}<name>)")
    return name


def column_kind(column: str) -> str:
    """The kind of a score column (one of :data:`KINDS`): ``score_zero`` -> ``control``, ``score_laion`` -> ``other reference``."""
    name = _score_name(column)
    if not name:
        return REFERENCE
    if name in CONTROLS:
        return CONTROL
    if name in REFERENCE_VARIANTS:
        return REFERENCE_VARIANT
    if name in BASELINES:
        return BASELINE
    return OTHER_REFERENCE


def uses_reference(column: str) -> bool:
    """Whether a score column was computed with the reference's knowledge (False: a control of the reference lift)."""
    return _score_name(column) not in WITHOUT_REFERENCE


def _defined(value) -> bool:
    return value is not None and not (isinstance(value, float) and math.isnan(value))


def reference_lift(values: Mapping[str, float | None], *, controls: Iterable[str] | None = None, either_sign: bool = True) -> dict:
    """The reference lift of every reference-derived column of ``values``.

    ``values``: per score column, its detection figure (ROC-AUC of the noisy samples; or an F1
    at the same kept fraction, with ``either_sign=False``), None or NaN where undefined.
    ``controls``: the columns that count as controls; default: those of ``values`` computed
    without the reference's knowledge (:func:`uses_reference` False). ``either_sign``: a
    control's value counts as ``max(v, 1 - v)``.

    Returns ``controls`` (the controls with a value), ``best_control`` and its
    ``best_control_value`` (None without any), and ``lifts``: for every other column of
    ``values``, its value minus ``best_control_value`` (None where either is undefined).
    """
    names = list(values)
    control_set = [c for c in names if not uses_reference(c)] if controls is None else [c for c in controls if c in values]
    present = {c: values[c] for c in control_set if _defined(values[c])}
    counted = {c: max(v, 1.0 - v) if either_sign else v for c, v in present.items()}
    best = max(counted, key=counted.get) if counted else None
    best_value = None if best is None else float(counted[best])
    lifts = {c: float(values[c]) - best_value if best_value is not None and _defined(values[c]) else None
             for c in names if c not in control_set}
    return {"controls": list(present), "best_control": best, "best_control_value": best_value, "lifts": lifts}
