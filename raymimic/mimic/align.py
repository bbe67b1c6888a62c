"""Bring a reference's mimic weight into the target's basis before ``V = W_ref - W_t`` means anything.

Two networks trained from different initialisations compute the same function with different
bases: hidden units after an elementwise non-linearity are defined only up to a permutation,
a residual stream or a joint embedding space only up to (about) a rotation. ``W_ref - W_t`` of a
hidden layer then mostly measures how unrelated the two bases are, not what the reference
learned. Alignment estimates, from the activations both models produce on the same inputs,
the map from each side of the reference's layer to the target's, and rewrites ``W_ref`` in the
target's basis:

- ``procrustes(source, target)``: the orthogonal ``Q`` minimising ``||source Q - target||_F``
  (``Q = U V^T`` from the SVD of ``source^T target``), for rotation-symmetric sides;
- ``match_units(source, target)``: the permutation (as a 0/1 matrix) maximising the summed
  correlation of matched units (Git Re-Basin's activation matching, solved exactly with the
  Hungarian method), for the hidden units of an MLP.

With ``x_t ~ x_r M_in`` and ``y_t ~ y_r M_out`` (inputs and outputs of the layer, rows = tokens),
the reference's map written in the target's basis is ``W' = M_out^T W M_in`` for an
``nn.Linear`` weight (out x in, ``y = x W^T``) and ``P' = M_in^T P M_out`` for a bare matrix
(in x out, ``y = x P``). Pure torch (the Hungarian step uses scipy); see
:mod:`raymimic.clip.align` for capturing the activations of an open_clip model.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

SIDE_METHODS = ("procrustes", "permutation", "identity")


def procrustes(source: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Orthogonal ``Q`` (d x d) minimising ``||source @ Q - target||_F``; rows of both are the same inputs."""
    _check_pair(source, target)
    u, _, vh = torch.linalg.svd(source.double().t() @ target.double())
    return (u @ vh).float()


def match_units(source: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Permutation matrix ``P`` (d x d, ``P[i, j] = 1`` matches source unit i to target unit j) maximising summed correlation."""
    from scipy.optimize import linear_sum_assignment

    _check_pair(source, target)
    correlation = _standardise(source).t() @ _standardise(target) / source.shape[0]
    rows, cols = linear_sum_assignment(correlation.double().cpu().numpy(), maximize=True)
    matrix = torch.zeros(source.shape[1], target.shape[1])
    matrix[torch.as_tensor(rows), torch.as_tensor(cols)] = 1.0
    return matrix


def fit_side(method: str, source: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """The map of one side of the layer, by ``method`` (one of :data:`SIDE_METHODS`)."""
    if method == "procrustes":
        return procrustes(source, target)
    if method == "permutation":
        return match_units(source, target)
    if method == "identity":
        return torch.eye(source.shape[1])
    raise ValueError(f"alignment method {method!r} is not one of {SIDE_METHODS}")


def map_weight(weight: torch.Tensor, in_map: torch.Tensor, out_map: torch.Tensor, bare: bool) -> torch.Tensor:
    """``weight`` rewritten in the target's basis: ``M_out^T W M_in`` (Linear) or ``M_in^T P M_out`` (bare ``x @ P``)."""
    w = weight.detach().float()
    in_map, out_map = in_map.to(w.device, torch.float32), out_map.to(w.device, torch.float32)
    return in_map.t() @ w @ out_map if bare else out_map.t() @ w @ in_map


def fit_quality(source: torch.Tensor, target: torch.Tensor, side_map: torch.Tensor) -> float:
    """R^2 of the matched activations: ``1 - ||source M - target||^2 / ||target - mean||^2`` (1 = identical bases)."""
    residual = (source.float() @ side_map.to(source.device, torch.float32) - target.float()).pow(2).sum()
    spread = (target.float() - target.float().mean(0)).pow(2).sum().clamp_min(1e-12)
    return float(1 - residual / spread)


def cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.detach().float().flatten(), b.detach().float().flatten()
    return float(a @ b / (a.norm() * b.norm()).clamp_min(1e-12))


@dataclass
class Alignment:
    """The aligned reference weight and how well the two bases matched."""

    weight: torch.Tensor  # W_ref in the target's basis, the parameter's shape
    in_fit: float  # R^2 of the input-side activation match
    out_fit: float  # R^2 of the output-side activation match
    cosine_before: float  # cos(W_ref, W_t)
    cosine_after: float  # cos(W_ref', W_t)

    def report(self) -> dict:
        return {"in_fit": self.in_fit, "out_fit": self.out_fit, "cosine_before": self.cosine_before, "cosine_after": self.cosine_after}


def align_weight(reference_weight: torch.Tensor, target_weight: torch.Tensor, activations: dict[str, torch.Tensor], *,
                 bare: bool, in_method: str = "procrustes", out_method: str = "procrustes") -> Alignment:
    """Align ``reference_weight`` to the target's basis from the layer's activations on the same inputs.

    ``activations``: ``ref_in``, ``target_in`` (tokens x in features) and ``ref_out``,
    ``target_out`` (tokens x out features); ``bare``: the weight is used as ``x @ P`` (in x out)
    rather than as an ``nn.Linear`` weight (out x in).
    """
    missing = {"ref_in", "target_in", "ref_out", "target_out"} - set(activations)
    if missing:
        raise ValueError(f"activations lack {sorted(missing)}")
    in_map = fit_side(in_method, activations["ref_in"], activations["target_in"])
    out_map = fit_side(out_method, activations["ref_out"], activations["target_out"])
    aligned = map_weight(reference_weight, in_map, out_map, bare)
    if tuple(aligned.shape) != tuple(target_weight.shape):
        raise ValueError(f"aligned reference weight {tuple(aligned.shape)} does not match the target's {tuple(target_weight.shape)}")
    return Alignment(
        weight=aligned,
        in_fit=fit_quality(activations["ref_in"], activations["target_in"], in_map),
        out_fit=fit_quality(activations["ref_out"], activations["target_out"], out_map),
        cosine_before=cosine(reference_weight, target_weight),
        cosine_after=cosine(aligned, target_weight),
    )


def _standardise(x: torch.Tensor) -> torch.Tensor:
    x = x.double()
    return (x - x.mean(0)) / x.std(0).clamp_min(1e-8)


def _check_pair(source: torch.Tensor, target: torch.Tensor) -> None:
    if source.ndim != 2 or source.shape != target.shape:
        raise ValueError(f"need two (samples x features) matrices of one shape, got {tuple(source.shape)} and {tuple(target.shape)}")
