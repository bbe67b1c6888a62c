"""Re-weighting every layer, not only the mimic layer (an option; the default touches one layer).

Sample i's own-path gradient of any parameter is what flows back through its own outputs
(logits, or CLIP features). Scaling each sample's output gradient by ``c_i = B * w_i`` and
back-propagating therefore gives ``sum_i w_i g_i`` for every parameter the outputs depend on;
``c_i = 1`` reproduces the plain gradient. Two passes:

1. :func:`output_grads`: ``d loss / d output`` of the plain batch loss, with the graph kept and
   nothing accumulated in any ``.grad`` (so DDP's gradient hooks do not fire); passing the mimic
   weight in ``through`` lets a :class:`~raymimic.mimic.probe.MimicProbe` see its output gradient.
2. :func:`reweighted_backward`: one backward of the per-sample outputs with scaled gradients;
   outputs shared by all samples (CLIP's logit scale) go back with their plain gradient. This is
   the only backward that accumulates ``.grad``, so DDP reduces each tensor exactly once.

When every sample's loss depends on its own outputs only (a classifier's cross-entropy, not
CLIP's contrastive loss), ``g_i = d l_i / d theta`` and the second pass is simply the backward of
``sum_i w_i l_i`` (:func:`reweighted_loss_backward`, what the label-noise simulation uses).

Under DDP with CLIP's gathered loss (:mod:`raymimic.clip.loss`) the output gradients one rank
sees are ``world_size * dL/dy``: each rank's ``.grad`` is ``world_size * sum_{i local} w_i g_i``
and DDP's average over ranks is ``sum_i w_i g_i`` over the global batch, with no extra factor.
"""
from __future__ import annotations

from collections.abc import Sequence

import torch


def output_grads(loss: torch.Tensor, outputs: Sequence[torch.Tensor], through: Sequence[torch.Tensor] = ()) -> list[torch.Tensor]:
    """``d loss / d output`` for each of ``outputs`` (the graph is kept for :func:`reweighted_backward`).

    ``through``: tensors the pass must also reach (their gradients are discarded), e.g. the
    mimic weight so that a probe's hooks record the layer's output gradient.
    """
    grads = torch.autograd.grad(loss, [*outputs, *through], retain_graph=True, allow_unused=True)
    missing = [i for i, g in enumerate(grads[:len(outputs)]) if g is None]
    if missing:
        raise ValueError(f"outputs {missing} do not reach the loss: nothing to re-weight through them")
    return list(grads[:len(outputs)])


def reweighted_backward(outputs: Sequence[torch.Tensor], grads: Sequence[torch.Tensor], weights: torch.Tensor, global_batch: int,
                        shared: Sequence[tuple[torch.Tensor, torch.Tensor]] = ()) -> None:
    """Accumulate ``sum_i w_i g_i`` into the ``.grad`` of every parameter the per-sample ``outputs`` reach.

    ``outputs`` (batch on dim 0) and ``grads`` come from :func:`output_grads`; ``weights`` are
    this worker's samples' weights (``w_i`` of the global batch of ``global_batch`` samples);
    ``shared``: ``(output, plain gradient)`` pairs of outputs not indexed by sample.
    """
    coeffs = weights.detach().float() * global_batch
    scaled = [(g.float() * coeffs.to(g.device).reshape(-1, *([1] * (g.ndim - 1)))).to(g.dtype) for g in grads]
    torch.autograd.backward([*outputs, *(o for o, _ in shared)], [*scaled, *(g for _, g in shared)])


def reweighted_loss_backward(losses: torch.Tensor, weights: torch.Tensor) -> None:
    """Accumulate ``sum_i w_i g_i`` for per-sample ``losses`` that do not interact: the backward of ``sum_i w_i l_i``.

    Only for losses where sample i's loss depends on sample i's outputs alone (then its
    own-path gradient is ``d l_i / d theta``); run :func:`output_grads` (or a backward with
    ``retain_graph=True``) first if the graph is needed twice.
    """
    torch.autograd.backward(losses, weights.detach().to(losses.dtype))
