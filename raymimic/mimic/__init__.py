"""The mathematics of the mimic score: plain torch, no Ray.

* :class:`MimicProbe` captures one weight matrix's activations and output gradients during
  an ordinary forward/backward and answers per-sample inner products exactly.
* :mod:`raymimic.mimic.scores` turns those into mimic scores, gradient norms, alignments and
  the re-weighted gradient with the paper's scaling.
* :mod:`raymimic.mimic.weighting` holds Grad-Mimic and the baseline weightings.
* :mod:`raymimic.mimic.stats` computes the statistics a weighting needs and its weights (one
  place for training and the simulation; distribution comes in as callables).
* :mod:`raymimic.mimic.reweight` re-weights every layer through a second backward (an option).
* :mod:`raymimic.mimic.params` finds the mimic layer and the reference direction.
* :mod:`raymimic.mimic.function` gives the function-space direction ``V_fn = -dD/dW``: how the
  layer must move for the target's batch similarity distributions to match the reference's;
  and the output-space score, the same question asked of the batch's logits with no layer at all.
* :mod:`raymimic.mimic.controls` builds the control directions (``zero``, ``init``, ``random``,
  ``fixed``, ``current``, another reference) that score samples without the reference's knowledge.
"""
from raymimic.mimic.controls import BUILTIN_CONTROLS, Control, control_directions, make_control, random_matrix
from raymimic.mimic.function import distillation_losses, function_direction, function_directions, output_scores
from raymimic.mimic.params import check_same_architecture, get_parameter, reference_direction, unwrap
from raymimic.mimic.probe import MimicProbe
from raymimic.mimic.reweight import output_grads, reweighted_backward, reweighted_loss_backward
from raymimic.mimic.scores import (
    alignment,
    clean_gradient_direction,
    direction_scores,
    grad_norms,
    gram,
    joint_mimic_scores,
    mean_batch_grad,
    mimic_scores,
    reweighted_grad,
)
from raymimic.mimic.stats import batch_weights, weighting_stats
from raymimic.mimic.weighting import (
    AGRA,
    WEIGHTINGS,
    GradMatch,
    GradMimic,
    GraNd,
    RHOLoss,
    Uniform,
    Weighting,
    make_weighting,
    softmax_weights,
)

__all__ = [
    "AGRA", "BUILTIN_CONTROLS", "Control", "GradMatch", "GradMimic", "GraNd", "MimicProbe", "RHOLoss", "Uniform", "WEIGHTINGS",
    "Weighting", "alignment", "batch_weights", "check_same_architecture", "clean_gradient_direction", "control_directions",
    "direction_scores", "distillation_losses", "function_direction",
    "function_directions", "get_parameter", "grad_norms", "gram", "joint_mimic_scores", "make_control", "make_weighting",
    "mean_batch_grad", "mimic_scores", "output_grads", "output_scores",
    "random_matrix", "reference_direction", "reweighted_backward", "reweighted_grad", "reweighted_loss_backward",
    "softmax_weights", "unwrap", "weighting_stats",
]
