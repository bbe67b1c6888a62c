"""The per-sample statistics a weighting needs, and its weights: one place for training and the simulation.

A :class:`~raymimic.mimic.weighting.Weighting` declares what it ``needs``; :func:`weighting_stats`
computes exactly that from a :class:`~raymimic.mimic.probe.MimicProbe` after one ordinary
backward, and :func:`batch_weights` turns the statistics into weights. Distribution comes in as
two callables, so this stays plain torch: ``gather`` concatenates every worker's equally sized
local tensor in rank order and ``all_reduce`` sums a tensor over workers (both the identity in
one process).

* ``mimic`` is always computed (it is the score every run records; NaN without a direction);
* ``grad_norm``, ``align``, ``loss`` and ``ref_loss`` are gathered over the global batch;
* ``gram`` stays local: Grad-Match solves on its own samples' Gram matrix (the global one would
  need every worker's per-sample gradients), and :func:`batch_weights` scales the local
  solution so the global weights still sum to 1.
"""
from __future__ import annotations

from collections.abc import Callable

import torch

from raymimic.mimic.probe import MimicProbe
from raymimic.mimic.scores import alignment, grad_norms, gram, mean_batch_grad, mimic_scores
from raymimic.mimic.weighting import Weighting

TensorFn = Callable[[torch.Tensor], torch.Tensor]


def _same(tensor: torch.Tensor) -> torch.Tensor:
    return tensor


def _value(value):
    """A tensor, or a zero-argument callable computing it (only called when the statistic is needed)."""
    return value() if callable(value) else value


def weighting_stats(
    weighting: Weighting,
    probe: MimicProbe,
    direction: torch.Tensor | None,
    batch: int,
    scale: float = 1.0,
    *,
    kind: str = "proj",
    losses=None,
    ref_losses=None,
    align_with=None,
    gather: TensorFn = _same,
    all_reduce: TensorFn = _same,
) -> tuple[dict[str, torch.Tensor], torch.Tensor | None]:
    """``(stats, mean_grad)`` for ``weighting`` over a global batch of ``batch`` samples.

    ``direction``: ``V`` of the mimic score (``W_ref - W``), or ``None`` (scores are NaN).
    ``scale``: :func:`~raymimic.mimic.scores.mimic_scores`'s ``grad_scale`` (``1/world`` under DDP).
    ``losses`` / ``ref_losses``: the local samples' losses of the model / of the reference
    model, each a tensor or a callable evaluated only when the weighting needs it.
    ``align_with``: AGRA's comparison gradient of the mimic layer (tensor, callable or ``None``:
    then every sample agrees, as on a first step). ``mean_grad`` is this batch's mean gradient
    of the mimic layer summed over workers when the weighting needs ``align`` (the comparison
    of the next step), else ``None``.
    """
    device = probe.parameter.device
    if direction is None:
        local_scores = torch.full((probe.batch_size,), float("nan"), device=device)
    else:
        local_scores = mimic_scores(probe, direction, batch, kind, scale)
    stats = {"mimic": gather(local_scores.float()), "batch_size": torch.tensor(batch)}
    needs, mean_grad = weighting.needs, None
    if "grad_norm" in needs:
        stats["grad_norm"] = gather(grad_norms(probe, batch, scale).float())
    if "align" in needs:
        mean_grad = all_reduce(mean_batch_grad(probe, scale).float())
        comparison = _value(align_with)
        stats["align"] = torch.ones(batch, device=device) if comparison is None else gather(alignment(probe, comparison).float())
    if "loss" in needs:
        stats["loss"] = gather(_value(losses).float())
    if "ref_loss" in needs:
        stats["ref_loss"] = gather(_value(ref_losses).float())
    if "gram" in needs:
        stats["gram"] = gram(probe, batch, scale)  # local samples only (see batch_weights)
    return stats, mean_grad


def batch_weights(weighting: Weighting, stats: dict[str, torch.Tensor], rank: int = 0, local: int | None = None,
                  gather: TensorFn = _same) -> tuple[torch.Tensor, torch.Tensor]:
    """``(weights of the global batch in rank order, this worker's slice)`` from :func:`weighting_stats`'s stats.

    Every worker computes the same global weights from the same gathered statistics; Grad-Match
    (local Gram matrix) solves per worker with weights summing to ``local / batch``.
    """
    batch = stats["mimic"].shape[0]  # the global batch's scores (gathered): no host sync to read the size
    local = batch if local is None else local
    device = stats["mimic"].device
    if "gram" in weighting.needs:
        local_weights = weighting.weights(stats).to(device) * (local / batch)
        return gather(local_weights), local_weights
    weights = weighting.weights(stats).to(device).float()
    return weights, weights[rank * local:(rank + 1) * local]
