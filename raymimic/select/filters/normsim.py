"""NormSim (arXiv 2405.19547): ||(<f_t, f_i>)_t||_p against target embeddings the user supplies, streamed in chunks."""
from __future__ import annotations

import io
import uuid
from collections.abc import Iterable

import numpy as np
import pandas as pd

from raymimic.select.filters.common import (
    DeviceStates,
    StreamedScoreFilter,
    chunk_sizes,
    embedding_matrix,
    normalize_rows,
    resolve_state,
    similarities,
    task_device,
)


def _npy_source(source, chunk_rows: int) -> tuple[tuple, Iterable[np.ndarray]]:
    """Shape and row chunks of a 2-D ``.npy`` file (any fsspec URI), read sequentially, never the whole array at once
    (a Fortran-ordered or unusual file is read whole)."""
    import fsspec

    f = fsspec.open(source, "rb").open()
    version = np.lib.format.read_magic(f)
    readers = {(1, 0): np.lib.format.read_array_header_1_0, (2, 0): np.lib.format.read_array_header_2_0}
    shape, fortran, dtype = readers[version](f) if version in readers else ((), True, np.dtype(object))
    if len(shape) != 2 or fortran or dtype.hasobject:
        f.seek(0)
        array = np.load(io.BytesIO(f.read()), allow_pickle=False)
        f.close()
        return array.shape, (array[i:i + chunk_rows] for i in range(0, max(len(array), 1), chunk_rows))

    def chunks():
        with f:
            row_bytes = shape[1] * dtype.itemsize
            for start in range(0, shape[0], chunk_rows):
                rows = min(chunk_rows, shape[0] - start)
                yield np.frombuffer(f.read(rows * row_bytes), dtype=dtype).reshape(rows, shape[1])

    return shape, chunks()


def prepare_targets(targets, p: float = 2, dtype: str = "float32", chunk_rows: int = 16384) -> dict:
    """What NormSim needs of the target set, computed once from its normalised embeddings.

    ``targets``: an array ``[n_targets, dim]`` or a ``.npy`` path / fsspec URI (read in chunks of ``chunk_rows``).
    p = 2: the Gram matrix C = T^T T (dim x dim, accumulated in float64), since ||T f||_2 = sqrt(f^T C f): a task
    never sees the targets. p = inf: the normalised targets themselves, stored as ``dtype`` (float16 halves their
    memory), written chunk by chunk into one preallocated array.
    """
    if p not in (2, np.inf, float("inf")):
        raise ValueError(f"NormSim uses p = 2 or inf, got {p!r}")
    if np.dtype(dtype) not in (np.float16, np.float32):
        raise ValueError(f"target dtype must be float16 or float32, got {dtype!r}")
    if isinstance(targets, str):
        shape, chunks = _npy_source(targets, chunk_rows)
    else:
        array = np.asarray(targets)
        shape, chunks = array.shape, (array[i:i + chunk_rows] for i in range(0, len(array), chunk_rows))
    if len(shape) != 2 or shape[0] == 0:
        raise ValueError(f"target embeddings must be a non-empty 2-D array [n_targets, dim], got shape {shape}")
    n, dim = int(shape[0]), int(shape[1])
    unit_targets = np.empty((n, dim), dtype=dtype) if np.isinf(p) else None
    gram = np.zeros((dim, dim)) if not np.isinf(p) else None
    start = 0
    for chunk in chunks:
        unit = normalize_rows(np.asarray(chunk, dtype=np.float64))
        if np.isinf(p):
            unit_targets[start:start + len(unit)] = unit
        else:
            gram += unit.T @ unit
        start += len(unit)

    state = {"p": float(p), "n_targets": n, "dim": dim, "token": uuid.uuid4().hex}
    state["targets" if np.isinf(p) else "gram"] = unit_targets if np.isinf(p) else gram
    return state


def norm_sim_prepared(embeddings: np.ndarray, state: dict, chunk_rows: int | None = None, chunk_targets: int | None = None,
                      device: str = "cpu", device_states: DeviceStates | None = None) -> np.ndarray:
    """NormSim of rows against a :func:`prepare_targets` state, in chunks: p = 2 as sqrt(f^T C f) (float64, no
    rows x targets matrix); p = inf as a running max of |<f_t, f_i>| over ``chunk_targets`` targets at a time
    (targets in their storage dtype, float32 accumulation: :func:`similarities`). Chunk sizes default by device;
    results stay on the device until the end. The state's device copy is held by ``device_states`` (its owner's,
    e.g. a stage actor's), else by this call alone."""
    import torch

    embeddings = np.asarray(embeddings)
    if len(embeddings) == 0:
        return np.zeros(0)
    if embeddings.shape[1] != state["dim"]:
        raise ValueError(f"embeddings have dimension {embeddings.shape[1]} but the targets have {state['dim']}")
    chunk_rows, chunk_targets = chunk_sizes("normsim", device, chunk_rows, chunk_targets)
    device_states = DeviceStates() if device_states is None else device_states
    out = torch.zeros(len(embeddings), dtype=torch.float64, device=device)
    if not np.isinf(state["p"]):
        gram = device_states.tensors(state, ("gram",), device)["gram"]
        for r0 in range(0, len(embeddings), chunk_rows):
            f = torch.from_numpy(normalize_rows(embeddings[r0:r0 + chunk_rows].astype(np.float64))).to(device)
            out[r0:r0 + len(f)] = ((f @ gram) * f).sum(dim=1).clamp_(min=0).sqrt_()
        return out.cpu().numpy()
    targets = device_states.tensors(state, ("targets",), device)["targets"]
    for r0 in range(0, len(embeddings), chunk_rows):
        f = torch.from_numpy(normalize_rows(embeddings[r0:r0 + chunk_rows].astype(np.float32))).to(device)
        best = torch.zeros(len(f), dtype=torch.float32, device=device)
        for t0 in range(0, len(targets), chunk_targets):
            best = torch.maximum(best, similarities(f, targets[t0:t0 + chunk_targets]).abs_().amax(dim=1))
        out[r0:r0 + len(f)] = best
    return out.cpu().numpy()


def norm_sim(embeddings: np.ndarray, targets: np.ndarray, p: float = 2) -> np.ndarray:
    """NormSim_p(i) = || (<f_t, f_i>)_{t in targets} ||_p, p = 2 or inf (cosines: both sides normalised)."""
    return norm_sim_prepared(embeddings, prepare_targets(targets, p))


def normsim_score_frame(batch: pd.DataFrame, state, score_column: str, column: str, chunk_rows: int, chunk_targets: int,
                         num_gpus: float, device_states: DeviceStates | None = None) -> pd.DataFrame:
    state = resolve_state(state)
    matrix = embedding_matrix(batch, column)
    if len(batch) and matrix.shape[1] != state["dim"]:
        raise ValueError(f"{column} has dimension {matrix.shape[1]} but the targets have {state['dim']}")
    batch[score_column] = norm_sim_prepared(matrix, state, chunk_rows, chunk_targets, task_device(num_gpus),
                                                   device_states) if len(batch) else np.zeros(0)
    return batch


class NormSimFilter(StreamedScoreFilter):
    """NormSim (arXiv 2405.19547) against the embeddings of the downstream (target) data the user supplies.

    ``targets``: an array ``[n_targets, dim]`` or a ``.npy`` path / fsspec URI, normalised once here (on the
    driver, read in chunks). p = 2 keeps only C = T^T T (dim x dim) and scores sqrt(f^T C f): memory and time
    do not depend on the number of targets. p = inf keeps the normalised targets (``target_dtype``: float32, or
    float16 for half the memory; 1.28M x 768 targets are 3.9 / 2.0 GB, shared by a node's tasks through the
    object store) and takes a running max over ``chunk_targets`` at a time. ``num_gpus``: torch on CUDA.
    """

    name = "normsim"

    def __init__(self, targets, p: float = 2, top_fraction: float | None = None, min_score: float | None = None, column: str = "l14_img",
                 target_dtype: str = "float32", num_gpus: float = 0, chunk_rows: int | None = None, chunk_targets: int | None = None,
                 drop: bool = True):
        super().__init__(top_fraction, min_score, drop)
        self.p, self.column, self.target_dtype, self.num_gpus = p, column, str(np.dtype(target_dtype)), num_gpus
        self.chunk_rows, self.chunk_targets = chunk_rows, chunk_targets
        self.state = prepare_targets(targets, p, target_dtype)
        self._state_ref = None

    @property
    def n_targets(self) -> int:
        return int(self.state["n_targets"])

    def _score_fn(self):
        if self._state_ref is None:
            import ray

            self._state_ref = self._put(self.state)
            self.state = ray.get(self._state_ref)  # the driver keeps the object-store copy only
        return normsim_score_frame, self._state_ref, {"score_column": self.score_column, "column": self.column,
                                      "chunk_rows": self.chunk_rows, "chunk_targets": self.chunk_targets, "num_gpus": self.num_gpus}

    def score_batch(self, batch: pd.DataFrame) -> np.ndarray:
        frame = normsim_score_frame(batch.copy(), self.state, "s", self.column, self.chunk_rows, self.chunk_targets, self.num_gpus)
        return frame["s"].to_numpy()

    def params(self) -> dict:
        return {**super().params(), "p": "inf" if np.isinf(self.p) else self.p, "column": self.column, "n_targets": self.n_targets,
                "dim": int(self.state["dim"]), "target_dtype": self.target_dtype if np.isinf(self.p) else None}
