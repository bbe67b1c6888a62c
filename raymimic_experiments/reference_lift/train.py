"""In-process training with the library's Stage-1 step: score rows and checkpoints of one run.

The same optimizer, learning-rate schedule and step as a Ray Train worker
(:func:`raymimic.train.loop.build_optimizer`, :func:`~raymimic.train.loop.learning_rate`,
:func:`raymimic.train.step.build_mimic_step`) on one process, so a study can afford many runs.
Batches are full: each epoch is a seeded permutation cut into ``batch``-sized steps (the rest
waits for the next epoch's permutation).
"""
from __future__ import annotations

import copy
import math
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import pandas as pd
import torch
from torch import nn

from raymimic_experiments.reference_lift.data import PoolTensors


@dataclass
class RunSpec:
    """One training run: the model, its data order, and what its Stage-1 step records."""

    model: str = "raymimic-tiny"
    epochs: int = 10
    batch: int = 128
    lr: float = 2e-3
    seed: int = 0  # model initialisation and data order
    weighting: str = "sgd"  # sgd: uniform weights; grad-mimic: the paper's re-weighting
    tau: float = 0.05
    mimic_layer: str = "image-mlp"
    direction: str = "current"
    controls: tuple[str, ...] = ()
    baselines: tuple[str, ...] = ()
    checkpoints: int = 0  # states kept at the end of this many evenly spaced epochs (the last one included)

    def steps_per_epoch(self, n: int) -> int:
        if n < self.batch:
            raise ValueError(f"{n} samples cannot fill one batch of {self.batch}")
        return n // self.batch


@dataclass
class TrainedRun:
    model: nn.Module
    rows: pd.DataFrame  # score-table rows (empty when nothing was scored)
    initial_state: dict  # the model's weights at step 0
    checkpoints: list[tuple[int, dict]] = field(default_factory=list)  # (epoch, state dict)
    curve: list[dict] = field(default_factory=list)  # {"step": s, **evaluate(model)} every eval_every steps and at the end


def new_model(name: str, seed: int) -> nn.Module:
    """A freshly initialised open_clip model; the seed fixes the initialisation."""
    from raymimic.clip import create_model

    torch.manual_seed(seed)
    return create_model(name)[0]


def train(spec: RunSpec, data: PoolTensors, reference: nn.Module | None = None, initial_state: dict | None = None, *,
          evaluate: Callable[[nn.Module], dict] | None = None, eval_every: int = 0, align_every: int | None = None) -> TrainedRun:
    """Train ``spec.model`` on ``data``; with a reference (or controls) every step scores its samples.

    ``evaluate(model)`` (metrics of the model as it is) runs every ``eval_every`` steps (0: only
    at the end) and after the last step; ``align_every``: steps between re-fits of the
    ``aligned`` control or direction.
    """
    from raymimic.train.config import TrainConfig, parse_control
    from raymimic.train.loop import build_optimizer, learning_rate
    from raymimic.train.step import build_mimic_step

    model = new_model(spec.model, spec.seed)
    if initial_state is not None:
        model.load_state_dict(initial_state)
    start = copy.deepcopy(model.state_dict())
    per_epoch = spec.steps_per_epoch(len(data))
    total = per_epoch * spec.epochs
    cfg = TrainConfig(output="unused", model=spec.model, samples_seen=total * spec.batch, global_batch=spec.batch, lr=spec.lr,
                      warmup=max(1, total // 10), workers=1, weighting="sgd", controls=[])  # optimizer and schedule only
    optimizer = build_optimizer(model, cfg)
    scored = reference is not None or spec.weighting != "sgd" or bool(spec.controls) or bool(spec.baselines)
    step_fn = None
    if scored:
        step_fn, _ = build_mimic_step(model, spec.model, mimic_layer=spec.mimic_layer, reference=reference, weighting=spec.weighting,
                                      tau=spec.tau, direction=spec.direction, controls=[parse_control(c) for c in spec.controls],
                                      baselines=list(spec.baselines), seed=spec.seed, align_every=align_every)
    keep_at = _checkpoint_epochs(spec)
    rows, checkpoints, curve, step = [], [], [], 0
    generator = np.random.default_rng([spec.seed, 5])
    for epoch in range(spec.epochs):
        order = generator.permutation(len(data))
        for b in range(per_epoch):
            index = torch.as_tensor(order[b * spec.batch:(b + 1) * spec.batch])
            for group in optimizer.param_groups:
                group["lr"] = learning_rate(step, cfg)
            optimizer.zero_grad(set_to_none=True)
            images, texts = data.images[index], data.texts[index]
            if step_fn is None:
                _plain_step(model, images, texts)
            else:
                result = step_fn(images, texts)
                rows.append(score_rows(data, index, step, epoch, result))
            optimizer.step()
            with torch.no_grad():
                model.logit_scale.clamp_(0, math.log(100))
            step += 1
            if evaluate is not None and (step == total or (eval_every > 0 and step % eval_every == 0)):
                curve.append({"step": step, **evaluate(model)})
        if epoch + 1 in keep_at:
            checkpoints.append((epoch + 1, copy.deepcopy(model.state_dict())))
    table = pd.concat(rows, ignore_index=True) if rows else pd.DataFrame()
    return TrainedRun(model, table, start, checkpoints, curve)


def _checkpoint_epochs(spec: RunSpec) -> set[int]:
    if spec.checkpoints <= 0:
        return set()
    return {int(round(spec.epochs * (k + 1) / spec.checkpoints)) for k in range(spec.checkpoints)}


def _plain_step(model: nn.Module, images: torch.Tensor, texts: torch.Tensor) -> None:
    from raymimic.clip.loss import per_sample_contrastive_loss

    per_sample_contrastive_loss(*model(images, texts)[:3]).mean().backward()


def score_rows(data: PoolTensors, index: torch.Tensor, step: int, epoch: int, result) -> pd.DataFrame:
    """The score-table rows of one step (the columns Stage 2 reads, plus every ``score_<name>``)."""
    frame = {
        "uid": [data.uids[i] for i in index.tolist()], "step": np.full(len(index), step, np.int64),
        "epoch": np.full(len(index), epoch, np.int64), "rank": np.zeros(len(index), np.int64),
        "score": result.local_scores.float().numpy(), "weight": result.local_weights.float().numpy(),
        "batch_size": np.full(len(index), result.global_batch, np.int64),
    }
    frame.update({column: values.float().numpy() for column, values in result.local_extra.items()})
    return pd.DataFrame(frame)


@torch.no_grad()
def per_sample_losses(model: nn.Module, data: PoolTensors, batch: int = 128, seed: int = 0) -> np.ndarray:
    """Each sample's contrastive loss within a seeded random batch of ``batch`` (the loss a training step sees)."""
    from raymimic.clip.loss import per_sample_contrastive_loss

    model.eval()
    order = np.random.default_rng([seed, 9]).permutation(len(data))
    losses = np.empty(len(data))
    for start in range(0, len(data), batch):
        index = torch.as_tensor(order[start:start + batch])
        losses[index.numpy()] = per_sample_contrastive_loss(*model(data.images[index], data.texts[index])[:3]).numpy()
    model.train()
    return losses
