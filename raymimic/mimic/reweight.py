"""Re-weighting every layer, not only the mimic layer (an option; the default touches one layer).

Sample i's own-path gradient of any tower parameter is what flows back through its outputs
(logits, or CLIP features). Scaling each sample's output gradient by ``c_i = B * w_i`` and
back-propagating again therefore gives ``sum_i w_i g_i`` for every parameter the outputs
depend on, at the price of a second backward pass; ``c_i = 1`` reproduces the plain gradient.
Parameters the outputs do not reach (CLIP's ``logit_scale``) keep their plain gradient.
"""
from __future__ import annotations

from typing import Sequence

import torch
from torch import nn


class OutputGrads:
    """Keeps the gradients that reach per-sample output tensors (batch on dim 0) in a backward pass."""

    def __init__(self, *outputs: torch.Tensor):
        self.outputs = list(outputs)
        self.grads: list[torch.Tensor | None] = [None] * len(outputs)
        for index, output in enumerate(self.outputs):
            output.register_hook(self._keeper(index))

    def _keeper(self, index: int):
        def keep(grad: torch.Tensor) -> None:
            self.grads[index] = grad.detach()

        return keep


def reweighted_backward(model: nn.Module, captured: OutputGrads, weights: torch.Tensor, global_batch: int) -> None:
    """Replace ``model``'s gradients by ``sum_i w_i g_i`` through a second backward pass.

    ``captured`` holds the outputs of the first forward and the gradients the first backward
    (run with ``retain_graph=True``) sent to them; ``weights`` are this rank's samples' weights.
    """
    if any(g is None for g in captured.grads):
        raise RuntimeError("run the first backward (retain_graph=True) before re-weighting all layers")
    params = [p for p in model.parameters() if p.requires_grad]
    plain = {p: p.grad for p in params}
    for p in params:
        p.grad = None
    coeffs = weights.detach().float() * global_batch
    scaled = [g * coeffs.to(g.device, g.dtype).reshape(-1, *([1] * (g.ndim - 1))) for g in captured.grads]
    torch.autograd.backward(captured.outputs, scaled)
    for p in params:
        if p.grad is None:  # not reached through the per-sample outputs: keep its plain gradient
            p.grad = plain[p]
