"""One Stage-1 training step on one worker: the same code with 1 process or N.

forward (inside the probe) -> contrastive loss of the local rows against the GLOBAL batch
-> backward (DDP reduces every tensor except the mimic layer) -> per-sample statistics of
the local samples -> all-gather -> weights over the global batch (identical on every rank)
-> the mimic layer's gradient := all_reduce_SUM(local part of sum_i w_i g_i).

The mimic layer is excluded from DDP's reduction (:func:`exclude_from_ddp`) so that its
gradient is communicated once, already re-weighted, instead of averaged by DDP and then
overwritten (which would all-reduce it twice). All maths comes from :mod:`raymimic.mimic`.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn

from raymimic.clip.loss import grad_scale, per_sample_contrastive_loss
from raymimic.mimic import (
    MimicProbe,
    alignment,
    get_parameter,
    grad_norms,
    gram,
    make_weighting,
    mean_batch_grad,
    mimic_scores,
    reweighted_grad,
)


def world() -> tuple[int, int]:
    """(rank, world size); (0, 1) without a process group."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def gather_global(values: torch.Tensor) -> torch.Tensor:
    """Every rank's equally sized ``values`` concatenated in rank order (no gradient)."""
    _, size = world()
    if size == 1:
        return values
    parts = [torch.empty_like(values) for _ in range(size)]
    dist.all_gather(parts, values.contiguous())
    return torch.cat(parts)


def all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    if world()[1] > 1:
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor


def exclude_from_ddp(model: nn.Module, parameter_name: str) -> None:
    """Keep DDP from averaging the mimic layer: its gradient is re-weighted and summed by us."""
    from torch.nn.parallel import DistributedDataParallel

    DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(model, [parameter_name])


@dataclass
class StepResult:
    loss: torch.Tensor  # local mean loss (detached); its mean over ranks is the global loss
    local_scores: torch.Tensor  # raw mimic scores m_i of the local samples (NaN without reference)
    local_weights: torch.Tensor  # w_i of the local samples
    scores: torch.Tensor  # m_i of the global batch, rank order
    weights: torch.Tensor  # w_i of the global batch, rank order
    global_batch: int


class MimicStep:
    """Forward, backward and gradient re-weighting of one batch; the optimizer step stays outside.

    ``reference_weight`` is ``W_ref`` of the mimic layer (``V_t = W_ref - W_t`` is recomputed
    every call); ``reference_model`` is only needed by ``rho``. With ``weighting="sgd"`` and no
    reference the step is plain data-parallel training (no probe at all).
    """

    def __init__(
        self,
        model: nn.Module,
        mimic_name: str,
        weighting: str = "grad-mimic",
        tau: float = 0.05,
        score_kind: str = "proj",
        reference_weight: torch.Tensor | None = None,
        reference_model: nn.Module | None = None,
        batch_dim: int = 0,
        autocast: contextlib.AbstractContextManager | None = None,
    ):
        self.model = model
        self.mimic_name = mimic_name
        self.weighting = make_weighting(weighting, tau=tau)
        self.score_kind = score_kind
        self.reference_weight = reference_weight
        self.reference_model = reference_model
        self.autocast = autocast or contextlib.nullcontext()
        self.plain = weighting == "sgd" and reference_weight is None
        self.probe = None if self.plain else MimicProbe(model, mimic_name, batch_dim=batch_dim)
        self.parameter = get_parameter(model, mimic_name)
        if "ref_loss" in self.weighting.needs and reference_model is None:
            raise ValueError(f"weighting {weighting!r} needs the reference model's per-sample losses: pass reference_model")
        self.previous_mean_grad: torch.Tensor | None = None  # AGRA's comparison batch

    # -- the step -----------------------------------------------------------------------
    def __call__(self, images: torch.Tensor, texts: torch.Tensor) -> StepResult:
        rank, size = world()
        local = images.shape[0]
        batch = local * size
        capture = self.probe.capture() if self.probe is not None else contextlib.nullcontext()
        with self.autocast, capture:
            image_features, text_features, logit_scale = self.model(images, texts)[:3]
            losses = per_sample_contrastive_loss(image_features, text_features, logit_scale)
            loss = losses.mean()
        loss.backward()
        if self.plain:
            uniform = torch.full((local,), 1.0 / batch, device=images.device)
            nan = torch.full((local,), float("nan"), device=images.device)
            return StepResult(loss.detach(), nan, uniform, gather_global(nan), gather_global(uniform), batch)

        scale = grad_scale()
        local_scores = self._local_scores(batch, scale)
        stats = self._global_stats(images, texts, losses.detach(), local_scores, batch, scale)
        weights, local_weights = self._weights(stats, rank, local, batch)
        new_grad = reweighted_grad(self.probe, local_weights, batch, scale).float()
        self.parameter.grad = all_reduce_sum(new_grad).to(self.parameter.dtype)
        return StepResult(loss.detach(), local_scores, local_weights, stats["mimic"], weights, batch)

    # -- pieces ------------------------------------------------------------------------
    def direction(self) -> torch.Tensor:
        """``V_t = W_ref - W_t`` (float32), recomputed every step: one subtraction."""
        return self.reference_weight.to(self.parameter.device, torch.float32) - self.parameter.detach().float()

    def _local_scores(self, batch: int, scale: float) -> torch.Tensor:
        if self.reference_weight is None:
            return torch.full((self.probe.batch_size,), float("nan"), device=self.parameter.device)
        return mimic_scores(self.probe, self.direction(), batch, self.score_kind, scale)

    def _global_stats(self, images, texts, losses, local_scores, batch: int, scale: float) -> dict[str, torch.Tensor]:
        stats = {"mimic": gather_global(local_scores.float()), "batch_size": torch.tensor(batch)}
        needs = self.weighting.needs
        if "grad_norm" in needs:
            stats["grad_norm"] = gather_global(grad_norms(self.probe, batch, scale).float())
        if "align" in needs:
            current = all_reduce_sum(mean_batch_grad(self.probe, scale).float())
            if self.previous_mean_grad is None:  # first step: nothing to compare with, agree with all
                stats["align"] = torch.ones(batch, device=local_scores.device)
            else:
                stats["align"] = gather_global(alignment(self.probe, self.previous_mean_grad).float())
            self.previous_mean_grad = current
        if "loss" in needs:
            stats["loss"] = gather_global(losses.float())
        if "ref_loss" in needs:
            stats["ref_loss"] = gather_global(self._reference_losses(images, texts).float())
        if "gram" in needs:
            stats["gram"] = gram(self.probe, batch, scale)  # local samples only (see _weights)
        return stats

    def _reference_losses(self, images, texts) -> torch.Tensor:
        with torch.no_grad(), self.autocast:
            image_features, text_features, logit_scale = self.reference_model(images, texts)[:3]
            return per_sample_contrastive_loss(image_features, text_features, logit_scale)

    def _weights(self, stats, rank: int, local: int, batch: int) -> tuple[torch.Tensor, torch.Tensor]:
        device = stats["mimic"].device
        if "gram" in self.weighting.needs:
            # Grad-Match solves on the local Gram matrix only (the global one would need every
            # rank's per-sample gradients); local weights sum to local/batch so the global sum is 1.
            local_weights = self.weighting.weights(stats).to(device) * (local / batch)
            return gather_global(local_weights), local_weights
        weights = self.weighting.weights(stats).to(device).float()
        return weights, weights[rank * local:(rank + 1) * local]
