"""Finding the mimic layer and the reference direction ``V = W_ref - W``."""
from __future__ import annotations

import difflib

import torch
from torch import nn


def unwrap(model: nn.Module) -> nn.Module:
    """The user's module inside DDP / FSDP-like wrappers (they prefix names with ``module.``)."""
    while hasattr(model, "module") and isinstance(model.module, nn.Module):
        model = model.module
    return model


def get_parameter(model: nn.Module, name: str) -> nn.Parameter:
    """``model``'s parameter ``name``; an unknown name lists the closest existing names."""
    params = dict(unwrap(model).named_parameters())
    if name in params:
        return params[name]
    close = difflib.get_close_matches(name, list(params), n=5, cutoff=0.3)
    matrices = [n for n, p in params.items() if p.ndim == 2][-5:]
    hint = f"closest names: {close}" if close else f"some 2-D parameters: {matrices}"
    raise KeyError(f"model has no parameter {name!r}; {hint}")


def _shapes(model: nn.Module | dict) -> dict[str, tuple]:
    if isinstance(model, nn.Module):
        return {n: tuple(p.shape) for n, p in unwrap(model).named_parameters()}
    return {n: tuple(t.shape) for n, t in model.items()}


def check_same_architecture(model: nn.Module | dict, reference: nn.Module | dict, what: str = "reference model") -> None:
    """Raise ``ValueError`` naming every tensor whose presence or shape differs.

    Either side may be a module or a state dict; buffers only in a state dict are ignored.
    """
    mine, theirs = _shapes(model), _shapes(reference)
    if not isinstance(reference, nn.Module):
        suffixes = ("weight", "bias", "embedding", "proj", "projection", "scale", "class_embedding")
        theirs = {n: s for n, s in theirs.items() if n in mine or n.endswith(suffixes)}
    problems = [f"{n}: model {mine[n]} vs reference {theirs[n]}" for n in mine if n in theirs and mine[n] != theirs[n]]
    problems += [f"{n}: only in the model" for n in mine if n not in theirs]
    problems += [f"{n}: only in the reference" for n in theirs if n not in mine]
    if problems:
        shown = "; ".join(problems[:10]) + (f"; ... {len(problems) - 10} more" if len(problems) > 10 else "")
        raise ValueError(f"{what} does not match the trained architecture ({len(problems)} tensors differ): {shown}")


def reference_weight(reference: nn.Module | dict, name: str) -> torch.Tensor:
    """The reference tensor ``name`` from a module or a state dict, detached."""
    if isinstance(reference, nn.Module):
        return get_parameter(reference, name).detach()
    if name not in reference:
        close = difflib.get_close_matches(name, list(reference), n=5, cutoff=0.3)
        raise KeyError(f"reference state dict has no tensor {name!r}; closest names: {close}")
    return reference[name].detach()


def reference_direction(model: nn.Module, reference: nn.Module | dict, name: str) -> torch.Tensor:
    """``V = W_ref - W`` for parameter ``name`` (float32, on the model's device)."""
    weight = get_parameter(model, name)
    ref = reference_weight(reference, name)
    if tuple(ref.shape) != tuple(weight.shape):
        raise ValueError(f"parameter {name!r}: model shape {tuple(weight.shape)} vs reference shape {tuple(ref.shape)}")
    return ref.to(device=weight.device, dtype=torch.float32) - weight.detach().float()
