"""Vectorised uid -> DataComp ``(u8, u8)`` pairs, for building subset files from millions of uids.

``raymimic.data.uids.uids_to_array`` parses uids one by one in Python; on a cluster the
workers convert their own blocks with numpy instead and the driver only holds 16 bytes per
kept uid. The result is byte-for-byte what ``uids_to_array`` gives.
"""
from __future__ import annotations

import io

import fsspec
import numpy as np

from raymimic.data.uids import SUBSET_DTYPE

_HEX = np.full(256, 255, dtype=np.uint8)
for _i, _c in enumerate(b"0123456789abcdef"):
    _HEX[_c] = _i
for _i, _c in enumerate(b"ABCDEF"):
    _HEX[_c] = 10 + _i
_SHIFTS = np.arange(60, -1, -4, dtype=np.uint64)


def uid_pairs(uids) -> tuple[np.ndarray, np.ndarray]:
    """``(hi, lo)`` uint64 arrays for 32-hex-character uids; ``ValueError`` names a bad uid."""
    uids = np.asarray(uids)
    if len(uids) == 0:
        return np.zeros(0, np.uint64), np.zeros(0, np.uint64)
    as_bytes = uids.astype("S33")
    lengths = np.char.str_len(as_bytes)
    nibbles = _HEX[as_bytes.astype("S32").view(np.uint8).reshape(-1, 32)]
    bad = (lengths != 32) | (nibbles == 255).any(axis=1)
    if bad.any():
        raise ValueError(f"malformed uid {uids[np.flatnonzero(bad)[0]]!r} ({int(bad.sum())} bad in this batch): a DataComp uid is 32 hex characters")
    nibbles = nibbles.astype(np.uint64)
    hi = np.bitwise_or.reduce(nibbles[:, :16] << _SHIFTS, axis=1)
    lo = np.bitwise_or.reduce(nibbles[:, 16:] << _SHIFTS, axis=1)
    return hi, lo


def write_subset_pairs(path: str, hi: np.ndarray, lo: np.ndarray) -> np.ndarray:
    """Sort the pairs and save them as a DataComp subset ``.npy`` (any fsspec URI)."""
    array = np.empty(len(hi), dtype=SUBSET_DTYPE)
    array["f0"], array["f1"] = hi, lo
    array.sort(order=["f0", "f1"])
    buffer = io.BytesIO()
    np.save(buffer, array)
    with fsspec.open(path, "wb") as f:
        f.write(buffer.getvalue())
    return array
