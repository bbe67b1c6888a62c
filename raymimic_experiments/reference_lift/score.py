"""Score saved checkpoints on any mimic layer: the reference, its controls, other references, aligned ones.

A checkpoint is scored the way a Stage-1 step scores (one forward and backward per batch, the
library's :class:`~raymimic.train.step.MimicStep` with uniform weights), so every direction of a
layer comes from the same backward pass. Each (checkpoint, batch) is one ``step`` of the rows.

Columns: ``score`` (the primary reference, ``W_ref - W_t``); the built-in controls; for each
extra reference ``NAME``: ``score_NAME`` (``W_NAME - W_t``) and ``score_NAME_fixed``
(``W_NAME - W_0``); with alignment, ``score_aligned`` and ``score_aligned_fixed``: the primary
reference brought into the target's basis at this checkpoint (:mod:`raymimic.clip.align`).
"""
from __future__ import annotations

import numpy as np
import pandas as pd
import torch
from torch import nn

from raymimic.score_table.columns import CONTROLS
from raymimic_experiments.reference_lift.data import PoolTensors
from raymimic_experiments.reference_lift.train import TrainedRun, new_model, score_rows

SCORED_CONTROLS = (*CONTROLS, "fixed")
"""What every checkpoint is scored against beside the reference: the controls and the frozen direction ``W_ref - W_0``."""


def score_checkpoints(run: TrainedRun, model_name: str, data: PoolTensors, reference: nn.Module, layer: str, *,
                      others: dict[str, nn.Module] | None = None, align: bool = True, baselines: tuple[str, ...] = (),
                      batch: int = 128, seed: int = 0, align_samples: int = 512) -> tuple[pd.DataFrame, list[dict]]:
    """Score rows of every checkpoint of ``run`` on ``layer``, and the alignment report of each checkpoint."""
    from raymimic.clip import resolve_mimic_layer, sample_dim
    from raymimic.clip.align import align_reference
    from raymimic.mimic import Control, get_parameter, make_control
    from raymimic.train.step import build_mimic_step

    model = new_model(model_name, seed)
    name = resolve_mimic_layer(model, layer)
    initial = run.initial_state[name].float()
    tables, reports = [], []
    per_checkpoint = len(data) // batch
    for k, (epoch, state) in enumerate(run.checkpoints):
        model.load_state_dict(state)
        extra: list[Control] = []
        for other_name, other in (others or {}).items():
            weight = get_parameter(other, name).detach().float()
            extra += [make_control(other_name, other=weight), Control(f"{other_name}_fixed", weight - initial, moving=False)]
        if align:
            pick = torch.as_tensor(np.random.default_rng([seed, 13]).permutation(len(data))[:align_samples])
            alignment = align_reference(model, reference, name, data.images[pick], data.texts[pick], batch_dim=sample_dim(model, name))
            extra += [make_control("aligned", other=alignment.weight),
                      Control("aligned_fixed", alignment.weight - initial, moving=False)]
            reports.append({"epoch": epoch, "layer": layer, **alignment.report()})
        step, _ = build_mimic_step(model, model_name, mimic_layer=name, reference=reference, weighting="sgd",
                                   controls=list(SCORED_CONTROLS), baselines=baselines, initial_weight=initial, seed=seed)
        step.controls.update({c.name: c for c in extra})
        order = np.random.default_rng([seed, 21, k]).permutation(len(data))
        for b in range(per_checkpoint):
            index = torch.as_tensor(order[b * batch:(b + 1) * batch])
            model.zero_grad(set_to_none=True)
            result = step(data.images[index], data.texts[index])
            tables.append(score_rows(data, index, k * per_checkpoint + b, k, result))
    model.zero_grad(set_to_none=True)
    return pd.concat(tables, ignore_index=True), reports
