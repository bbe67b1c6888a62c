"""What the filters share: embedding columns as matrices, per-worker device copies of a large state, chunk sizes
by device, float32 similarities of stored (float16) embeddings, and the stage that streams one state to its tasks."""
from __future__ import annotations

import warnings
from collections.abc import Callable, Sequence

import numpy as np
import pandas as pd

from raymimic.select.stages import ScoreFilter


def embedding_matrix(batch: pd.DataFrame, column: str) -> np.ndarray:
    if column not in batch.columns:
        raise ValueError(f"column {column!r} is missing (have {list(batch.columns)}); "
                         "read the pool with embeddings, e.g. read_metadata(pool, embeddings=[...])")
    return np.stack([np.asarray(v, dtype=np.float32) for v in batch[column].to_numpy()]) if len(batch) else np.zeros((0, 1), np.float32)


def normalize_rows(x: np.ndarray) -> np.ndarray:
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)


_DEVICE_CACHE: dict = {}


def task_device(num_gpus: float = 0) -> str:
    import torch

    return "cuda" if num_gpus and torch.cuda.is_available() else "cpu"


def on_device(state: dict, names: Sequence[str], device: str) -> dict:
    """Arrays of ``state`` as torch tensors on ``device``: views on CPU, copies cached per worker on a GPU."""
    import torch

    key = (state.get("token"), device)
    if device != "cpu" and key in _DEVICE_CACHE:
        return _DEVICE_CACHE[key]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # arrays from the object store are read-only; they are never written
        tensors = {name: torch.from_numpy(np.asarray(state[name])).to(device) for name in names}
    if device != "cpu":
        _DEVICE_CACHE.clear()  # one state per worker at a time
        _DEVICE_CACHE[key] = tensors
    return tensors


# rows x bank (or targets) per similarity block: what keeps a CPU's caches busy, and what fills a GPU
CHUNKS = {"negclip": {"cpu": (512, 8192), "cuda": (8192, 65536)}, "normsim": {"cpu": (1024, 32768), "cuda": (16384, 262144)}}


def chunk_sizes(kind: str, device: str, rows: int | None = None, columns: int | None = None) -> tuple[int, int]:
    """``(rows, bank or target columns)`` of one similarity block of ``kind`` on ``device``; given values win."""
    default_rows, default_columns = CHUNKS[kind]["cuda" if str(device).startswith("cuda") else "cpu"]
    return rows or default_rows, columns or default_columns


def split_to(x, dtype):
    """``(high, low)`` in ``dtype`` with ``high + low = x`` to about the square of ``dtype``'s precision (float32's for float16)."""
    high = x.to(dtype)
    return high, (x - high.float()).to(dtype)


def similarities(x, stored):
    """``x @ stored.T`` in float32, ``x`` float32. ``stored`` stays in its storage dtype: on CUDA a float16/bfloat16
    block is multiplied as it is, by the two halves of ``x`` (:func:`split_to`: rounding ``x`` itself to float16
    would move logits at tau = 0.01 by up to about 0.1), each product accumulated and returned in float32; on the
    CPU (no such kernel) the block is upcast."""
    import torch

    if stored.is_cuda and stored.dtype in (torch.float16, torch.bfloat16):
        high, low = split_to(x, stored.dtype)
        return torch.mm(high, stored.T, out_dtype=torch.float32).add_(torch.mm(low, stored.T, out_dtype=torch.float32))
    return x @ stored.float().T


_RESOLVED: dict = {}


def resolve_state(state):
    """A state passed to a Ray task as an ObjectRef (Ray Data does not resolve refs in fn_kwargs): fetched once per
    worker (zero-copy from the object store); a plain dict passes through."""
    if isinstance(state, dict):
        return state
    import ray

    key = state.hex()
    if key not in _RESOLVED:
        _RESOLVED.clear()
        _RESOLVED[key] = ray.get(state)
    return _RESOLVED[key]


class StreamedScoreFilter(ScoreFilter):
    """A :class:`ScoreFilter` whose tasks read one large state (a negative bank, target embeddings) from the
    object store instead of carrying it in the pickled stage."""

    #: rows per map_batches call: the memory of a task does not grow with the block size
    rows_per_call = 4096

    def _score_fn(self) -> tuple[Callable, dict]:
        raise NotImplementedError

    def scored(self, ds):
        if self._scored is not None and self._scored_source is ds:
            return self._scored
        fn, kwargs = self._score_fn()
        extra = {"num_gpus": self.num_gpus} if self.num_gpus else {}
        out = ds.map_batches(fn, fn_kwargs=kwargs, batch_format="pandas", batch_size=self.rows_per_call, **extra)
        if self.top_fraction is not None:
            out = out.materialize()  # read twice (quantile, then apply): score only once
        self._scored, self._scored_source = out, ds
        return out

    @staticmethod
    def _put(state: dict):
        import ray

        return ray.put(state)
