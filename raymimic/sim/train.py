"""One training run of the label-noise simulation with a given batch weighting.

Every step is one ordinary forward/backward of the batch-mean cross-entropy; a
:class:`~raymimic.mimic.MimicProbe` on the classification head records what the per-sample
statistics need, a :mod:`raymimic.mimic.weighting` turns them into weights, and the head's
gradient is replaced by the re-weighted one ``sum_i w_i g_i`` (with ``reweight_all`` every
layer gets ``d/dtheta sum_i w_i l_i`` instead). Every sample's score and weight at every
step is recorded in the score-table layout, so the Stage-2 binarizers apply unchanged.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass, field

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from torch import nn

from raymimic.mimic import (
    MimicProbe,
    alignment,
    grad_norms,
    gram,
    make_weighting,
    mimic_scores,
    reference_direction,
    reweighted_grad,
)
from raymimic.sim.data import SimData

MIMIC_LAYER = "head.weight"
MODELS = ("probe", "linear", "mlp")


@dataclass
class TrainConfig:
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


def build_model(data: SimData, config: TrainConfig) -> Classifier:
    return Classifier(config.model, data.num_features, data.num_classes, config.hidden, config.seed)


def accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    model.eval()
    with torch.no_grad():
        return float((model(x).argmax(dim=1) == y).float().mean())


def train_reference(data: SimData, config: TrainConfig) -> RunResult:
    """The reference model: the same architecture trained with plain SGD on the clean labels."""
    return train_run(data, data.y_train, "sgd", config, reference=None)


def train_run(
    data: SimData,
    labels: torch.Tensor,
    method: str,
    config: TrainConfig,
    reference: nn.Module | None,
) -> RunResult:
    """Train a fresh model on ``labels`` with weighting ``method``; record every sample's weight."""
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
            losses.mean().backward(retain_graph=config.reweight_all)
            stats = _batch_stats(probe, model, reference, needs, x, y, losses, size, data, labels, batches, b, config.score_kind)
            # the mimic score is recorded for every method: the score column means one thing
            score = stats["mimic"] if "mimic" in stats else _mimic(probe, model, reference, size, config.score_kind)
            weights = weighting.weights(stats).float()
            if config.reweight_all:
                optimizer.zero_grad(set_to_none=True)
                (losses * weights).sum().backward()  # sum_i w_i dl_i/dtheta = sum_i w_i g_i
            else:
                head.grad = reweighted_grad(probe, weights, size)
            optimizer.step()
            frames.append(_rows(uids[idx.numpy()], step, epoch, score, weights, size, method_statistic(stats, weights)))
            step += 1
    rows = pd.concat(frames, ignore_index=True)
    return RunResult(
        method=method,
        test_accuracy=accuracy(model, data.x_test, data.y_test),
        train_accuracy_clean=accuracy(model, data.x_train, data.y_train),
        rows=rows,
        model=model,
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


def _mimic(probe: MimicProbe, model: nn.Module, reference: nn.Module | None, size: int, kind: str = "proj") -> torch.Tensor:
    """Raw mimic scores ``m_i`` of the batch (NaN without a reference, e.g. for the reference run)."""
    if reference is None:
        return torch.full((size,), float("nan"))
    return mimic_scores(probe, reference_direction(model, reference, MIMIC_LAYER), size, kind=kind)


def _batch_stats(probe, model, reference, needs, x, y, losses, size, data, labels, batches, b, kind="proj"):
    """The per-sample statistics the weighting ``needs`` (see raymimic.mimic.weighting)."""
    stats: dict[str, torch.Tensor] = {"batch_size": torch.tensor(size)}
    if "mimic" in needs:
        stats["mimic"] = _mimic(probe, model, reference, size, kind)
    if "grad_norm" in needs:
        stats["grad_norm"] = grad_norms(probe, size)
    if "gram" in needs:
        stats["gram"] = gram(probe, size)
    if "loss" in needs:
        stats["loss"] = losses.detach()
    if "ref_loss" in needs:
        with torch.no_grad():
            stats["ref_loss"] = F.cross_entropy(reference(x), y, reduction="none")
    if "align" in needs:
        # AGRA compares with the mean head gradient of another batch: the next one of the epoch
        other = batches[(b + 1) % len(batches)]
        other_loss = F.cross_entropy(model(data.x_train[other]), labels[other])
        comparison = torch.autograd.grad(other_loss, model.head.weight)[0]
        stats["align"] = alignment(probe, comparison)
    return stats


def method_statistic(stats: dict[str, torch.Tensor], weights: torch.Tensor) -> torch.Tensor:
    """The per-sample number a weighting ranks samples by (its weights grow with it).

    Grad-Mimic: the mimic score; GraNd: the gradient norm; AGRA: the alignment; RHO: the
    reducible loss; Grad-Match (no such number: its weights come from a solver) and plain
    SGD: the normalised weight ``B * w``. Detecting mislabeled samples from another
    method's weights binarizes this number, so every method is judged on its own signal.
    """
    if "mimic" in stats:
        return stats["mimic"]
    if "grad_norm" in stats:
        return stats["grad_norm"]
    if "align" in stats:
        return stats["align"]
    if "ref_loss" in stats:
        return stats["loss"] - stats["ref_loss"]
    return weights * len(weights)


def _rows(uids: np.ndarray, step: int, epoch: int, score: torch.Tensor, weights: torch.Tensor, size: int, stat: torch.Tensor) -> pd.DataFrame:
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
