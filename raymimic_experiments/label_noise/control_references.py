"""Control references for Grad-Mimic in the label-noise simulation (docs/method.md, section 7).

A control run is an ordinary Grad-Mimic run whose reference head weight ``W_ref`` is replaced
by a matrix that does not carry what the clean reference learned; comparing the clean run with
the controls shows what the reference itself adds:

- ``zero``: ``W_ref = 0``, so ``V_t = -W_t`` (the target model's own term alone);
- ``init``: ``W_ref = W_0``, the run's own initial head weight. The simulation's head starts at
  zero, so ``init`` coincides with ``zero`` there (:func:`initial_head` lets the caller check);
- ``random``: a random Gaussian matrix drawn from ``seed + RANDOM_SEED_OFFSET``, scaled to the
  clean reference's Frobenius norm;
- ``noisy``: a reference trained the same way as the clean one (plain SGD) on the NOISY labels
  of the noise level, i.e. the SGD run of that level.
"""
from __future__ import annotations

import torch
from torch import nn

from raymimic.mimic.controls import random_matrix
from raymimic_experiments.label_noise.config import CONTROL_REFERENCES
from raymimic_experiments.label_noise.data import SimData
from raymimic_experiments.label_noise.train import MIMIC_LAYER, Classifier, ClassifierTrainConfig, build_model


def control_label(control: str) -> str:
    """The row name of a control run in results.json and results.md, e.g. ``grad-mimic[zero]``."""
    return f"grad-mimic[{control}]"


def initial_head(data: SimData, config: ClassifierTrainConfig) -> torch.Tensor:
    """``W_0``: the head weight every run of ``config`` starts from (the model is built from the same seed)."""
    return build_model(data, config).head.weight.detach().clone()


def random_head(like: torch.Tensor, seed: int) -> torch.Tensor:
    """A Gaussian matrix of ``like``'s shape drawn from ``seed + RANDOM_SEED_OFFSET``, with ``like``'s Frobenius norm."""
    return random_matrix(like.shape, float(like.detach().float().norm()), seed)


def control_head(control: str, data: SimData, config: ClassifierTrainConfig, clean: nn.Module,
                 noisy: nn.Module | None = None) -> torch.Tensor:
    """The ``W_ref`` of ``control``; ``clean`` is the clean reference, ``noisy`` the SGD model of the noisy labels."""
    if control == "zero":
        return torch.zeros_like(clean.get_parameter(MIMIC_LAYER).detach())
    if control == "init":
        return initial_head(data, config)
    if control == "random":
        return random_head(clean.get_parameter(MIMIC_LAYER), config.seed)
    if control == "noisy":
        if noisy is None:
            raise ValueError("the noisy control needs the model trained with plain SGD on the noisy labels")
        return noisy.get_parameter(MIMIC_LAYER).detach().clone()
    raise ValueError(f"unknown control {control!r}; choose from {list(CONTROL_REFERENCES)}")


def control_reference(control: str, data: SimData, config: ClassifierTrainConfig, clean: nn.Module,
                      noisy: nn.Module | None = None) -> Classifier:
    """A model of the simulation's architecture whose head weight is the control's ``W_ref`` (only that tensor is read)."""
    head = control_head(control, data, config, clean, noisy)
    model = build_model(data, config)
    with torch.no_grad():
        model.head.weight.copy_(head)
    return model.eval()
