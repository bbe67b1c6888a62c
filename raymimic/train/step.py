"""One Stage-1 training step on one worker: the same code with 1 process or N.

forward (inside the probe) -> contrastive loss of the local rows against the GLOBAL batch
-> backward (DDP reduces every tensor except the mimic layer) -> per-sample statistics of
the local samples -> all-gather -> weights over the global batch (identical on every rank)
-> the mimic layer's gradient := all_reduce_SUM(local part of sum_i w_i g_i).

The mimic layer is excluded from DDP's reduction (:func:`exclude_from_ddp`) so that its
gradient is communicated once, already re-weighted, instead of averaged by DDP and then
overwritten (which would all-reduce it twice). With ``reweight_all`` the first pass only
computes the output gradients (no ``.grad``, so DDP does not reduce yet) and a second backward
of the re-weighted outputs gives every tensor ``sum_i w_i g_i``, reduced by DDP once
(:mod:`raymimic.mimic.reweight`). All maths comes from :mod:`raymimic.mimic`;
:func:`build_mimic_step` is the one place that turns run settings into a step (training and the
score-only pass both use it).
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Callable

import torch
import torch.distributed as dist
from torch import nn

from raymimic.clip.loss import grad_scale, per_sample_contrastive_loss
from raymimic.mimic import (
    MimicProbe,
    batch_weights,
    get_parameter,
    make_weighting,
    output_grads,
    reweighted_backward,
    reweighted_grad,
    weighting_stats,
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
    reference the step is plain data-parallel training (no probe at all). ``reweight_all``:
    every trainable tensor's gradient becomes ``sum_i w_i g_i`` (a second backward), not only
    the mimic layer's; tensors the features do not reach (the logit scale) keep the plain one.
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
        reweight_all: bool = False,
    ):
        self.model = model
        self.mimic_name = mimic_name
        self.weighting = make_weighting(weighting, tau=tau)
        self.score_kind = score_kind
        self.reference_weight = reference_weight
        self.reference_model = reference_model
        self.autocast = autocast or contextlib.nullcontext()
        self.plain = weighting == "sgd" and reference_weight is None
        self.reweight_all = reweight_all and not self.plain  # uniform weights: the plain backward is already it
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
            outputs = self.model(images, texts)[:3]  # image features, text features, logit scale
            losses = per_sample_contrastive_loss(*outputs)
            loss = losses.mean()
        if self.plain:
            loss.backward()
            uniform = torch.full((local,), 1.0 / batch, device=images.device)
            nan = torch.full((local,), float("nan"), device=images.device)
            return StepResult(loss.detach(), nan, uniform, gather_global(nan), gather_global(uniform), batch)
        if self.reweight_all:
            grads = output_grads(loss, outputs, through=[self.parameter])
        else:
            loss.backward()

        scale = grad_scale()
        direction = self.direction() if self.reference_weight is not None else None
        stats, mean_grad = weighting_stats(
            self.weighting, self.probe, direction, batch, scale, kind=self.score_kind, losses=losses.detach(),
            ref_losses=lambda: self._reference_losses(images, texts), align_with=self.previous_mean_grad,
            gather=gather_global, all_reduce=all_reduce_sum,
        )
        if mean_grad is not None:
            self.previous_mean_grad = mean_grad
        weights, local_weights = batch_weights(self.weighting, stats, rank, local, gather_global)
        # before any second backward: it would overwrite the output gradient the probe keeps
        new_grad = all_reduce_sum(reweighted_grad(self.probe, local_weights, batch, scale).float())
        if self.reweight_all:
            reweighted_backward(outputs[:2], grads[:2], local_weights, batch, shared=[(outputs[2], grads[2])])
        self.parameter.grad = new_grad.to(self.parameter.dtype)
        local_scores = stats["mimic"][rank * local:(rank + 1) * local]
        return StepResult(loss.detach(), local_scores, local_weights, stats["mimic"], weights, batch)

    # -- pieces ------------------------------------------------------------------------
    def direction(self) -> torch.Tensor:
        """``V_t = W_ref - W_t`` (float32), recomputed every step: one subtraction."""
        return self.reference_weight.to(self.parameter.device, torch.float32) - self.parameter.detach().float()

    def _reference_losses(self, images, texts) -> torch.Tensor:
        with torch.no_grad(), self.autocast:
            image_features, text_features, logit_scale = self.reference_model(images, texts)[:3]
            return per_sample_contrastive_loss(image_features, text_features, logit_scale)


def build_mimic_step(
    model: nn.Module,
    model_name: str,
    *,
    mimic_layer: str = "image-mlp",
    reference: str | nn.Module | None = None,
    weighting: str = "grad-mimic",
    tau: float = 0.05,
    score_kind: str = "proj",
    reweight_all: bool = False,
    device: str | torch.device = "cpu",
    autocast: contextlib.AbstractContextManager | None = None,
    wrap: Callable[[nn.Module], nn.Module] | None = None,
) -> tuple[MimicStep, str]:
    """``(step, mimic parameter name)`` for an open_clip ``model`` (created by the caller).

    Resolves ``mimic_layer`` (alias or parameter name), loads ``reference`` (spec of
    :func:`raymimic.clip.load_reference`, or a module) and keeps its mimic weight (and the whole
    reference model only for a weighting that needs reference losses). ``wrap`` (e.g. Ray
    Train's ``prepare_model``) wraps the model for data parallelism: with more than one process
    and scores to compute, the mimic layer is first excluded from DDP and afterwards broadcast
    from rank 0 (DDP does not broadcast ignored tensors).
    """
    from raymimic.clip import load_reference, resolve_mimic_layer, sample_dim

    name = resolve_mimic_layer(model, mimic_layer)
    reference_weight, reference_model = None, None
    if reference is not None:
        loaded = load_reference(reference, model_name, device=device)
        reference_weight = get_parameter(loaded, name).detach().clone()
        reference_model = loaded if "ref_loss" in make_weighting(weighting).needs else None
    scoring = reference is not None or weighting != "sgd"
    distributed = scoring and world()[1] > 1
    if distributed:
        exclude_from_ddp(model, name)
    wrapped = wrap(model) if wrap is not None else model
    if distributed:
        dist.broadcast(get_parameter(wrapped, name).data, src=0)
    step = MimicStep(wrapped, name, weighting, tau=tau, score_kind=score_kind, reference_weight=reference_weight,
                     reference_model=reference_model, batch_dim=sample_dim(model, name), autocast=autocast, reweight_all=reweight_all)
    return step, name
