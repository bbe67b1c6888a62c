"""Batch weightings behind one interface: Grad-Mimic and the paper's baselines.

A weighting declares which per-sample statistics it ``needs``; the caller computes them for
its local samples (:mod:`raymimic.mimic.scores`), gathers them over the global batch and
calls :meth:`Weighting.weights`, which returns one weight per sample of the global batch.
Every rank computes the same weights from the same gathered statistics, so no weighting
needs to know about distribution.

Statistics: ``mimic`` (raw mimic score m_i), ``grad_norm`` (||g_i||), ``align`` (cosine with
another batch's mean gradient), ``loss`` and ``ref_loss`` (per-sample loss of the model and of
the reference model), ``gram`` (<g_i, g_j>, local batches only).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import numpy as np
import torch


def softmax_weights(values: torch.Tensor, tau: float) -> torch.Tensor:
    """``softmax(values / tau)``: sums to 1, uniform weight is ``1/B``."""
    if tau <= 0:
        raise ValueError(f"temperature tau must be > 0, got {tau}")
    return torch.softmax(values.float() / tau, dim=0)


class Weighting:
    name: ClassVar[str] = ""
    needs: ClassVar[tuple[str, ...]] = ()

    def weights(self, stats: dict[str, torch.Tensor]) -> torch.Tensor:  # pragma: no cover - interface
        raise NotImplementedError


@dataclass
class Uniform(Weighting):
    """Plain SGD: every sample weighs ``1/B``."""

    name: ClassVar[str] = "sgd"
    needs: ClassVar[tuple[str, ...]] = ()

    def weights(self, stats):
        if "batch_size" not in stats:
            raise ValueError("weighting 'sgd' needs 'batch_size' in stats (the global batch size)")
        if "mimic" in stats:  # the global batch's scores: its size and device, without reading a tensor's value
            size, device = stats["mimic"].shape[0], stats["mimic"].device
        else:
            size, device = int(stats["batch_size"]), None
        return torch.full((size,), 1.0 / size, device=device)


@dataclass
class GradMimic(Weighting):
    """``softmax(m / tau)`` of the mimic scores; ``normalize=False`` uses the raw scores."""

    tau: float = 1.0
    normalize: bool = True
    name: ClassVar[str] = "grad-mimic"
    needs: ClassVar[tuple[str, ...]] = ("mimic",)

    def weights(self, stats):
        return softmax_weights(stats["mimic"], self.tau) if self.normalize else stats["mimic"].float()


@dataclass
class GraNd(Weighting):
    """Softmax of per-sample gradient norms (GraNd as a weighting)."""

    tau: float = 1.0
    name: ClassVar[str] = "grad-norm"
    needs: ClassVar[tuple[str, ...]] = ("grad_norm",)

    def weights(self, stats):
        norms = stats["grad_norm"].float()
        # norms grow and shrink with training; standardise so tau keeps one meaning
        return softmax_weights((norms - norms.mean()) / norms.std().clamp_min(1e-12), self.tau)


@dataclass
class AGRA(Weighting):
    """Equal weight for samples whose gradient agrees (cos > 0) with another batch's; 0 otherwise."""

    name: ClassVar[str] = "agra"
    needs: ClassVar[tuple[str, ...]] = ("align",)

    def weights(self, stats):
        agree = (stats["align"] > 0).float()
        if agree.sum() == 0:  # nobody agrees: fall back to plain SGD rather than a zero update
            return torch.full_like(agree, 1.0 / len(agree))
        return agree / agree.sum()


@dataclass
class RHOLoss(Weighting):
    """Softmax of the reducible loss: model loss minus reference-model loss."""

    tau: float = 1.0
    name: ClassVar[str] = "rho"
    needs: ClassVar[tuple[str, ...]] = ("loss", "ref_loss")

    def weights(self, stats):
        return softmax_weights(stats["loss"].float() - stats["ref_loss"].float(), self.tau)


@dataclass
class GradMatch(Weighting):
    """Sparse non-negative weights whose weighted gradient matches the batch mean (OMP + NNLS).

    Greedily picks ``budget * B`` samples (orthogonal matching pursuit on the Gram matrix)
    and solves a non-negative least-squares problem for their weights with scipy, an open
    solver in place of the paper's MOSEK. Weights are normalised to sum to 1.
    """

    budget: float = 0.5
    name: ClassVar[str] = "grad-match"
    needs: ClassVar[tuple[str, ...]] = ("gram",)

    def weights(self, stats):
        from scipy.optimize import nnls

        gram = stats["gram"].double().cpu().numpy()
        size = gram.shape[0]
        k = max(1, min(size, int(round(self.budget * size))))
        # ||sum_j w_j g_j - gbar||^2 through the Gram matrix: G = U S U^T, rows of S^1/2 U^T
        evals, evecs = np.linalg.eigh(gram)
        basis = (np.sqrt(np.clip(evals, 0, None))[:, None] * evecs.T)  # (size, size): column j ~ g_j
        target = basis.mean(axis=1)
        chosen: list[int] = []
        residual = target.copy()
        w = np.zeros(0)
        for _ in range(k):
            corr = basis.T @ residual
            corr[chosen] = -np.inf
            j = int(np.argmax(corr))
            if corr[j] <= 0 and chosen:
                break
            chosen.append(j)
            w, _ = nnls(basis[:, chosen], target)
            residual = target - basis[:, chosen] @ w
        out = np.zeros(size)
        out[chosen] = w
        if out.sum() <= 0:
            out[:] = 1.0
        return torch.as_tensor(out / out.sum(), dtype=torch.float32)


WEIGHTINGS: dict[str, type[Weighting]] = {
    cls.name: cls for cls in (Uniform, GradMimic, GraNd, AGRA, RHOLoss, GradMatch)
}


def make_weighting(name: str, **params) -> Weighting:
    """A weighting by name (``sgd``, ``grad-mimic``, ``grad-norm``, ``agra``, ``rho``, ``grad-match``).

    Parameters the weighting does not take (e.g. ``tau`` for ``sgd``) are ignored so that one
    command line can drive every method.
    """
    if name not in WEIGHTINGS:
        raise ValueError(f"unknown weighting {name!r}; choose one of {sorted(WEIGHTINGS)}")
    cls = WEIGHTINGS[name]
    accepted = {k: v for k, v in params.items() if k in cls.__dataclass_fields__ and v is not None}
    return cls(**accepted)
