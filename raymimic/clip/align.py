"""Reference alignment for an open_clip mimic layer: capture both models' activations, align the weight.

:func:`align_reference` runs the target and the reference on the same batch, records the mimic
layer's inputs and outputs in each (every token, samples first), and calls
:func:`raymimic.mimic.align.align_weight`. Which map each side gets follows from what the side
is (:func:`side_methods`): the hidden units of an MLP (input of ``mlp.c_proj``, output of
``mlp.c_fc``) are matched by permutation, a residual stream or the joint embedding space by an
orthogonal (Procrustes) map.
"""
from __future__ import annotations

import contextlib

import torch
from torch import nn

from raymimic.mimic.align import Alignment, align_weight
from raymimic.mimic.params import get_parameter, unwrap
from raymimic.mimic.probe import MimicProbe


class _LayerIO(MimicProbe):
    """A probe that keeps the layer's input and output activations of a forward pass (no gradient needed)."""

    def _record(self, a: torch.Tensor, out: torch.Tensor, transposed: bool) -> None:
        if self._a is not None:
            raise RuntimeError(f"mimic layer {self.name!r} was used twice in one forward pass; alignment needs a layer used once")
        self.transposed = transposed
        self._a = self._to_samples(a.detach()).float()
        self.output = self._to_samples(out.detach()).float()


def side_methods(name: str) -> tuple[str, str]:
    """(input side, output side) alignment methods for the parameter ``name``."""
    if name.endswith("mlp.c_proj.weight"):
        return "permutation", "procrustes"
    if name.endswith("mlp.c_fc.weight"):
        return "procrustes", "permutation"
    return "procrustes", "procrustes"


@torch.no_grad()
def layer_activations(model: nn.Module, name: str, images: torch.Tensor, texts: torch.Tensor, batch_dim: int = 0,
                      autocast: contextlib.AbstractContextManager | None = None) -> tuple[torch.Tensor, torch.Tensor, bool]:
    """(inputs, outputs, bare) of the layer holding ``name`` on one batch: tokens x features each, float32."""
    probe = _LayerIO(unwrap(model), name, batch_dim=batch_dim)
    with autocast or contextlib.nullcontext(), probe.capture():
        model(images, texts)
    inputs, outputs = probe._a, probe.output
    return inputs.reshape(-1, inputs.shape[-1]), outputs.reshape(-1, outputs.shape[-1]), probe.transposed


def align_reference(target: nn.Module, reference: nn.Module, name: str, images: torch.Tensor, texts: torch.Tensor, *,
                    batch_dim: int = 0, methods: tuple[str, str] | None = None,
                    autocast: contextlib.AbstractContextManager | None = None) -> Alignment:
    """The reference's weight ``name`` in the target's basis, fitted on the activations of one batch."""
    target_in, target_out, bare = layer_activations(target, name, images, texts, batch_dim, autocast)
    ref_in, ref_out, _ = layer_activations(reference, name, images, texts, batch_dim, autocast)
    in_method, out_method = methods or side_methods(name)
    activations = {"ref_in": ref_in, "target_in": target_in, "ref_out": ref_out, "target_out": target_out}
    return align_weight(get_parameter(unwrap(reference), name), get_parameter(unwrap(target), name), activations, bare=bare,
                        in_method=in_method, out_method=out_method)
