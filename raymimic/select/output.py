"""Write a filter's result: ``keep.npy``, ``decisions.parquet`` and ``summary.json``.

The decisions are streamed through the driver one batch at a time: each batch is appended
to ``decisions.parquet`` and its kept uids are converted to DataComp ``(u8, u8)`` pairs, so
the driver holds 16 bytes per kept uid (the subset file itself) and one batch, whatever
the size of the pool.
"""
from __future__ import annotations

import json
from collections.abc import Sequence

import fsspec
import numpy as np
import pyarrow.parquet as pq

from raymimic.data.uids import uid_pairs, write_subset_pairs
from raymimic.select.quality import QualityAccumulator


def _scalar_columns(schema, wanted: Sequence[str] | None) -> list[str]:
    names = schema.names
    if wanted is not None:
        return [c for c in wanted if c in names]
    # embeddings (tensor columns) do not belong in a decisions table
    return [n for n, t in zip(names, schema.types) if not hasattr(t, "shape") and "Tensor" not in type(t).__name__]


def open_output(decisions, output: str, keep_column: str, columns: Sequence[str] | None):
    """``(fs, root, columns)``: the output folder (created) and the decision columns to write (``uid``, ``keep_column`` included)."""
    fs, root = fsspec.core.url_to_fs(output)
    fs.makedirs(root, exist_ok=True)
    chosen = _scalar_columns(decisions.schema(), columns)
    for needed in ("uid", keep_column):
        if needed not in chosen:
            raise ValueError(f"decisions lack column {needed!r} (have {decisions.schema().names})")
    return fs, root, chosen


def write_outputs(decisions, output: str, keep_column: str = "keep", quality_column: str = "mean_raw_score",
                  columns: Sequence[str] | None = None, summary: dict | None = None, write: bool = True) -> dict:
    """Stream ``decisions`` (Dataset with ``uid`` and ``keep_column``) to ``output``; return the summary (``write``: also as summary.json).

    Every file is written under a temporary name and renamed once complete, summary.json last.
    """
    fs, root, chosen = open_output(decisions, output, keep_column, columns)
    his, los, sink = [], [], DecisionSink(quality_column)
    with fs.open(f"{root}/{TEMPORARY_PREFIX}decisions.parquet", "wb") as stream:
        for batch in decisions.select_columns(chosen).iter_batches(batch_format="pyarrow", batch_size=65_536):
            keep = sink.append(stream, batch, keep_column)
            hi, lo = uid_pairs(batch["uid"].to_numpy(zero_copy_only=False)[keep])
            his.append(hi)
            los.append(lo)
        sink.close()
    commit(fs, f"{root}/{TEMPORARY_PREFIX}decisions.parquet", f"{root}/decisions.parquet")
    subset = write_subset_pairs(f"{output.rstrip('/')}/{TEMPORARY_PREFIX}keep.npy", np.concatenate(his), np.concatenate(los))
    commit(fs, f"{root}/{TEMPORARY_PREFIX}keep.npy", f"{root}/keep.npy")
    return sink.summary(fs, root, output, summary, int(len(subset)), write)


class DecisionSink:
    """What both decision writers share: ``decisions.parquet`` appended batch by batch, the quality
    estimate of the kept rows, and ``summary.json``."""

    def __init__(self, quality_column: str):
        self.quality_column, self.quality, self.writer, self.n_rows = quality_column, QualityAccumulator(), None, 0

    def append(self, stream, batch, keep_column: str) -> np.ndarray:
        """Append ``batch`` (pyarrow) to the open ``decisions.parquet`` stream; return its keep mask."""
        keep = batch[keep_column].to_numpy(zero_copy_only=False).astype(bool)
        self.n_rows += len(keep)
        self.writer = self.writer or pq.ParquetWriter(stream, batch.schema)
        self.writer.write_table(batch.cast(self.writer.schema) if batch.schema != self.writer.schema else batch)
        if self.quality_column in batch.column_names:
            values = batch[self.quality_column].to_numpy(zero_copy_only=False).astype(np.float64)
            # pool uids without any score row (counted in pool_counts) have no score to average
            scored = ~np.isnan(values)
            self.quality.update(keep[scored], values[scored])
        return keep

    def close(self) -> None:
        if self.writer is None:
            raise ValueError("the filter produced no decision at all (no uid): nothing to write")
        self.writer.close()

    def summary(self, fs, root: str, output: str, summary: dict | None, n_kept: int, write: bool = True) -> dict:
        """``summary`` with the counts and the quality estimate; ``write``: committed as summary.json."""
        result = dict(summary or {})
        result["quality"] = {**self.quality.result(), "score_column": self.quality_column} if self.quality.n else None
        result.update(n_decisions=self.n_rows, n_kept=n_kept, fraction_kept=n_kept / self.n_rows)
        result["files"] = {name: f"{output.rstrip('/')}/{name}" for name in ("keep.npy", "decisions.parquet", "summary.json")}
        if write:
            write_summary(fs, root, result)
        return result


TEMPORARY_PREFIX = ".tmp-"
"""Outputs are written under this prefix and renamed once complete: a reader never sees a half-written file."""


def commit(fs, temporary: str, final: str) -> None:
    """Rename a complete file into place (atomic on a local disk; on object stores the copy appears whole)."""
    fs.mv(temporary, final)


def write_summary(fs, root: str, summary: dict) -> None:
    """``summary.json``, written last: its presence marks the output folder complete."""
    with fs.open(f"{root}/{TEMPORARY_PREFIX}summary.json", "w") as f:
        json.dump(summary, f, indent=2, default=json_default)
    commit(fs, f"{root}/{TEMPORARY_PREFIX}summary.json", f"{root}/summary.json")


def json_default(value):
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    raise TypeError(f"not JSON serialisable: {type(value).__name__}")


def read_decisions(path: str):
    """A filter's ``decisions.parquet`` (one file, or a folder of parts written by the tasks) as a ``pyarrow.dataset``:
    ``.schema``, ``.count_rows()`` and ``.to_batches(columns=...)`` read either shape, local or on object storage."""
    import pyarrow.dataset as pads

    fs, root = fsspec.core.url_to_fs(path)
    if fs.isdir(root):
        files = sorted(p for p in fs.find(root) if p.endswith(".parquet"))
        return pads.dataset(files, filesystem=fs, format="parquet")
    return pads.dataset(root, filesystem=fs, format="parquet")
