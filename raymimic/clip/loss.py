"""CLIP's contrastive loss with explicit distributed semantics.

Every rank computes the loss rows of its *local* samples against the *global* batch
(features all-gathered WITH gradient), as open_clip's ``local_loss=True,
gather_with_grad=True``. Summed over ranks these local losses are ``world_size * L`` with
``L`` the mean loss over the global batch; DDP's gradient averaging then yields exactly
``dL/dtheta``. Consequence for the mimic scores: the output gradients a rank's hooks see are
``world_size * dL/dy``, so scores use ``grad_scale = 1 / world_size`` (:func:`grad_scale`).
Sample i's role as a negative for every other sample reaches its own features through the
gather's backward (docs/method.md, section 2).
"""
from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F


def _distributed() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def grad_scale() -> float:
    """Factor from the output gradients one rank sees to ``dL/dy`` of the global mean loss."""
    return 1.0 / _distributed()[1]


# (process group, local batch size) pairs whose sizes every rank agreed on: checked once, not at every gather (a host sync)
_agreed_sizes: set[tuple[int, int]] = set()


def gather_with_grad(features: torch.Tensor) -> torch.Tensor:
    """All ranks' features concatenated in rank order; gradients flow back to their owners.

    Every rank must hold the same number of rows: checked (one collective and a host sync) the
    first time a local size is seen in a process group, not at every gather.
    """
    rank, world = _distributed()
    if world == 1:
        return features
    key = (id(dist.group.WORLD), features.shape[0])
    if key not in _agreed_sizes:
        sizes = [torch.zeros(1, dtype=torch.long, device=features.device) for _ in range(world)]
        dist.all_gather(sizes, torch.tensor([features.shape[0]], device=features.device))
        if len({int(s) for s in sizes}) != 1:
            raise ValueError(f"every worker needs the same local batch size; got {[int(s) for s in sizes]} (use drop_last batches)")
        _agreed_sizes.add(key)
    return AllGatherCat.apply(features)


# backends whose reduce-scatter the gather's backward uses; elsewhere an all-reduce and a slice (same sum, twice the traffic)
REDUCE_SCATTER_BACKENDS = ("nccl", "xccl")


class AllGatherCat(torch.autograd.Function):
    """``cat(all_gather(x))`` with autograd, on public ``torch.distributed`` collectives only.

    Replaces ``torch.distributed.nn.functional.all_gather``, deprecated in recent torch (a FutureWarning at every call).
    The backward sums every rank's gradient of the gathered tensor and keeps this rank's rows: a reduce-scatter on
    :data:`REDUCE_SCATTER_BACKENDS`, an all-reduce and a slice on the others (gloo, mpi).
    """

    @staticmethod
    def forward(ctx, features: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        features = features.contiguous()
        parts = [torch.empty_like(features) for _ in range(dist.get_world_size())]
        dist.all_gather(parts, features)
        return torch.cat(parts, dim=0)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        rank, world = dist.get_rank(), dist.get_world_size()
        n = grad.shape[0] // world
        if dist.get_backend() in REDUCE_SCATTER_BACKENDS:
            out = grad.new_empty((n, *grad.shape[1:]))
            # reduce_scatter_single in recent torch (where reduce_scatter_tensor warns as deprecated), the older name before
            reduce_scatter = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor
            reduce_scatter(out, grad.contiguous())
            return out
        total = grad.clone(memory_format=torch.contiguous_format)
        dist.all_reduce(total)
        return total[rank * n:(rank + 1) * n]


def per_sample_contrastive_loss(image_features: torch.Tensor, text_features: torch.Tensor, logit_scale: torch.Tensor) -> torch.Tensor:
    """Each local sample's symmetric InfoNCE loss against the global batch, shape (local N,).

    Features are expected L2-normalised and ``logit_scale`` already exponentiated, as an
    open_clip model's forward returns them.
    """
    rank, _ = _distributed()
    all_image = gather_with_grad(image_features)
    all_text = gather_with_grad(text_features)
    n = image_features.shape[0]
    labels = torch.arange(n, device=image_features.device) + rank * n
    logits_per_image = logit_scale * image_features @ all_text.t()
    logits_per_text = logit_scale * text_features @ all_image.t()
    return 0.5 * (F.cross_entropy(logits_per_image, labels, reduction="none") + F.cross_entropy(logits_per_text, labels, reduction="none"))


def contrastive_loss(image_features: torch.Tensor, text_features: torch.Tensor, logit_scale: torch.Tensor) -> torch.Tensor:
    """Mean of the local samples' losses: the quantity each rank back-propagates."""
    return per_sample_contrastive_loss(image_features, text_features, logit_scale).mean()
