"""DataComp uids and subset files.

A DataComp uid is 32 lower-case hex characters. A *subset file* is a ``.npy`` numpy array
of dtype ``"u8,u8"``, sorted, each uid stored as ``(int(uid[:16], 16), int(uid[16:], 16))``;
DataComp's ``resharder.py -s subset.npy`` reads exactly this (a uid repeated k times is
upsampled k times, so repeats are kept, never de-duplicated, here).
"""
from __future__ import annotations

import io
import re
from typing import Iterable

import fsspec
import numpy as np

SUBSET_DTYPE = np.dtype("u8,u8")
_UID_RE = re.compile(r"^[0-9a-f]{32}$")


def is_valid_uid(uid: object) -> bool:
    return isinstance(uid, str) and bool(_UID_RE.match(uid))


def validate_uid(uid: object, where: str = "") -> str:
    """Return ``uid`` normalised to lower case, or raise ``ValueError`` saying what is wrong."""
    if isinstance(uid, bytes):
        uid = uid.decode("ascii", errors="replace")
    if isinstance(uid, str):
        lowered = uid.strip().lower()
        if _UID_RE.match(lowered):
            return lowered
    loc = f" in {where}" if where else ""
    raise ValueError(f"malformed uid {uid!r}{loc}: a DataComp uid is 32 hex characters, e.g. '{'0' * 31}1'")


def uid_to_pair(uid: str) -> tuple[int, int]:
    return int(uid[:16], 16), int(uid[16:], 16)


def pair_to_uid(hi: int, lo: int) -> str:
    return f"{int(hi):016x}{int(lo):016x}"


def uids_to_array(uids: Iterable[str], validate: bool = True) -> np.ndarray:
    """uids -> sorted ``"u8,u8"`` array (repeats kept: they mean upsampling in DataComp)."""
    uids = list(uids)
    if validate:
        uids = [validate_uid(u, where=f"position {i}") for i, u in enumerate(uids)]
    hi = np.fromiter((int(u[:16], 16) for u in uids), dtype=np.uint64, count=len(uids))
    lo = np.fromiter((int(u[16:], 16) for u in uids), dtype=np.uint64, count=len(uids))
    out = np.empty(len(uids), dtype=SUBSET_DTYPE)
    out["f0"], out["f1"] = hi, lo
    out.sort(order=["f0", "f1"])
    return out


def array_to_uids(array: np.ndarray) -> list[str]:
    if array.dtype != SUBSET_DTYPE:
        raise ValueError(f"subset array has dtype {array.dtype}; DataComp subsets are {SUBSET_DTYPE}")
    return [pair_to_uid(h, l) for h, l in zip(array["f0"].tolist(), array["f1"].tolist())]


def write_subset(path: str, uids: Iterable[str]) -> np.ndarray:
    """Write a DataComp subset file to ``path`` (local or any fsspec URI) and return the array."""
    array = uids_to_array(uids)
    buffer = io.BytesIO()
    np.save(buffer, array)
    with fsspec.open(path, "wb") as f:
        f.write(buffer.getvalue())
    return array


def read_subset(path: str) -> np.ndarray:
    """Read a subset file as DataComp's resharder does; checks dtype and order."""
    with fsspec.open(path, "rb") as f:
        array = np.load(io.BytesIO(f.read()), allow_pickle=False)
    if array.dtype != SUBSET_DTYPE:
        raise ValueError(f"{path}: dtype {array.dtype}, expected {SUBSET_DTYPE} (DataComp subset file)")
    if len(array) > 1:
        keys = array.view(SUBSET_DTYPE)
        if np.any((keys["f0"][1:] < keys["f0"][:-1]) | ((keys["f0"][1:] == keys["f0"][:-1]) & (keys["f1"][1:] < keys["f1"][:-1]))):
            raise ValueError(f"{path}: subset array is not sorted; DataComp's resharder uses binary search and needs it sorted")
    return array


def read_subset_uids(path: str) -> list[str]:
    return array_to_uids(read_subset(path))
