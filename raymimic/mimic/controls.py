"""Control directions of the mimic score: what the same score gives without the reference's knowledge.

The ``proj`` score ``<-g_i, W_ref - W_t>/||V||`` always contains ``<g_i, W_t>/||V||``, a statistic
of the target model alone. A control scores every sample against another direction from the
same backward pass (one more :meth:`~raymimic.mimic.probe.MimicProbe.dot` each):

==========  ===========================  ==============================================
control     direction ``V_c``            isolates
==========  ===========================  ==============================================
``zero``    ``-W_t``                     the target-model term alone
``init``    ``W_0 - W_t``                a reference knowing nothing beyond initialisation
``random``  ``R - W_t``                  a reference of the right norm and no content
``fixed``   ``W_ref - W_0``              the reference's direction frozen at the start
``current`` ``W_ref - W_t``              the paper's direction (a control when the primary is ``fixed``)
other       ``W_ref' - W_t``             another reference
==========  ===========================  ==============================================

(``aligned``, ``W_ref`` brought into the target's basis minus ``W_t``, needs both models'
activations: :class:`raymimic.train.step.MimicStep` builds it with :mod:`raymimic.clip.align`.)

Pure tensors in, tensors out: :func:`make_control` builds one :class:`Control` from the tensors it
needs, :func:`control_directions` turns controls into directions at the current weights, and
:func:`~raymimic.mimic.scores.direction_scores` scores a probe against several directions.
"""
from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import torch

from raymimic.score_table import columns

# the controls make_control builds from tensors (the vocabulary's, but aligned: it needs both models' activations)
BUILTIN_CONTROLS = tuple(c for c in columns.BUILTIN_CONTROLS if c != columns.ALIGNED)
RANDOM_SEED_OFFSET = 1_000_003  # the random control's generator: seed + this (not the model-init stream)


@dataclass(frozen=True)
class Control:
    """``V = anchor - W_t`` when ``moving`` (``anchor`` None: ``-W_t``); ``V = anchor`` otherwise (a fixed direction)."""

    name: str
    anchor: torch.Tensor | None
    moving: bool = True

    def direction(self, current: torch.Tensor) -> torch.Tensor:
        """The direction at the current mimic weight ``current`` (float32, ``current``'s device)."""
        w = current.detach().float()
        if not self.moving:
            return self.anchor.to(w.device, torch.float32)
        if self.anchor is None:
            return -w
        return self.anchor.to(w.device, torch.float32) - w


def random_matrix(shape, norm: float, seed: int) -> torch.Tensor:
    """A standard-normal matrix from a CPU generator seeded with ``seed + RANDOM_SEED_OFFSET``, scaled to Frobenius ``norm``.

    The same on every device and every run with the same seed (a resumed run draws it again).
    """
    generator = torch.Generator().manual_seed(int(seed) + RANDOM_SEED_OFFSET)
    matrix = torch.randn(tuple(shape), generator=generator, dtype=torch.float32)
    return matrix * (float(norm) / matrix.norm().clamp_min(1e-12))


def make_control(name: str, *, reference: torch.Tensor | None = None, initial: torch.Tensor | None = None,
                 seed: int = 0, other: torch.Tensor | None = None) -> Control:
    """The control ``name`` (a built-in, or any other name with ``other`` = that reference's mimic weight).

    ``reference``: ``W_ref`` (``random`` takes its norm, ``fixed`` and ``current`` the matrix);
    ``initial``: ``W_0`` (``init``, ``fixed``); ``seed``: the random control's seed.
    """
    def need(tensor, what):
        if tensor is None:
            raise ValueError(f"control {name!r} needs {what}")
        return tensor.detach().float()

    if name == "zero":
        return Control(name, None)
    if name == "init":
        return Control(name, need(initial, "the initial mimic weight W_0").clone())
    if name == "random":
        ref = need(reference, "the reference weight (its norm)")
        return Control(name, random_matrix(ref.shape, float(ref.norm()), seed).to(ref.device))
    if name == "fixed":
        return Control(name, need(reference, "the reference weight") - need(initial, "the initial mimic weight W_0"), moving=False)
    if name == "current":
        return Control(name, need(reference, "the reference weight").clone())
    return Control(name, need(other, f"the mimic weight of reference {name!r}").clone())


def control_directions(controls: Mapping[str, Control], current: torch.Tensor) -> dict[str, torch.Tensor]:
    """``{name: V_c}`` at the current mimic weight, in the order of ``controls``."""
    return {name: control.direction(current) for name, control in controls.items()}
