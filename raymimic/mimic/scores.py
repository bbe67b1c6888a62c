"""Per-sample statistics of the mimic layer, scaled to the paper's definitions.

Conventions (docs/method.md, section 1): the batch loss ``L`` is a mean over the *global* batch of
size ``B``; sample i's gradient is ``g_i = B * G_i`` where ``G_i`` is its own-path
contribution to ``dL/dW``, so ``mean_i g_i`` is the batch gradient and uniform weights
reproduce standard training. ``grad_scale`` converts what the probe captured into ``dL/dy``
when the backward pass ran on a scaled loss (e.g. ``world_size * L`` under DDP averaging).
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch

from raymimic.mimic.probe import MimicProbe

SCORE_KINDS = ("proj", "cos")
_EPS = 1e-12


def mimic_scores(
    probe: MimicProbe,
    direction: torch.Tensor,
    global_batch: int,
    kind: str = "proj",
    grad_scale: float = 1.0,
) -> torch.Tensor:
    """``proj``: ``<-g_i, V>/||V||``; ``cos``: ``<-g_i, V>/(||g_i|| ||V||)``; one value per local sample."""
    if kind not in SCORE_KINDS:
        raise ValueError(f"score kind {kind!r} is not one of {SCORE_KINDS}")
    v_norm = direction.float().norm().clamp_min(_EPS)
    dot = probe.dot(direction)
    if kind == "proj":
        return -global_batch * grad_scale * dot / v_norm
    return -dot / (probe.sq_norms().clamp_min(0).sqrt().clamp_min(_EPS) * v_norm)


def direction_scores(
    probe: MimicProbe,
    directions: Mapping[str, torch.Tensor],
    global_batch: int,
    kind: str = "proj",
    grad_scale: float = 1.0,
) -> dict[str, torch.Tensor]:
    """:func:`mimic_scores` against several directions from one probe: ``{name: scores}``.

    One :meth:`~raymimic.mimic.probe.MimicProbe.dot` per direction; ``cos`` computes ``||g_i||``
    once for all of them. Each value equals ``mimic_scores(probe, V, ...)`` for its ``V``.
    """
    if kind not in SCORE_KINDS:
        raise ValueError(f"score kind {kind!r} is not one of {SCORE_KINDS}")
    if not directions:
        return {}
    g_norms = probe.sq_norms().clamp_min(0).sqrt().clamp_min(_EPS) if kind == "cos" else None
    out = {}
    for name, direction in directions.items():
        v_norm = direction.float().norm().clamp_min(_EPS)
        dot = probe.dot(direction)
        out[name] = -global_batch * grad_scale * dot / v_norm if kind == "proj" else -dot / (g_norms * v_norm)
    return out


def joint_mimic_scores(
    probes: Sequence[MimicProbe],
    directions: Sequence[torch.Tensor],
    global_batch: int,
    grad_scale: float = 1.0,
) -> torch.Tensor:
    """``proj`` score against several layers at once: ``sum_l <-g_i^l, V^l> / sqrt(sum_l ||V^l||^2)``.

    The inner product of the layers' matrices side by side is the sum of the layers' inner
    products, so one backward pass (one probe per layer) scores every sample against all of them.
    """
    if len(probes) != len(directions) or not probes:
        raise ValueError(f"need one direction per probe, got {len(probes)} probes and {len(directions)} directions")
    norm = torch.stack([d.float().norm() for d in directions]).norm().clamp_min(_EPS)
    dots = sum(probe.dot(direction) for probe, direction in zip(probes, directions))
    return -global_batch * grad_scale * dots / norm


def grad_norms(probe: MimicProbe, global_batch: int, grad_scale: float = 1.0) -> torch.Tensor:
    """``||g_i||`` of the mimic layer for every local sample (GraNd restricted to that layer)."""
    return global_batch * abs(grad_scale) * probe.sq_norms().clamp_min(0).sqrt()


def alignment(probe: MimicProbe, comparison: torch.Tensor) -> torch.Tensor:
    """``cos(g_i, comparison)``: AGRA's agreement with another batch's mean gradient."""
    dot = probe.dot(comparison)
    return dot / (probe.sq_norms().clamp_min(0).sqrt().clamp_min(_EPS) * comparison.float().norm().clamp_min(_EPS))


def gram(probe: MimicProbe, global_batch: int, grad_scale: float = 1.0) -> torch.Tensor:
    """``<g_i, g_j>`` between the local samples (Grad-Match)."""
    return (global_batch * grad_scale) ** 2 * probe.gram()


def reweighted_grad(probe: MimicProbe, weights: torch.Tensor, global_batch: int, grad_scale: float = 1.0) -> torch.Tensor:
    """``sum_i w_i g_i`` over the local samples, in the parameter's shape.

    Summed over all workers (all-reduce SUM) it is the global re-weighted gradient.
    """
    return probe.weighted_grad(weights * (global_batch * grad_scale))


def mean_batch_grad(probe: MimicProbe, grad_scale: float = 1.0) -> torch.Tensor:
    """The local part of the plain batch gradient ``dL/dW`` (uniform weights)."""
    return probe.weighted_grad(torch.full((probe.batch_size,), grad_scale))


def clean_gradient_direction(probe: MimicProbe, grad_scale: float = 1.0) -> torch.Tensor:
    """Approximate influence: ``V = -mean_j g_j`` over a few trusted (clean) samples.

    Run the probe on a batch of clean samples first; passing this ``V`` to
    :func:`mimic_scores` in place of ``W_ref - W`` scores each sample by how well its descent
    direction agrees with the clean samples' (``<g_i, gbar_clean>/||gbar_clean||``), with no
    reference model at all.
    """
    return -mean_batch_grad(probe, grad_scale).detach().float()
