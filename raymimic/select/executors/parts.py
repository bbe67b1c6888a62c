"""The task executor's files: the spill folder, the decision parts read on the driver, and the outputs written from them."""
from __future__ import annotations

import json
import shutil
import tempfile
import uuid

import fsspec
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from raymimic.data.uids import SUBSET_DTYPE
from raymimic.select.output import TEMPORARY_PREFIX, commit


class DecisionParts:
    """The decision parts read on the driver one batch at a time, with the Dataset calls :func:`write_outputs` makes.

    Writing the outputs streams every decision through the driver anyway; reading the parts
    there directly saves starting a Ray Data execution for it.
    """

    def __init__(self, fs, paths: list[str], columns: list[str] | None = None, renames: dict | None = None, in_process: bool = True,
                 task_resources: dict[str, float] | None = None):
        self.fs, self.paths, self.columns, self.renames = fs, list(paths), columns, dict(renames or {})
        self.in_process = in_process  # whether tasks over the parts run in this process (a small table) or on Ray
        self.task_resources = task_resources  # the custom Ray resources each of those Ray tasks asks for

    def _source_names(self) -> list[str]:
        with self.fs.open(self.paths[0], "rb") as f:
            return pq.read_schema(f).names

    def _inverse(self) -> dict:
        return {new: old for old, new in self.renames.items()}

    def schema(self) -> pa.Schema:
        with self.fs.open(self.paths[0], "rb") as f:
            schema = pq.read_schema(f).remove_metadata()
        fields = [schema.field(n).with_name(self.renames.get(n, n)) for n in schema.names]
        if self.columns is not None:
            by_name = {f.name: f for f in fields}
            fields = [by_name[c] for c in self.columns]
        return pa.schema(fields)

    def rename_columns(self, renames: dict) -> DecisionParts:
        if self.columns is not None:
            raise ValueError("rename before selecting columns")
        return DecisionParts(self.fs, self.paths, None, {**self.renames, **renames}, self.in_process, self.task_resources)

    def select_columns(self, columns: list[str]) -> DecisionParts:
        return DecisionParts(self.fs, self.paths, list(columns), self.renames, self.in_process, self.task_resources)

    def iter_batches(self, batch_format: str = "pyarrow", batch_size: int = 65_536):
        if batch_format != "pyarrow":
            raise ValueError("decision parts are read as pyarrow tables")
        inverse = self._inverse()
        wanted = None if self.columns is None else [inverse.get(c, c) for c in self.columns]
        for path in self.paths:
            with self.fs.open(path, "rb") as f:
                for batch in pq.ParquetFile(f).iter_batches(batch_size=batch_size, columns=wanted):
                    table = pa.Table.from_batches([batch])
                    yield table.rename_columns([self.renames.get(n, n) for n in table.column_names])


class SpillFolder:
    """Where the task executor's committed work lives: summaries, compact rows, decision parts and their markers.

    A given folder (``root``) is used as it is and survives its process, so that a rerun finds the
    tasks that committed; without one, a local temporary folder. :meth:`remove` deletes it.
    """

    def __init__(self, root: str | None):
        self.owned = root is None
        self.fs, path = fsspec.core.url_to_fs(root or tempfile.mkdtemp(prefix="raymimic-stage2-"))
        self.path = path.rstrip("/")
        for sub in ("summaries", "rows", "decisions"):
            self.fs.makedirs(f"{self.path}/{sub}", exist_ok=True)

    def remove_rows(self) -> None:
        """The compact rows are merged: only the decision parts stay."""
        if self.fs.exists(f"{self.path}/rows"):
            self.fs.rm(f"{self.path}/rows", recursive=True)

    def remove(self) -> None:
        protocols = self.fs.protocol if isinstance(self.fs.protocol, (tuple, list)) else (self.fs.protocol,)
        if "file" in protocols:
            shutil.rmtree(self.path, ignore_errors=True)
        elif self.fs.exists(self.path):
            self.fs.rm(self.path, recursive=True)


def temporary_name(path: str) -> str:
    """A unique temporary name beside ``path``: a task killed while writing leaves only such a file behind."""
    folder, _, name = path.rpartition("/")
    return f"{folder}/{TEMPORARY_PREFIX}{uuid.uuid4().hex[:8]}-{name}"


def commit_bytes(fs, path: str, data: bytes) -> None:
    """``data`` to ``path``, written under a temporary name and renamed once complete."""
    temporary = temporary_name(path)
    with fs.open(temporary, "wb") as f:
        f.write(data)
    commit(fs, temporary, path)


def commit_json(fs, path: str, value) -> None:
    commit_bytes(fs, path, json.dumps(value).encode())


def read_committed(fs, path: str) -> bytes | None:
    """The bytes of a committed file; None when it is not there."""
    try:
        with fs.open(path, "rb") as f:
            return f.read()
    except FileNotFoundError:
        return None


def concatenate_subset(fs, path: str, parts: list[tuple[str, int]]) -> int:
    """``keep.npy``: the npy header for the total count, then every part's records in order; the temporary files go."""
    n = sum(count for _, count in parts)
    header = {"descr": np.lib.format.dtype_to_descr(SUBSET_DTYPE), "fortran_order": False, "shape": (n,)}
    with fs.open(path, "wb") as out:
        np.lib.format.write_array_header_1_0(out, header)
        for part, _ in parts:
            with fs.open(part, "rb") as f:
                shutil.copyfileobj(f, out, 16 << 20)
            fs.rm(part)
    return n
