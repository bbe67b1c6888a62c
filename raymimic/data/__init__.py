"""DataComp pool layer: uids and subset files, pool and metadata reading on Ray Data,
and CLIP preprocessing.

Names are imported lazily so that ``import raymimic.data`` does not start pulling in ray or torch.
"""
from __future__ import annotations

import importlib

_LAZY = {
    # uids and subset files
    "is_valid_uid": "raymimic.data.uids",
    "validate_uid": "raymimic.data.uids",
    "uids_to_array": "raymimic.data.uids",
    "array_to_uids": "raymimic.data.uids",
    "write_subset": "raymimic.data.uids",
    "read_subset": "raymimic.data.uids",
    "read_subset_uids": "raymimic.data.uids",
    # metadata
    "read_metadata": "raymimic.data.metadata",
    "read_metadata_file": "raymimic.data.metadata",
    "metadata_files": "raymimic.data.metadata",
    "METADATA_COLUMNS": "raymimic.data.metadata",
    "EMBEDDING_KEYS": "raymimic.data.metadata",
    # pool
    "read_pool": "raymimic.data.pool",
    "PoolRejects": "raymimic.data.pool",
    "shard_files": "raymimic.data.pool",
    "read_shard": "raymimic.data.pool",
    "PoolNotReadableError": "raymimic.data._fs",
    # preprocessing
    "preprocess_for_clip": "raymimic.data.preprocess",
}

__all__ = sorted(_LAZY)


def __getattr__(name: str):
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'raymimic.data' has no attribute {name!r}")
