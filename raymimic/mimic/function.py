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

**The output-space score** (:func:`output_scores`). Every weight-space score of a layer is an
inner product in the outputs through that layer's kernel: with ``Z`` the batch's logits, ``J``
their Jacobian in ``W``, ``e_i = dL_i/dZ`` and ``d = dD/dZ``, ``g_i = J^T e_i`` and
``V_fn = -J^T d``, so ``<-g_i, V_fn> = e_i^T (J J^T) d``. The output-space score replaces the
kernel ``J J^T`` by the identity: ``<e_i, d>/||d||``, whether descending sample ``i``'s loss moves
the target's batch logits the way distillation towards the reference would, in no basis at all.
The outputs are each worker's two logit matrices of its local rows against the global batch,
``R = s_t I_local T^T`` (image -> text) and ``C = s_t T_local I^T`` (text -> image); with ``q``,
``q'`` the target's row softmaxes, ``p``, ``p'`` the reference's and ``e_i`` the one-hot of sample
``i``'s global index, ``dL_i/dR_i = (q_i - e_i)/2``, ``dD/dR_i = (q_i - p_i)/(2B)`` (the same for
``C``), and every other row of ``dL_i/dZ`` is zero. No backward runs: the closed form needs
only both models' features and scales, and ``||d||`` over the global batch is one all-reduce of
a scalar (no ``grad_scale``: nothing is back-propagated).
"""
from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F

from raymimic.mimic.scores import SCORE_KINDS

TensorFn = Callable[[torch.Tensor], torch.Tensor]
_EPS = 1e-12  # a zero ||d|| (the target already matches the reference) gives scores of 0, not NaN


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


def output_scores(
    target: tuple[torch.Tensor, torch.Tensor, torch.Tensor],
    reference: tuple[torch.Tensor, torch.Tensor, torch.Tensor],
    first_index: int = 0,
    kind: str = "proj",
    gather: TensorFn = _same,
    all_reduce: TensorFn = _same,
) -> torch.Tensor:
    """The output-space mimic score of every local sample, shape (local N,): the identity in place of the layer's kernel.

    ``proj``: ``<e_i, d>/||d||``; ``cos``: ``<e_i, d>/(||e_i|| ||d||)``, with ``e_i`` sample ``i``'s
    gradient of its :func:`~raymimic.clip.loss.per_sample_contrastive_loss` and ``d`` the gradient
    of ``D`` (the mean of :func:`distillation_losses` over the global batch), both in the logits
    ``R`` and ``C`` of the local rows against the global batch; ``||d||`` runs over the global
    batch's rows (``all_reduce`` sums the workers' squares). Higher: the sample's descent also
    descends ``D`` (keep). ``target`` and ``reference`` as in :func:`distillation_losses`
    (detached here: no graph, no ``.grad``); ``first_index``: the global index of the first local
    sample (``rank * local N``); ``gather`` concatenates every worker's features in rank order.
    Computed in float32, or in the features' dtype where it is wider.
    """
    if kind not in SCORE_KINDS:
        raise ValueError(f"score kind {kind!r} is not one of {SCORE_KINDS}")
    image, text, scale = (t.detach() for t in target)
    ref_image, ref_text, ref_scale = (t.detach() for t in reference)
    dtype = torch.promote_types(image.dtype, torch.float32)
    all_image, all_text = gather(image).to(dtype), gather(text).to(dtype)
    ref_all_image, ref_all_text = gather(ref_image).to(dtype), gather(ref_text).to(dtype)
    batch = all_image.shape[0]
    own = F.one_hot(torch.arange(image.shape[0], device=image.device) + first_index, batch).to(dtype)
    loss_grads, distillation_grads = [], []
    for rows, columns, ref_rows, ref_columns in ((image, all_text, ref_image, ref_all_text),
                                                 (text, all_image, ref_text, ref_all_image)):
        q = torch.softmax(scale.to(dtype) * rows.to(dtype) @ columns.t(), dim=-1)
        p = torch.softmax(ref_scale.to(dtype) * ref_rows.to(dtype) @ ref_columns.t(), dim=-1)
        loss_grads.append(0.5 * (q - own))
        distillation_grads.append((0.5 / batch) * (q - p))
    e, d = torch.cat(loss_grads, dim=1), torch.cat(distillation_grads, dim=1)  # row i: sample i's rows of R and C side by side
    d_norm = all_reduce(d.square().sum().reshape(1)).sqrt().clamp_min(_EPS)
    dots = (e * d).sum(dim=1)
    if kind == "proj":
        return dots / d_norm
    return dots / (e.norm(dim=1).clamp_min(_EPS) * d_norm)
