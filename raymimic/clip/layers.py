"""Where the mimic layer sits in an open_clip model, by alias or parameter name."""
from __future__ import annotations

from torch import nn

from raymimic.choices import MIMIC_LAYER_ALIASES as ALIASES  # noqa: F401  (the aliases resolve_mimic_layer takes)
from raymimic.mimic.params import get_parameter, unwrap


def _last_block(transformer: nn.Module, prefix: str) -> str:
    blocks = getattr(transformer, "resblocks", None)
    if blocks is None:
        raise ValueError(f"{prefix} has no transformer resblocks; pass the mimic layer as a parameter name")
    return f"{prefix}.resblocks.{len(blocks) - 1}.mlp.c_proj.weight"


def resolve_mimic_layer(model: nn.Module, layer: str = "image-mlp") -> str:
    """Parameter name for ``layer``: an alias of :data:`ALIASES` or any 2-D parameter name."""
    model = unwrap(model)
    if layer == "image-mlp":
        name = _last_block(model.visual.transformer, "visual.transformer")
    elif layer == "text-mlp":
        name = _last_block(model.transformer, "transformer")
    elif layer == "image-proj":
        name = "visual.proj"
    elif layer == "text-proj":
        name = "text_projection" if isinstance(getattr(model, "text_projection", None), nn.Parameter) else "text_projection.weight"
    else:
        name = layer
    get_parameter(model, name)  # clear error with close names when it does not exist
    return name


def sample_dim(model: nn.Module, name: str) -> int:
    """Which input dimension of the mimic layer indexes samples (open_clip >= 2.2x is batch-first)."""
    model = unwrap(model)
    owner = model.visual.transformer if name.startswith("visual.transformer.") else getattr(model, "transformer", None)
    if owner is not None and ".resblocks." in name:
        return 0 if getattr(owner, "batch_first", True) else 1
    return 0
