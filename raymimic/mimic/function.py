"""The function-space reference direction: how the mimic layer must move for the target to behave like the reference.

A weight difference ``W_ref - W_t`` only means something when both models' hidden units are in
one basis (the same initialisation). The function direction asks the reference's *outputs*
instead. On the current global batch of ``B`` pairs, with each model's L2-normalised image and
text features and its own exponentiated logit scale ``s``, row ``i`` of the similarity matrix
gives two distributions over the batch:

* image -> text: ``p_i = softmax_j(s_ref <I_ref_i, T_ref_j>)`` (reference), ``q_i = softmax_j(s_t <I_i, T_j>)`` (target);
* text -> image: the same with the roles of images and texts swapped.

The distillation loss is ``D = (1/B) sum_i d_i`` with ``d_i = (KL(p_i || q_i) + KL(p'_i || q'_i)) / 2``
(image -> text and text -> image, halved as in CLIP's loss), and the direction of a weight
matrix ``W`` of the target is ``V_fn = -dD/dW``: the way ``W`` must move, in the target's own
basis, for the target's similarity distributions to approach the reference's on this batch,
whatever the reference's initialisation or architecture. Sample ``i``'s score is then the
usual ``<-g_i, V_fn>/||V_fn||`` (:func:`raymimic.mimic.scores.mimic_scores`).

Distribution follows the contrastive loss's convention (:mod:`raymimic.clip.loss`): each worker
computes the rows of its local samples against the gathered global batch (``gather`` keeps the
gradient), back-propagates their mean, and the worker's gradient of ``W`` is ``world_size``
times its samples' share of ``dD/dW``; :func:`function_direction` sums the shares over workers
(``all_reduce``) and multiplies by ``grad_scale = 1/world_size``. In one process both callables
are the identity.

Inner products add across layers: :func:`function_directions` gives ``V_fn`` of several weight
matrices (the image and text towers' last MLPs, say) from one backward of ``D``, and
:func:`~raymimic.mimic.scores.joint_mimic_scores` scores the samples against all of them at once,
``<-g_i, V_fn>/||V_fn||`` with ``g_i`` and ``V_fn`` the layers' matrices side by side.

Cost: the reference's forward (no gradient) and one partial backward of ``D`` that stops at the
mimic layer (autograd walks only the layers above it).
"""
from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F

TensorFn = Callable[[torch.Tensor], torch.Tensor]


def _same(tensor: torch.Tensor) -> torch.Tensor:
    return tensor


def _row_kl(reference_logits: torch.Tensor, target_logits: torch.Tensor) -> torch.Tensor:
    """``KL(softmax(reference row) || softmax(target row))`` for every row."""
    log_p = F.log_softmax(reference_logits.float(), dim=-1)
    log_q = F.log_softmax(target_logits.float(), dim=-1)
    return (log_p.exp() * (log_p - log_q)).sum(dim=-1)


def distillation_losses(
    target: tuple[torch.Tensor, torch.Tensor, torch.Tensor],
    reference: tuple[torch.Tensor, torch.Tensor, torch.Tensor],
    gather: TensorFn = _same,
) -> torch.Tensor:
    """``d_i`` of every local sample, shape (local N,): the KL of the reference's batch softmax against the target's.

    ``target`` and ``reference`` are ``(image features, text features, logit scale)`` of the
    local samples as an open_clip model's forward returns them (features L2-normalised, scale
    exponentiated); ``gather`` concatenates every worker's features in rank order (with gradient
    for the target's). Rows are the local samples, columns the global batch.
    """
    image, text, scale = target
    ref_image, ref_text, ref_scale = reference
    all_image, all_text = gather(image), gather(text)
    ref_all_image, ref_all_text = gather(ref_image.detach()), gather(ref_text.detach())
    image_to_text = _row_kl(ref_scale.detach().float() * ref_image.float() @ ref_all_text.float().t(),
                            scale.float() * image.float() @ all_text.float().t())
    text_to_image = _row_kl(ref_scale.detach().float() * ref_text.float() @ ref_all_image.float().t(),
                            scale.float() * text.float() @ all_image.float().t())
    return 0.5 * (image_to_text + text_to_image)


def function_direction(
    losses: torch.Tensor,
    parameter: torch.Tensor,
    grad_scale: float = 1.0,
    all_reduce: TensorFn = _same,
) -> torch.Tensor:
    """``V_fn = -dD/dW`` of ``parameter`` (float32, its shape) from the local samples' :func:`distillation_losses`.

    Back-propagates ``losses.mean()`` to ``parameter`` alone, keeping the graph (the batch
    loss's backward follows) and touching no ``.grad``. A
    :class:`~raymimic.mimic.probe.MimicProbe` on the same layer records the output gradient of
    the latest backward: run this one before the batch loss's backward.
    """
    return function_directions(losses, [parameter], grad_scale, all_reduce)[0]


def function_directions(
    losses: torch.Tensor,
    parameters: Sequence[torch.Tensor],
    grad_scale: float = 1.0,
    all_reduce: TensorFn = _same,
) -> list[torch.Tensor]:
    """:func:`function_direction` of several weight matrices from one backward of ``D`` (one list entry each)."""
    grads = torch.autograd.grad(losses.mean(), list(parameters), retain_graph=True)
    return [-all_reduce(grad.detach().float()) * grad_scale for grad in grads]
