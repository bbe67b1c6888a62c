"""One training run of the label-noise simulation with a given batch weighting.

Every step is one ordinary forward/backward of the batch-mean cross-entropy; a
:class:`~raymimic.mimic.MimicProbe` on the classification head records what the per-sample
statistics need, a :mod:`raymimic.mimic.weighting` turns them into weights (statistics and weights come from
:mod:`raymimic.mimic.stats`, as in Stage-1 training), and the head's gradient is replaced by the
re-weighted one ``sum_i w_i g_i`` (with ``reweight_all`` every layer gets ``sum_i w_i g_i``, the
gradient of ``sum_i w_i l_i`` for these independent per-sample losses:
:func:`raymimic.mimic.reweight.reweighted_loss_backward`). Every sample's score and weight at every
step is recorded in the score-table layout, so the Stage-2 binarizers apply unchanged.
"""
from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from torch import nn

from raymimic.mimic import (
    MimicProbe,
    batch_weights,
    make_weighting,
    output_grads,
    reference_direction,
    reweighted_grad,
    reweighted_loss_backward,
    weighting_stats,
)
from raymimic_experiments.label_noise.config import MODELS
from raymimic_experiments.label_noise.data import SimData

MIMIC_LAYER = "head.weight"


@dataclass
class ClassifierTrainConfig:
    """Optimiser and model settings shared by the reference and every weighted run."""

    model: str = "probe"
    hidden: int = 256
    epochs: int = 5
    lr: float = 1e-3
    weight_decay: float = 1e-5
    batch_size: int = 32
    tau: float = 1.0
    score_kind: str = "proj"
    reweight_all: bool = False
    seed: int = 0
    weighting_params: dict = field(default_factory=dict)
    eval_every: int = 0  # test accuracy every this many steps (RunResult.curve); 0 = only at the start and the end


class Classifier(nn.Module):
    """``head(backbone(x))``; the head's weight is the mimic layer.

    ``probe``: a frozen random ReLU feature map + trainable head, the analogue of the paper's
    linear probing on a frozen pretrained encoder (reference and trained model share the
    same encoder because it is drawn from the same seed). ``linear``: the head alone on the
    standardised pixels. ``mlp``: the same network as ``probe`` with every layer trained,
    the analogue of full fine-tuning.
    """

    def __init__(self, kind: str, in_features: int, num_classes: int, hidden: int, seed: int):
        super().__init__()
        if kind not in MODELS:
            raise ValueError(f"unknown model {kind!r}; choose one of {list(MODELS)}")
        torch.manual_seed(seed)
        if kind == "linear":
            self.backbone: nn.Module = nn.Identity()
            width = in_features
        else:
            self.backbone = nn.Sequential(nn.Linear(in_features, hidden), nn.ReLU())
            width = hidden
        if kind == "probe":
            self.backbone.requires_grad_(False)
        # the head starts from zero: every run (and the reference) begins at the same point,
        # so V = W_ref - W is exactly "how far training still has to go"
        self.head = nn.Linear(width, num_classes)
        nn.init.zeros_(self.head.weight)
        nn.init.zeros_(self.head.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.backbone(x))


@dataclass
class RunResult:
    method: str
    test_accuracy: float
    train_accuracy_clean: float
    # score-table rows: uid, step, epoch, rank, score (raw m_i), weight (w_i), batch_size,
    # plus method_stat (see method_statistic)
    rows: pd.DataFrame
    model: nn.Module
    # (optimizer steps taken, test accuracy): step 0, every eval_every steps and the last step
    curve: list[tuple[int, float]] = field(default_factory=list)


def build_model(data: SimData, config: ClassifierTrainConfig) -> Classifier:
    return Classifier(config.model, data.num_features, data.num_classes, config.hidden, config.seed)


def accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    model.eval()
    with torch.no_grad():
        return float((model(x).argmax(dim=1) == y).float().mean())


def train_reference(data: SimData, config: ClassifierTrainConfig) -> RunResult:
    """The reference model: the same architecture trained with plain SGD on the clean labels."""
    return train_run(data, data.y_train, "sgd", config, reference=None)


def train_run(
    data: SimData,
    labels: torch.Tensor,
    method: str,
    config: ClassifierTrainConfig,
    reference: nn.Module | None,
    observe: Callable[[int, nn.Module, torch.Tensor | None], None] | None = None,
) -> RunResult:
    """Train a fresh model on ``labels`` with weighting ``method``; record every sample's weight.

    ``reference``: the model whose head weight is ``W_ref`` (the clean reference, or a control's).
    ``observe(step, model, direction)``, if given, is called at every step after the backward
    pass and before the optimizer step, with ``direction`` = ``V = W_ref - W_t`` (None without a
    reference). The test accuracy is evaluated every ``config.eval_every`` steps (``curve``);
    evaluating changes nothing in the training.
    """
    weighting = make_weighting(method, tau=config.tau, **config.weighting_params)
    needs = set(weighting.needs)
    if reference is None and needs & {"mimic", "ref_loss"}:
        raise ValueError(f"method {method!r} needs a reference model")
    model = build_model(data, config)
    reference = copy.deepcopy(reference).eval() if reference is not None else None
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=config.lr, weight_decay=config.weight_decay)
    probe = MimicProbe(model, MIMIC_LAYER)
    head = model.head.weight
    order_gen = torch.Generator().manual_seed(config.seed + 1)
    n = len(labels)
    uids = np.array(data.uids())
    frames: list[pd.DataFrame] = []
    curve = [(0, accuracy(model, data.x_test, data.y_test))]
    step = 0
    for epoch in range(config.epochs):
        order = torch.randperm(n, generator=order_gen)
        batches = _batches(order, config.batch_size)
        for b, idx in enumerate(batches):
            model.train()
            x, y = data.x_train[idx], labels[idx]
            size = len(idx)
            optimizer.zero_grad(set_to_none=True)
            with probe.capture():
                losses = F.cross_entropy(model(x), y, reduction="none")
            if config.reweight_all:  # the probe needs the output gradient; no .grad until the re-weighted pass
                output_grads(losses.mean(), [], through=[head])
            else:
                losses.mean().backward()
            direction = reference_direction(model, reference, MIMIC_LAYER) if reference is not None else None
            # the mimic score is recorded for every method: the score column means one thing
            stats, _ = weighting_stats(
                weighting, probe, direction, size, kind=config.score_kind, losses=losses.detach(),
                # both callables are evaluated inside weighting_stats, in this iteration: late binding is fine
                ref_losses=lambda: _reference_losses(reference, x, y),  # noqa: B023
                align_with=lambda: _next_batch_grad(model, data, labels, batches, b),  # noqa: B023
            )
            weights, _ = batch_weights(weighting, stats)
            if observe is not None:
                observe(step, model, direction)
            if config.reweight_all:
                reweighted_loss_backward(losses, weights)  # sum_i w_i dl_i/dtheta = sum_i w_i g_i
            else:
                head.grad = reweighted_grad(probe, weights, size)
            optimizer.step()
            frames.append(_rows(uids[idx.numpy()], step, epoch, stats["mimic"], weights, size, method_statistic(needs, stats, weights)))
            step += 1
            if config.eval_every and step % config.eval_every == 0:
                curve.append((step, accuracy(model, data.x_test, data.y_test)))
    rows = pd.concat(frames, ignore_index=True)
    test_accuracy = accuracy(model, data.x_test, data.y_test)
    if curve[-1][0] != step:
        curve.append((step, test_accuracy))
    return RunResult(
        method=method,
        test_accuracy=test_accuracy,
        train_accuracy_clean=accuracy(model, data.x_train, data.y_train),
        rows=rows,
        model=model,
        curve=curve,
    )


def _batches(order: torch.Tensor, batch_size: int) -> list[torch.Tensor]:
    """Split an epoch's order into batches; a last batch of one sample joins the one before.

    Every sample is trained on (and voted on) once per epoch; a batch of one has no
    spread, so softmax weights and standardised norms would be meaningless for it.
    """
    batches = list(order.split(batch_size))
    if len(batches) > 1 and len(batches[-1]) < 2:
        batches[-2:] = [torch.cat(batches[-2:])]
    return batches


def _reference_losses(reference: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return F.cross_entropy(reference(x), y, reduction="none")


def _next_batch_grad(model: Classifier, data: SimData, labels: torch.Tensor, batches: list[torch.Tensor], b: int) -> torch.Tensor:
    """AGRA's comparison: the mean head gradient of another batch, the next one of the epoch."""
    other = batches[(b + 1) % len(batches)]
    other_loss = F.cross_entropy(model(data.x_train[other]), labels[other])
    return torch.autograd.grad(other_loss, model.head.weight)[0]


def method_statistic(needs, stats: dict[str, torch.Tensor], weights: torch.Tensor) -> torch.Tensor:
    """The per-sample number a weighting ranks samples by (its weights grow with it).

    Grad-Mimic: the mimic score; GraNd: the gradient norm; AGRA: the alignment; RHO: the
    reducible loss; Grad-Match (no such number: its weights come from a solver) and plain
    SGD: the normalised weight ``B * w``. Detecting mislabeled samples from another
    method's weights binarizes this number, so every method is judged on its own signal.
    ``needs``: the weighting's :attr:`~raymimic.mimic.weighting.Weighting.needs`.
    """
    if "mimic" in needs:
        return stats["mimic"]
    if "grad_norm" in needs:
        return stats["grad_norm"]
    if "align" in needs:
        return stats["align"]
    if "ref_loss" in needs:
        return stats["loss"] - stats["ref_loss"]
    return weights * len(weights)


def _rows(
    uids: np.ndarray, step: int, epoch: int, score: torch.Tensor, weights: torch.Tensor, size: int, stat: torch.Tensor
) -> pd.DataFrame:
    """Score-table rows of one step (the layout Stage 2 reads) plus the method's own statistic."""
    return pd.DataFrame(
        {
            "uid": uids,
            "step": np.full(size, step, dtype=np.int64),
            "epoch": np.full(size, epoch, dtype=np.int32),
            "rank": np.zeros(size, dtype=np.int32),
            "score": score.detach().float().numpy().astype(np.float32),
            "weight": weights.detach().float().numpy().astype(np.float32),
            "batch_size": np.full(size, size, dtype=np.int32),
            "method_stat": stat.detach().float().numpy().astype(np.float32),
        }
    )
