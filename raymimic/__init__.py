"""raymimic: cluster-scale data selection for CLIP-style models with the mimic score.

Top-level names are imported lazily so that ``import raymimic`` does not pull in torch or ray.
"""
from __future__ import annotations

import importlib

__version__ = "0.1.0"

_LAZY = {
    "read_pool": "raymimic.data.pool",
    "evaluate": "raymimic.evaluate",
}


def __getattr__(name: str):
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'raymimic' has no attribute {name!r}")
