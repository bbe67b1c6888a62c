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

Beside the primary score a step records, from the same backward pass, the score against each
*control* direction (:mod:`raymimic.mimic.controls`: one more ``probe.dot`` each) and, on
request, per-sample *baselines* (the target's loss, the reference's loss, RHO's reducible loss,
the reference's CLIPScore); both come back in :attr:`StepResult.extra` as ``score_<name>``
columns. Only the primary score drives the weights.

The *function* direction (:mod:`raymimic.mimic.function`: ``V_fn = -dD/dW`` of the loss ``D``
that matches the target's batch similarity distributions to the reference's) is either the
primary score's ``V`` (``direction="function"``) or a column ``score_function``; the step then
runs the reference's forward and, before the batch loss's backward, one partial backward of
``D`` down to the mimic layer, all-reduced over workers.

A control can also be the primary direction (``direction="aligned"``, ``"zero"``, ``"init"`` or
``"random"``): Grad-Mimic then re-weights along the aligned reference, or along a direction that
holds no reference at all (the control experiment of the re-weighting itself). The control's
column is recorded too and equals ``score``.

The *output-space* score (:func:`raymimic.mimic.output_scores`: the same question asked of the
batch's logits, the identity in place of the layer's kernel) is a column ``score_output`` only:
it has no weight-space vector to re-weight by. It needs the reference's forward (shared with
the function direction and the reference baselines) and no backward at all.
"""
from __future__ import annotations

import contextlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
import torch.distributed as dist
from torch import nn

from raymimic.clip.loss import gather_with_grad, grad_scale, per_sample_contrastive_loss
from raymimic.mimic import (
    Control,
    MimicProbe,
    batch_weights,
    control_directions,
    direction_scores,
    distillation_losses,
    function_direction,
    get_parameter,
    make_control,
    make_weighting,
    output_grads,
    output_scores,
    reweighted_backward,
    reweighted_grad,
    weighting_stats,
)
from raymimic.score_table.columns import ALIGNED, CONTROLS, FUNCTION, OUTPUT
from raymimic.score_table.columns import BASELINES as BASELINE_NAMES
from raymimic.score_table.columns import REFERENCE_BASELINES as _REFERENCE_BASELINES  # need the reference model's forward

CONTROL_DIRECTIONS = (ALIGNED, *CONTROLS)
"""Controls that can also be the primary score's direction (the step then records the control's column as well)."""
STEP_DIRECTIONS = ("current", "fixed", FUNCTION, *CONTROL_DIRECTIONS)


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
    # score_<name> column -> values of the local samples (controls, then baselines), and of the global batch
    local_extra: dict[str, torch.Tensor] = field(default_factory=dict)
    extra: dict[str, torch.Tensor] = field(default_factory=dict)


class MimicStep:
    """Forward, backward and gradient re-weighting of one batch; the optimizer step stays outside.

    ``reference_weight`` is ``W_ref`` of the mimic layer; ``direction`` says the primary score's
    ``V``: ``"current"`` recomputes ``V_t = W_ref - W_t`` every call (the paper), ``"fixed"`` keeps
    ``W_ref - W_0``, ``"function"`` takes ``V_fn = -dD/dW`` of this batch (needs ``reference_model``).
    ``"aligned"``, ``"zero"``, ``"init"`` or ``"random"`` take that control's direction (added to ``controls`` when absent).
    ``initial_weight`` is ``W_0`` (default: the mimic weight when the step is built; a resumed run
    passes the one of its first attempt). ``reference_model`` is only needed
    by ``rho`` and the reference baselines. With ``weighting="sgd"``, no reference and no controls
    the step is plain data-parallel training (no probe at all). ``reweight_all``: every trainable
    tensor's gradient becomes ``sum_i w_i g_i`` (a second backward), not only the mimic layer's;
    tensors the features do not reach (the logit scale) keep the plain one.

    ``controls``: built-in control names (``zero``, ``init``, ``random``, ``fixed``, ``current``,
    built here from ``reference_weight``, ``initial_weight`` and ``seed``; ``function``: ``V_fn``, and
    ``output``: the output-space score, both from ``reference_model``) or ready
    :class:`~raymimic.mimic.controls.Control` objects (another reference); each adds a column
    ``score_<name>`` of the same score kind. ``baselines``: ``loss`` (``score_loss = -loss``),
    ``ref_loss`` (``-ref_loss``), ``rho`` (``loss - ref_loss``), ``ref_clipscore`` (cosine of the
    reference's image and text embeddings); higher always means more likely to keep.
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
        *,
        direction: str = "current",
        initial_weight: torch.Tensor | None = None,
        controls: Sequence[str | Control] = (),
        baselines: Sequence[str] = (),
        seed: int = 0,
        align_every: int | None = None,
    ):
        self.model = model
        self.mimic_name = mimic_name
        self.weighting = make_weighting(weighting, tau=tau)
        self.score_kind = score_kind
        self.reference_weight = reference_weight
        self.reference_model = reference_model
        self.autocast = autocast or contextlib.nullcontext()
        self.parameter = get_parameter(model, mimic_name)
        if direction == OUTPUT:
            raise ValueError(f"direction {OUTPUT!r} has no weight-space vector to score or re-weight by: record it as a column "
                             f"with controls=[..., {OUTPUT!r}]; direction is one of {STEP_DIRECTIONS}")
        if direction not in STEP_DIRECTIONS:
            raise ValueError(f"direction {direction!r} is not one of {STEP_DIRECTIONS}")
        if direction in CONTROL_DIRECTIONS and direction not in [c if isinstance(c, str) else c.name for c in controls]:
            controls = [*controls, direction]
        if direction == "fixed" and reference_weight is None:
            raise ValueError("direction 'fixed' (W_ref - W_0) needs reference_weight")
        if FUNCTION in (direction, *controls) and reference_model is None:
            raise ValueError("the function direction (V_fn = -dD/dW) needs the reference model's forward: pass reference_model")
        if OUTPUT in controls and reference_model is None:
            raise ValueError("the output-space score (control 'output') needs the reference model's forward: pass reference_model")
        self.direction_kind = direction
        unknown = [b for b in baselines if b not in BASELINE_NAMES]
        if unknown:
            raise ValueError(f"unknown baseline(s) {unknown}; choose from {BASELINE_NAMES}")
        self.baselines = tuple(baselines)
        names = [c if isinstance(c, str) else c.name for c in controls]
        needs_initial = direction == "fixed" or any(n in ("init", "fixed") for n in names)
        if needs_initial and initial_weight is None:
            initial_weight = self.parameter.detach().float().clone()
        self.initial_weight = initial_weight.detach().float() if needs_initial else None  # W_0: saved in checkpoints
        self.controls: dict[str, Control] = {}
        # FUNCTION and OUTPUT are not Controls (they need the batch's outputs): their columns follow the others
        self.function_control = any(isinstance(c, str) and c == FUNCTION for c in controls)
        self.output_control = any(isinstance(c, str) and c == OUTPUT for c in controls)
        # the step refits "aligned" itself only when asked by name; a ready Control of that name stays as given
        self.align_every, self.alignment, self._calls, self._aligning = align_every, None, 0, False
        self.batch_dim = batch_dim
        for control in controls:
            if control in (FUNCTION, OUTPUT):
                if sum(1 for c in controls if isinstance(c, str) and c == control) > 1:
                    raise ValueError(f"control {control!r} given twice")
                continue
            if control == ALIGNED:
                if reference_weight is None or reference_model is None:
                    raise ValueError("control 'aligned' needs the reference weight and the reference model (its activations)")
                if align_every is None or align_every < 1:
                    raise ValueError(f"control 'aligned' needs align_every >= 1 (steps between re-alignments), got {align_every}")
                control = make_control(ALIGNED, other=reference_weight)  # replaced by the aligned weight at the first step
                self._aligning = True
            if isinstance(control, str):
                control = make_control(control, reference=reference_weight, initial=self.initial_weight, seed=seed)
            if control.name in self.controls or control.name in (FUNCTION, OUTPUT):
                raise ValueError(f"control {control.name!r} given twice")
            self.controls[control.name] = control
        self._fixed_direction = (reference_weight.float() - self.initial_weight.to(reference_weight.device)
                                 if direction == "fixed" else None)
        self.plain = weighting == "sgd" and reference_weight is None and not self.controls and not self._needs_function(direction)
        self.reweight_all = reweight_all and not self.plain  # uniform weights: the plain backward is already it
        self.probe = None if self.plain else MimicProbe(model, mimic_name, batch_dim=batch_dim)
        needs_reference = "ref_loss" in self.weighting.needs or any(b in _REFERENCE_BASELINES for b in self.baselines)
        if needs_reference and reference_model is None:
            raise ValueError(f"weighting {weighting!r} / baselines {list(self.baselines)} need the reference model's forward: "
                             "pass reference_model")
        self.previous_mean_grad: torch.Tensor | None = None  # AGRA's comparison batch
        self._reference_cache: tuple[tuple[torch.Tensor, ...], torch.Tensor, torch.Tensor] | None = None

    @property
    def extra_names(self) -> list[str]:
        """The names of the ``score_<name>`` columns this step returns: controls, then baselines."""
        return [*self.controls, *([FUNCTION] if self.function_control else []), *([OUTPUT] if self.output_control else []),
                *self.baselines]

    # -- the step -----------------------------------------------------------------------
    def __call__(self, images: torch.Tensor, texts: torch.Tensor) -> StepResult:
        rank, size = world()
        local = images.shape[0]
        batch = local * size
        self._reference_cache = None
        if self._aligning and self._calls % self.align_every == 0:
            self._realign(images, texts)
        self._calls += 1
        capture = self.probe.capture() if self.probe is not None else contextlib.nullcontext()
        with self.autocast, capture:
            outputs = self.model(images, texts)[:3]  # image features, text features, logit scale
            losses = per_sample_contrastive_loss(*outputs)
            loss = losses.mean()
        # before any backward of the batch loss: the probe keeps the output gradient of the latest backward
        function_v = self._function_direction(outputs, images, texts) if self._needs_function(self.direction_kind) else None
        output_column = {OUTPUT: self._output_scores(outputs, images, texts)} if self.output_control else {}  # no backward
        if self.plain:
            loss.backward()
            uniform = torch.full((local,), 1.0 / batch, device=images.device)
            nan = torch.full((local,), float("nan"), device=images.device)
            local_extra, extra = self._extra(output_column, losses.detach(), images, texts)
            return StepResult(loss.detach(), nan, uniform, gather_global(nan), gather_global(uniform), batch, local_extra, extra)
        if self.reweight_all:
            grads = output_grads(loss, outputs, through=[self.parameter])
        else:
            loss.backward()

        scale = grad_scale()
        # controls come from the same probe, before any second backward; they never touch the weights
        directions = control_directions(self.controls, self.parameter)
        if self.direction_kind == FUNCTION:
            direction = function_v
        elif self.direction_kind in CONTROL_DIRECTIONS:
            direction = directions[self.direction_kind]
        else:
            direction = self.direction() if self.reference_weight is not None else None
        stats, mean_grad = weighting_stats(
            self.weighting, self.probe, direction, batch, scale, kind=self.score_kind, losses=losses.detach(),
            ref_losses=lambda: self._reference_losses(images, texts), align_with=self.previous_mean_grad,
            gather=gather_global, all_reduce=all_reduce_sum,
        )
        if mean_grad is not None:
            self.previous_mean_grad = mean_grad
        if self.function_control:
            directions[FUNCTION] = function_v
        controls = {**direction_scores(self.probe, directions, batch, self.score_kind, scale), **output_column}
        local_extra, extra = self._extra(controls, losses.detach(), images, texts)
        weights, local_weights = batch_weights(self.weighting, stats, rank, local, gather_global)
        # before any second backward: it would overwrite the output gradient the probe keeps
        new_grad = all_reduce_sum(reweighted_grad(self.probe, local_weights, batch, scale).float())
        if self.reweight_all:
            reweighted_backward(outputs[:2], grads[:2], local_weights, batch, shared=[(outputs[2], grads[2])])
        self.parameter.grad = new_grad.to(self.parameter.dtype)
        local_scores = stats["mimic"][rank * local:(rank + 1) * local]
        return StepResult(loss.detach(), local_scores, local_weights, stats["mimic"], weights, batch, local_extra, extra)

    # -- pieces ------------------------------------------------------------------------
    def _needs_function(self, direction: str) -> bool:
        return direction == FUNCTION or self.function_control

    def _realign(self, images: torch.Tensor, texts: torch.Tensor) -> None:
        """Fit the ``aligned`` control's weight on rank 0's batch (a Hungarian assignment, rank 0 only) and broadcast it."""
        from raymimic.clip.align import align_reference
        from raymimic.mimic.params import unwrap

        rank, size = world()
        if rank == 0:
            fit = align_reference(unwrap(self.model), self.reference_model, self.mimic_name, images, texts,
                                  batch_dim=self.batch_dim, autocast=self.autocast)
            weight = fit.weight.to(self.parameter.device, torch.float32).contiguous()
            self.alignment = fit.report()
        else:
            weight = torch.empty(self.parameter.shape, device=self.parameter.device, dtype=torch.float32)
        if size > 1:
            dist.broadcast(weight, src=0)
        self.controls[ALIGNED] = make_control(ALIGNED, other=weight)

    def direction(self) -> torch.Tensor:
        """The weight-space ``V`` (float32): ``W_ref - W_t`` recomputed every step (one subtraction), or ``W_ref - W_0``."""
        if self._fixed_direction is not None:
            return self._fixed_direction.to(self.parameter.device)
        return self.reference_weight.to(self.parameter.device, torch.float32) - self.parameter.detach().float()

    def _reference_outputs(self, images, texts) -> tuple[torch.Tensor, torch.Tensor]:
        """The reference model's per-sample losses (local rows vs the global batch) and pair cosines; one forward per step."""
        return self._reference_forward(images, texts)[1:]

    def _reference_forward(self, images, texts) -> tuple[tuple[torch.Tensor, ...], torch.Tensor, torch.Tensor]:
        """``((image features, text features, logit scale), losses, cosines)`` of the reference, cached for the step."""
        if self._reference_cache is None:
            with torch.no_grad(), self.autocast:
                image_features, text_features, logit_scale = self.reference_model(images, texts)[:3]
                losses = per_sample_contrastive_loss(image_features, text_features, logit_scale)
            cosines = torch.nn.functional.cosine_similarity(image_features.float(), text_features.float(), dim=-1)
            self._reference_cache = ((image_features, text_features, logit_scale), losses.float(), cosines)
        return self._reference_cache

    def _function_direction(self, outputs, images, texts) -> torch.Tensor:
        """``V_fn = -dD/dW`` of the mimic layer on the global batch (:mod:`raymimic.mimic.function`), the same on every rank."""
        losses = distillation_losses(tuple(outputs), self._reference_forward(images, texts)[0], gather=gather_with_grad)
        return function_direction(losses, self.parameter, grad_scale(), all_reduce_sum)

    def _output_scores(self, outputs, images, texts) -> torch.Tensor:
        """The output-space score of the local samples (:func:`raymimic.mimic.output_scores`); no backward, no ``.grad``."""
        return output_scores(tuple(outputs), self._reference_forward(images, texts)[0], first_index=world()[0] * images.shape[0],
                             kind=self.score_kind, gather=gather_global, all_reduce=all_reduce_sum)

    def _reference_losses(self, images, texts) -> torch.Tensor:
        return self._reference_outputs(images, texts)[0]

    def _extra(self, controls: dict[str, torch.Tensor], losses: torch.Tensor, images, texts):
        """``score_<name>`` columns (controls, then baselines) of the local samples and, gathered in one collective, the global batch."""
        values = dict(controls)
        for name in self.baselines:
            if name == "loss":
                values[name] = -losses.float()  # small-loss selection: low loss = keep
            elif name == "ref_loss":
                values[name] = -self._reference_outputs(images, texts)[0]
            elif name == "rho":  # RHO-loss keeps high reducible loss: learnable, not yet learnt
                values[name] = losses.float() - self._reference_outputs(images, texts)[0]
            else:  # ref_clipscore
                values[name] = self._reference_outputs(images, texts)[1]
        if not values:
            return {}, {}
        columns = [f"score_{name}" for name in values]
        local = torch.stack([v.float() for v in values.values()], dim=1)
        gathered = gather_global(local)
        return dict(zip(columns, local.unbind(1))), dict(zip(columns, gathered.unbind(1)))


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
    direction: str = "current",
    controls: Sequence[str | tuple[str, str | None]] = (),
    baselines: Sequence[str] = (),
    initial_weight: torch.Tensor | None = None,
    seed: int = 0,
    align_every: int | None = None,
) -> tuple[MimicStep, str]:
    """``(step, mimic parameter name)`` for an open_clip ``model`` (created by the caller).

    Resolves ``mimic_layer`` (alias or parameter name), loads ``reference`` (spec of
    :func:`raymimic.clip.load_reference`, or a module) and keeps its mimic weight (and the whole
    reference model only for a weighting or baseline that needs its forward). ``wrap`` (e.g. Ray
    Train's ``prepare_model``) wraps the model for data parallelism: with more than one process
    and scores to compute, the mimic layer is first excluded from DDP and afterwards broadcast
    from rank 0 (DDP does not broadcast ignored tensors), and so is ``W_0``.

    ``controls``: built-in control names, or ``(NAME, SPEC)`` pairs (as
    :func:`raymimic.train.config.parse_control` splits a run's entries; a ``None`` SPEC is a
    built-in name): that other reference is loaded with the same loader and only its mimic weight
    kept; ``initial_weight``: ``W_0`` of the run (default: the mimic weight now; a
    resumed run passes its saved one); ``seed``: the ``random`` control's seed; ``align_every``:
    steps between re-alignments of the ``aligned`` control (which keeps the reference model).
    """
    from raymimic.clip import load_reference, resolve_mimic_layer, sample_dim
    from raymimic.mimic import make_control

    name = resolve_mimic_layer(model, mimic_layer)
    reference_weight, reference_model = None, None
    entries = [(entry, None) if isinstance(entry, str) else tuple(entry) for entry in controls]
    needs_forward = ("ref_loss" in make_weighting(weighting).needs or any(b in _REFERENCE_BASELINES for b in baselines)
                     or (ALIGNED, None) in entries or direction in (FUNCTION, ALIGNED)
                     or (FUNCTION, None) in entries or (OUTPUT, None) in entries)
    if reference is not None:
        loaded = load_reference(reference, model_name, device=device)
        reference_weight = get_parameter(loaded, name).detach().clone()
        reference_model = loaded if needs_forward else None
    built: list[str | Control] = []
    for control, spec in entries:
        if spec is None:
            built.append(control)
        else:  # another reference: only its mimic weight stays
            other = get_parameter(load_reference(spec, model_name, device=device), name).detach().float().clone()
            built.append(make_control(control, other=other))
    scoring = reference is not None or weighting != "sgd" or bool(built)
    distributed = scoring and world()[1] > 1
    if initial_weight is None:
        initial_weight = get_parameter(model, name).detach().float().clone()
    initial_weight = initial_weight.detach().float().to(device).clone()
    if distributed:
        exclude_from_ddp(model, name)
    wrapped = wrap(model) if wrap is not None else model
    if distributed:
        dist.broadcast(get_parameter(wrapped, name).data, src=0)
        dist.broadcast(initial_weight, src=0)
    step = MimicStep(wrapped, name, weighting, tau=tau, score_kind=score_kind, reference_weight=reference_weight,
                     reference_model=reference_model, batch_dim=sample_dim(model, name), autocast=autocast, reweight_all=reweight_all,
                     direction=direction, initial_weight=initial_weight, controls=built, baselines=baselines, seed=seed,
                     align_every=align_every)
    return step, name
