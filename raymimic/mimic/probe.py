"""Exact per-sample gradient statistics of one weight matrix from ONE ordinary backward pass.

For a Linear layer ``y = a W^T`` (W: out x in) sample i's own-path gradient is
``G_i = sum_t d_{i,t} a_{i,t}^T`` where ``a`` are its input activations and ``d = dL/dy`` the
output gradients of its tokens t. For a bare matrix used as ``y = a @ P`` (P: in x out, like
open_clip's ``visual.proj``) it is ``G_i = sum_t a_{i,t} d_{i,t}^T``. The probe keeps ``a`` and
``d`` (autograd keeps ``a`` anyway) and answers inner products with ``G_i`` without ever
materialising a per-sample gradient:

* ``dot(V)``        ``<G_i, V>``             one extra matmul of the layer's size
* ``sq_norms()``    ``||G_i||^2 = sum_{t,t'} (d_t.d_t')(a_t.a_t')``
* ``gram()``        ``<G_i, G_j>`` for all pairs (small batches: Grad-Match)
* ``weighted_grad(c)``  ``sum_i c_i G_i``    the same cost as the layer's weight gradient

Only the token positions whose output gradient is non-zero are used: with CLS/EOT pooling only
one token per sample reaches the loss through a tower's last block, so the extra cost there is a
tiny fraction of the layer's. How many tokens per sample reach the loss is found on the first
backward (one host sync); afterwards each sample's are gathered on the device, and the captures
are prepared once per backward, so the probe adds no host synchronisation to a training step.
"""
from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
import torch.nn.functional as F
from torch import nn
from torch.overrides import TorchFunctionMode

from raymimic.mimic.params import get_parameter, unwrap

_MATMULS = {torch.matmul, torch.Tensor.matmul, torch.Tensor.__matmul__, torch.mm}


class _BareMatmulMode(TorchFunctionMode):
    """Sees ``x @ P`` / ``F.linear(x, P)`` calls whose weight operand is the probed parameter."""

    def __init__(self, probe: MimicProbe):
        super().__init__()
        self.probe = probe

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        if len(args) >= 2 and args[1] is self.probe.parameter:
            if func in _MATMULS:
                self.probe._record(args[0], out, transposed=True)
            elif func is F.linear:
                self.probe._record(args[0], out, transposed=False)
        return out


class MimicProbe:
    """Captures activations and output gradients of one 2-D weight during a forward/backward.

    ``batch_dim`` is the dimension of the layer's input that indexes samples (0 for
    batch-first transformers and MLPs, 1 for sequence-first transformers).

    Usage::

        probe = MimicProbe(model, "visual.transformer.resblocks.11.mlp.c_proj.weight")
        with probe.capture():
            loss = loss_fn(model(x))
        loss.backward()
        scores = probe.dot(V)
    """

    def __init__(self, model: nn.Module, name: str, batch_dim: int = 0):
        self.model = unwrap(model)
        self.name = name
        self.parameter = get_parameter(self.model, name)
        if self.parameter.ndim != 2:
            raise ValueError(f"mimic layer {name!r} has shape {tuple(self.parameter.shape)}; it must be a 2-D weight matrix")
        self.batch_dim = batch_dim
        self.module = self._owning_linear(name)
        self.transposed = False  # True when G is stored as a^T d (bare ``x @ P``)
        self._a: torch.Tensor | None = None
        self._d: torch.Tensor | None = None
        self._prepared: tuple[torch.Tensor, torch.Tensor] | None = None  # (a, d) of the active tokens, float32
        self._reaching: tuple[int, int] | None = None  # (tokens per sample, how many of them reach the loss): found once
        self._pending = False

    def _owning_linear(self, name: str) -> nn.Module | None:
        module_name, _, leaf = name.rpartition(".")
        module = self.model.get_submodule(module_name) if module_name else self.model
        return module if isinstance(module, nn.Linear) and leaf == "weight" else None

    # -- capture ------------------------------------------------------------------
    @contextlib.contextmanager
    def capture(self) -> Iterator[MimicProbe]:
        """Record the layer's use in the forward run inside this block (backward may follow later)."""
        self.reset()
        if self.module is not None:
            handle = self.module.register_forward_hook(lambda m, inputs, out: self._record(inputs[0], out, transposed=False))
            try:
                yield self
            finally:
                handle.remove()
        else:
            with _BareMatmulMode(self):
                yield self
        if not self._pending and self._a is None:
            raise RuntimeError(f"mimic layer {self.name!r} was not used in the forward pass inside probe.capture()")

    def reset(self) -> None:
        self._a = self._d = self._prepared = None
        self._pending = False

    def _record(self, a: torch.Tensor, out: torch.Tensor, transposed: bool) -> None:
        if not out.requires_grad:
            return
        if self._pending or self._a is not None:
            raise RuntimeError(
                f"mimic layer {self.name!r} was used twice in one forward pass; per-sample scores need a layer used once "
                "(do not checkpoint the block that holds it, and pick a weight that is not shared)"
            )
        self.transposed = transposed
        self._a = self._to_samples(a.detach())
        self._pending = True

        def keep_grad(grad: torch.Tensor) -> None:
            self._d = self._to_samples(grad.detach())
            self._prepared = None
            self._pending = False

        out.register_hook(keep_grad)

    def _to_samples(self, x: torch.Tensor) -> torch.Tensor:
        """(..., features) with samples on ``batch_dim`` -> (N, T, features)."""
        if x.ndim == 1:
            raise ValueError(f"mimic layer {self.name!r} got a 1-D input; per-sample scores need a batch dimension")
        if x.ndim == 2:
            return x.unsqueeze(1)
        x = x.movedim(self.batch_dim, 0)
        return x.reshape(x.shape[0], -1, x.shape[-1])

    # -- what was captured ----------------------------------------------------------
    def _captured(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``(a, d)`` of the token positions that reach the loss, float32: prepared once per backward, then reused."""
        if self._a is None:
            raise RuntimeError("probe has captured nothing: run the forward inside probe.capture()")
        if self._d is None:
            raise RuntimeError(f"no gradient reached mimic layer {self.name!r}: call backward() on the loss first")
        if self._prepared is None:
            a, d = self._a, self._d
            tokens = a.shape[1]
            if tokens > 1:
                reach = d.abs().amax(dim=2)  # (N, T): > 0 where the token's output gradient reaches the loss
                if self._reaching is None or self._reaching[0] != tokens:
                    # how many tokens per sample reach the loss is the model's pooling (1 for CLS/EOT, all for mean
                    # pooling): found on the first backward, the probe's only host sync
                    self._reaching = (tokens, max(1, int((reach > 0).sum(dim=1).max())))
                keep = self._reaching[1]
                if keep < tokens:  # each sample's reaching tokens, gathered on the device without a host sync
                    torch._assert_async((reach > 0).sum(dim=1).max() <= keep)  # the pooling cannot change
                    index = reach.topk(keep, dim=1).indices.unsqueeze(-1)
                    a = a.gather(1, index.expand(-1, -1, a.shape[2]))
                    d = d.gather(1, index.expand(-1, -1, d.shape[2]))
            self._prepared = (a.float(), d.float())
        return self._prepared

    @property
    def batch_size(self) -> int:
        if self._a is None:
            raise RuntimeError("probe has captured nothing yet")
        return self._a.shape[0]

    def _as_linear(self, matrix: torch.Tensor) -> torch.Tensor:
        """Express a parameter-shaped matrix in the (out x in) layout used internally."""
        if tuple(matrix.shape) != tuple(self.parameter.shape):
            raise ValueError(f"matrix shape {tuple(matrix.shape)} does not match mimic layer {self.name!r} {tuple(self.parameter.shape)}")
        return matrix.t() if self.transposed else matrix

    def dot(self, matrix: torch.Tensor) -> torch.Tensor:
        """``<G_i, M>`` for every sample i (float32, shape (N,))."""
        a, d = self._captured()
        m = self._as_linear(matrix).to(device=a.device, dtype=torch.float32)
        return (d * (a @ m.t())).sum(dim=(1, 2))

    def sq_norms(self) -> torch.Tensor:
        """``||G_i||^2`` for every sample i."""
        a, d = self._captured()
        if a.shape[1] == 1:
            return (a.squeeze(1).pow(2).sum(-1)) * (d.squeeze(1).pow(2).sum(-1))
        return (torch.bmm(d, d.transpose(1, 2)) * torch.bmm(a, a.transpose(1, 2))).sum(dim=(1, 2))

    def gram(self) -> torch.Tensor:
        """``<G_i, G_j>`` for all pairs, (N, N)."""
        a, d = self._captured()
        n, t = a.shape[:2]
        af, df = a.reshape(n * t, -1), d.reshape(n * t, -1)
        return ((df @ df.t()) * (af @ af.t())).reshape(n, t, n, t).sum(dim=(1, 3))

    def weighted_grad(self, coeffs: torch.Tensor) -> torch.Tensor:
        """``sum_i c_i G_i`` in the parameter's own shape and dtype."""
        a, d = self._captured()
        c = coeffs.to(device=d.device, dtype=torch.float32).reshape(-1, 1, 1)
        grad = (c * d).reshape(-1, d.shape[-1]).t() @ a.reshape(-1, a.shape[-1])
        grad = grad.t() if self.transposed else grad
        return grad.to(self.parameter.dtype)

    def per_sample_grads(self) -> torch.Tensor:
        """Materialised ``G_i`` (N, *param.shape): for tests and tiny layers only."""
        a, d = self._captured()
        grads = torch.einsum("nto,nti->noi", d, a)
        return grads.transpose(1, 2) if self.transposed else grads
