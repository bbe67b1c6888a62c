"""DataComp uids and subset files.

A DataComp uid is 32 lower-case hex characters. A *subset file* is a ``.npy`` numpy array
of dtype ``"u8,u8"``, sorted, each uid stored as ``(int(uid[:16], 16), int(uid[16:], 16))``;
DataComp's ``resharder.py -s subset.npy`` reads exactly this (a uid repeated k times is
upsampled k times, so repeats are kept, never de-duplicated, here).
"""
from __future__ import annotations

import io
import re
from collections.abc import Iterable

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


_HEX = np.full(256, 255, dtype=np.uint8)
for _i, _c in enumerate(b"0123456789abcdef"):
    _HEX[_c] = _i
for _i, _c in enumerate(b"ABCDEF"):
    _HEX[_c] = 10 + _i
_SHIFTS = np.arange(60, -1, -4, dtype=np.uint64)


def uid_pairs(uids) -> tuple[np.ndarray, np.ndarray]:
    """``(hi, lo)`` uint64 arrays for 32-hex uids, vectorised (millions per second).

    Workers convert their own blocks with it, so a driver building a subset file from a
    cluster-wide decision only ever holds 16 bytes per kept uid. ``ValueError`` names a bad uid.
    """
    uids = np.asarray(uids)
    if len(uids) == 0:
        return np.zeros(0, np.uint64), np.zeros(0, np.uint64)
    as_bytes = uids.astype("S33")
    lengths = np.char.str_len(as_bytes)
    nibbles = _HEX[as_bytes.astype("S32").view(np.uint8).reshape(-1, 32)]
    bad = (lengths != 32) | (nibbles == 255).any(axis=1)
    if bad.any():
        first = int(np.flatnonzero(bad)[0])
        raise ValueError(f"malformed uid {uids[first]!r} at position {first} ({int(bad.sum())} bad): "
                         f"a DataComp uid is 32 hex characters, e.g. '{'0' * 31}1'")
    nibbles = nibbles.astype(np.uint64)
    hi = np.bitwise_or.reduce(nibbles[:, :16] << _SHIFTS, axis=1)
    lo = np.bitwise_or.reduce(nibbles[:, 16:] << _SHIFTS, axis=1)
    return hi, lo


def arrow_uid_pairs(column) -> tuple[np.ndarray, np.ndarray]:
    """``(hi, lo)`` of a pyarrow string column (array or chunked), read from its buffers without Python strings.

    A chunk whose every value is 32 bytes long and not null is decoded in place; any other chunk
    goes through :func:`uid_pairs`, which names a bad uid.
    """
    chunks = column.chunks if hasattr(column, "chunks") else [column]
    his, los = [np.zeros(0, np.uint64)], [np.zeros(0, np.uint64)]
    for chunk in chunks:
        hi, lo = _chunk_pairs(chunk)
        his.append(hi)
        los.append(lo)
    return np.concatenate(his), np.concatenate(los)


def _chunk_pairs(chunk) -> tuple[np.ndarray, np.ndarray]:
    import pyarrow as pa

    n = len(chunk)
    if n == 0 or chunk.null_count or not (pa.types.is_string(chunk.type) or pa.types.is_large_string(chunk.type)):
        return uid_pairs(chunk.to_numpy(zero_copy_only=False))
    _, offsets_buffer, data_buffer = chunk.buffers()
    offset_type = np.int64 if pa.types.is_large_string(chunk.type) else np.int32
    offsets = np.frombuffer(offsets_buffer, offset_type)[chunk.offset: chunk.offset + n + 1]
    if offsets[-1] - offsets[0] != 32 * n or (np.diff(offsets) != 32).any():
        return uid_pairs(chunk.to_numpy(zero_copy_only=False))
    nibbles = _HEX[np.frombuffer(data_buffer, np.uint8)[offsets[0]: offsets[-1]].reshape(n, 32)]
    if (nibbles == 255).any():
        return uid_pairs(chunk.to_numpy(zero_copy_only=False))  # raises, naming the bad uid
    return _pack(nibbles[:, :16]), _pack(nibbles[:, 16:])


def _pack(nibbles: np.ndarray) -> np.ndarray:
    """16 hex digits per row -> uint64, two digits per byte (big-endian bytes viewed as one word)."""
    packed = (nibbles[:, 0::2] << 4) | nibbles[:, 1::2]
    return np.ascontiguousarray(packed).view(">u8").ravel().astype(np.uint64)


_DIGITS = np.frombuffer(b"0123456789abcdef", np.uint8)


def _hex_digits(words: np.ndarray) -> np.ndarray:
    as_bytes = np.asarray(words, np.uint64).astype(">u8").view(np.uint8).reshape(-1, 8)
    out = np.empty((len(as_bytes), 16), np.uint8)
    out[:, 0::2] = _DIGITS[as_bytes >> 4]
    out[:, 1::2] = _DIGITS[as_bytes & 15]
    return out


def pairs_to_hex(hi: np.ndarray, lo: np.ndarray) -> np.ndarray:
    """32-character lower-case uids (numpy ``S32``) of ``(hi, lo)`` pairs, vectorised: the inverse of :func:`uid_pairs`."""
    out = np.empty((len(hi), 32), np.uint8)
    out[:, :16] = _hex_digits(hi)
    out[:, 16:] = _hex_digits(lo)
    return out.view("S32").ravel()


GOLDEN_GAMMA = np.uint64(0x9E3779B97F4A7C15)
"""splitmix64's increment: added between rounds so that zero and equal inputs still spread."""


def mix64(z: np.ndarray) -> np.ndarray:
    """splitmix64's finaliser, vectorised: a bijection of uint64 whose outputs look uniform even for close inputs."""
    with np.errstate(over="ignore"):
        z = np.asarray(z, np.uint64)
        z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        return z ^ (z >> np.uint64(31))


def keyed_uniform(seed: int, *words: np.ndarray) -> np.ndarray:
    """A number in [0, 1) per row, a seeded hash of the row's uint64 ``words`` (e.g. a uid's two words and a step).

    Depends on the row's values alone, never on which file, block or task holds it: a sample drawn
    with it (``keyed_uniform(...) < fraction``) is the same however a table is laid out.
    """
    with np.errstate(over="ignore"):
        z = np.full(len(words[0]), np.uint64(int(seed) % 2**64), np.uint64) + GOLDEN_GAMMA
        for word in words:
            z = mix64(z ^ np.asarray(word).astype(np.uint64)) + GOLDEN_GAMMA
    return unit_interval(mix64(z))


def unit_interval(z: np.ndarray) -> np.ndarray:
    """uint64 hashes as floats in [0, 1): their top 53 bits, exactly representable."""
    return (np.asarray(z, np.uint64) >> np.uint64(11)).astype(np.float64) * 2.0 ** -53


def pairs_to_array(hi: np.ndarray, lo: np.ndarray) -> np.ndarray:
    """Sorted ``"u8,u8"`` subset array (repeats kept: they mean upsampling in DataComp)."""
    out = np.empty(len(hi), dtype=SUBSET_DTYPE)
    out["f0"], out["f1"] = hi, lo
    out.sort(order=["f0", "f1"])
    return out


def uids_to_array(uids: Iterable[str]) -> np.ndarray:
    """uids -> sorted ``"u8,u8"`` array; every uid is validated."""
    return pairs_to_array(*uid_pairs(np.array(list(uids), dtype=str)))


def array_to_uids(array: np.ndarray) -> list[str]:
    if array.dtype != SUBSET_DTYPE:
        raise ValueError(f"subset array has dtype {array.dtype}; DataComp subsets are {SUBSET_DTYPE}")
    return [pair_to_uid(hi, lo) for hi, lo in zip(array["f0"].tolist(), array["f1"].tolist())]


def _save(path: str, array: np.ndarray) -> np.ndarray:
    buffer = io.BytesIO()
    np.save(buffer, array)
    with fsspec.open(path, "wb") as f:
        f.write(buffer.getvalue())
    return array


def write_subset(path: str, uids: Iterable[str]) -> np.ndarray:
    """Write a DataComp subset file to ``path`` (local or any fsspec URI) and return the array."""
    return _save(path, uids_to_array(uids))


def write_subset_pairs(path: str, hi: np.ndarray, lo: np.ndarray) -> np.ndarray:
    """Write a subset file from ``(hi, lo)`` pairs (see :func:`uid_pairs`)."""
    return _save(path, pairs_to_array(hi, lo))


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
