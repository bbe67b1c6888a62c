"""What the filters share: embedding columns as matrices, device copies of a large state held for one stage, chunk
sizes by device, float32 similarities of stored (float16) embeddings, and the stage that streams one state to its tasks."""
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


def task_device(num_gpus: float = 0) -> str:
    import torch

    return "cuda" if num_gpus and torch.cuda.is_available() else "cpu"


class DeviceStates:
    """Arrays of one state as torch tensors on a device, held by their owner until :meth:`release`.

    On the CPU the tensors are views of the arrays; on a GPU they are copies, made once and reused
    call after call. The owner is what lives as long as the stage's work: a :class:`StreamedScorer`
    (one actor of a stage, released when Ray Data drops the actor at the stage's end), or one
    scoring call (a fresh instance, dropped when the call returns).
    """

    def __init__(self):
        self._held: dict[tuple, dict] = {}

    def __len__(self) -> int:
        return len(self._held)

    def tensors(self, state: dict, names: Sequence[str], device: str) -> dict:
        import torch

        key = (state.get("token"), tuple(names), str(device))
        if key not in self._held:
            if any(held_key[0] != key[0] for held_key in self._held):
                self.release()  # one state at a time
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", UserWarning)  # arrays from the object store are read-only; they are never written
                self._held[key] = {name: torch.from_numpy(np.asarray(state[name])).to(device) for name in names}
        return self._held[key]

    def release(self) -> None:
        """Drop every tensor held; on CUDA hand the freed blocks back to the device (``torch.cuda.empty_cache``)."""
        on_cuda = any(str(key[2]).startswith("cuda") for key in self._held)
        self._held.clear()
        if on_cuda:
            import torch

            torch.cuda.empty_cache()


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


def resolve_state(state):
    """A state passed to a Ray task or actor as an ObjectRef (Ray Data does not resolve refs in its arguments): read
    from the object store (zero-copy); a plain dict passes through. Nothing keeps it once its user drops it."""
    if isinstance(state, dict):
        return state
    import ray

    return ray.get(state)


class StreamedScorer:
    """``map_batches`` callable of a stage on an actor pool: ``score_frame(batch, state, **kwargs, device_states=...)``
    with one state read once and its device copy held for the whole stage. :meth:`close` releases it; Ray Data
    runs it (through ``__del__``) when it drops the actor at the end of the stage."""

    def __init__(self, score_frame: Callable, state, kwargs: dict):
        self.device_states = DeviceStates()
        self.score_frame, self.kwargs = score_frame, kwargs
        self.state = resolve_state(state)

    def __call__(self, batch):
        return self.score_frame(batch, self.state, **self.kwargs, device_states=self.device_states)

    def close(self) -> None:
        self.device_states.release()

    def __del__(self):
        self.close()


def gpu_actors(num_gpus: float) -> tuple[int, int]:
    """Actor pool bounds for ``num_gpus`` per actor: from one to as many as the cluster's GPUs hold."""
    import ray

    return 1, max(1, int(ray.cluster_resources().get("GPU", 0) // num_gpus))


def score_stage(ds, score_frame: Callable, state, kwargs: dict, rows_per_call: int | None, num_gpus: float = 0, actors=None):
    """Ray Data stage scoring ``ds`` with ``score_frame`` against ``state`` (an ObjectRef or a dict).

    ``actors`` (a size or ``(min, max)``; by default one pool per GPU when ``num_gpus``): a pool of
    :class:`StreamedScorer` actors, each holding the state's device copy until the stage ends and the
    actor is dropped. Without actors (the CPU's default): one Ray task per call, whose tensors are views
    of the object store's arrays and are dropped when the call returns.
    """
    if actors is None and num_gpus:
        actors = gpu_actors(num_gpus)
    extra = {"num_gpus": num_gpus} if num_gpus else {}
    if actors:
        from ray.data import ActorPoolStrategy

        pool = ActorPoolStrategy(min_size=actors[0], max_size=actors[1]) if isinstance(actors, tuple) else ActorPoolStrategy(size=actors)
        return ds.map_batches(StreamedScorer, fn_constructor_args=(score_frame, state, kwargs), batch_format="pandas",
                              batch_size=rows_per_call, compute=pool, **extra)
    return ds.map_batches(score_frame, fn_args=(state,), fn_kwargs=kwargs, batch_format="pandas", batch_size=rows_per_call, **extra)


class StreamedScoreFilter(ScoreFilter):
    """A :class:`ScoreFilter` whose tasks read one large state (a negative bank, target embeddings) from the
    object store instead of carrying it in the pickled stage (:func:`score_stage`)."""

    #: rows per map_batches call: the memory of a task does not grow with the block size
    rows_per_call = 4096

    def _score_fn(self) -> tuple[Callable, object, dict]:
        """``(score_frame, state or its ObjectRef, score_frame's other keyword arguments)``."""
        raise NotImplementedError

    def scored(self, ds):
        if self._scored is not None and self._scored_source is ds:
            return self._scored
        fn, state, kwargs = self._score_fn()
        out = score_stage(ds, fn, state, kwargs, self.rows_per_call, self.num_gpus)
        if self.top_fraction is not None:
            out = out.materialize()  # read twice (quantile, then apply): score only once
        self._scored, self._scored_source = out, ds
        return out

    @staticmethod
    def _put(state: dict):
        import ray

        return ray.put(state)
