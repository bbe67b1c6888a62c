"""Stage 2's streaming per-uid aggregation: plain Ray tasks over score files, uids kept as integers.

:class:`raymimic.select.mimic.MimicFilter` runs this when its scores are a score-table URI.
Three rounds of tasks, each task reading its own files (no Ray Data plan, no hash shuffle):

1. *summary*: each task reads a contiguous group of files and returns, per file, the block
   summary of :func:`raymimic.select.mimic._block_summary` (per-step partials, NaN count,
   weight range and the Bernoulli fit sample). The row count and the union schema come from
   the parquet footers, read on the driver before any task starts.
2. *partials*: each task reads its files again, computes every row's votes and features
   (:func:`raymimic.select.mimic._row_values`), turns the uid into two uint64 words straight
   from the arrow buffers and writes one raw file to the spill folder, holding its compact rows
   split by uid partition (the task returns where each partition's columns lie). A uid's
   partition is known in advance: uids are uniform, so the top 32 bits of ``hi`` split evenly
   (``partition = (hi >> 32) * P >> 32``), no sampling and no shuffle plan.
3. *merge*: one task per partition reads its byte ranges of every spill file, groups the rows by
   uid with a hash table on one 64-bit key (checked exactly; sorting is the fallback), reduces
   per uid (observations, distinct steps, vote sums, NaN-skipping means), applies the vote rule
   and writes ``decisions/part-<p>.parquet``. Partitions follow the order of ``hi``; within a
   part, uids come in the order first seen.

Memory is flat in rows: a task holds its own files' compact rows (about 60 bytes a row), a merge
task one partition (``rows / P`` rows; ``P`` grows with rows), and the driver only summaries and
totals. Disk holds the compact rows once (one file per map task) and the decisions.
"""
from __future__ import annotations

import contextlib
import gc
import math
import os
import pickle
import shutil
import tempfile
import uuid

import fsspec
import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from raymimic.data.uids import GOLDEN_GAMMA, arrow_uid_pairs, pairs_to_hex
from raymimic.score_table import check_schema, table_files
from raymimic.score_table import ordered_schema as _ordered
from raymimic.score_table import read_footers as _footers

LOCAL_ROWS = 2_000_000
"""Tables of at most this many rows run the rounds in the driver's process (one task's worth of rows: bounded memory)."""
ROWS_PER_TASK = 2_000_000
"""Rows a map task reads (whole files, so a task may hold more); more tasks only when there are more CPUs."""
ROWS_PER_PARTITION = 1_000_000
"""Score rows a merge task holds at most on average: the partition count grows with rows, so its memory does not."""


class ScoreFiles:
    """The committed files of a score table: their paths, row counts and union schema (from the footers)."""

    def __init__(self, scores_uri: str, required):
        self.fs, path = fsspec.core.url_to_fs(scores_uri)
        protocols = self.fs.protocol if isinstance(self.fs.protocol, (tuple, list)) else (self.fs.protocol,)
        if "memory" in protocols:
            raise ValueError(f"score table {scores_uri!r} is on fsspec's process-local memory filesystem, which Ray workers cannot "
                             "see; use a local path, file://, s3://, gs:// or another shared store")
        if not self.fs.exists(path):
            raise FileNotFoundError(f"score tables {scores_uri!r} do not exist "
                                    "(expected RUN/scores, a directory of parquet files written by Stage 1)")
        self.paths = table_files(scores_uri)
        footers = _footers(self.fs, self.paths)
        schemas = []
        for p, meta in zip(self.paths, footers):
            schema = meta.schema.to_arrow_schema().remove_metadata()
            check_schema(schema, f"score file {p}", required)
            schemas.append(schema)
        self.rows = [meta.num_rows for meta in footers]
        self.names = _ordered(pa.unify_schemas(schemas, promote_options="permissive")).names if schemas else list(required)

    @property
    def n_rows(self) -> int:
        return int(sum(self.rows))

    def groups(self, n_cpus: int) -> list[list[str]]:
        """Contiguous groups of files of about equal rows: enough groups for every CPU, none much above :data:`ROWS_PER_TASK`."""
        n_groups = min(len(self.paths), max(n_cpus, math.ceil(self.n_rows / ROWS_PER_TASK)))
        if n_groups <= 1:
            return [list(self.paths)] if self.paths else []
        bounds = np.searchsorted(np.cumsum(self.rows), np.linspace(0, self.n_rows, n_groups + 1)[1:-1], side="right")
        cuts = [0, *sorted(set(int(b) for b in bounds) - {0, len(self.paths)}), len(self.paths)]
        return [self.paths[a:b] for a, b in zip(cuts[:-1], cuts[1:]) if b > a]


def partition_count(n_rows: int, n_cpus: int) -> int:
    """Merge partitions: one per CPU at least, more as rows grow so that none holds more than about :data:`ROWS_PER_PARTITION`."""
    return int(max(n_cpus, math.ceil(n_rows / ROWS_PER_PARTITION)))


def partition_of(hi: np.ndarray, n_partitions: int) -> np.ndarray:
    """The partition of each uid from the top 32 bits of ``hi``: uniform for DataComp uids, monotone in ``hi``."""
    return (((hi >> np.uint64(32)) * np.uint64(n_partitions)) >> np.uint64(32)).astype(np.int64)


def read_frame(fs, path: str, names: list[str]) -> tuple[pd.DataFrame, pa.ChunkedArray]:
    """One file as (pandas frame without the uid, the uid arrow column); columns of ``names`` it lacks are NaN."""
    with fs.open(path, "rb") as f:
        table = pq.read_table(f, columns=[c for c in names if c in pq.read_schema(f).names])
    frame = table.drop_columns(["uid"]).to_pandas()
    for column in names:
        if column not in frame.columns and column != "uid":
            frame[column] = np.nan  # the union schema's null: a control column this file does not have
    return frame, table["uid"]


def summarize_files(fs, paths: list[str], names: list[str], kwargs: dict) -> list[bytes]:
    """Round 1 task: the pickled block summary of every file (uids as arrow-backed strings: no Python objects but the sample's)."""
    from raymimic.select.mimic import _block_summary

    out = []
    for path in paths:
        frame, uids = read_frame(fs, path, names)
        frame.insert(0, "uid", pd.Series(pd.arrays.ArrowStringArray(uids.combine_chunks().cast(pa.string()))))
        summary = _block_summary(frame, **kwargs)
        summary["sample"] = summary["sample"].astype({"uid": object})
        out.append(pickle.dumps(summary))
    return out


def _save(fs, path: str, parts: dict[int, dict[str, np.ndarray]]) -> dict[int, list[tuple]]:
    """Write every partition's columns back to back as raw bytes; return where each lies: ``{p: [(name, dtype, offset, n)]}``."""
    layout, offset = {}, 0
    with fs.open(path, "wb") as f:
        for p, columns in parts.items():
            layout[p] = []
            for name, values in columns.items():
                values = np.ascontiguousarray(values)
                f.write(memoryview(values).cast("B"))
                layout[p].append((name, values.dtype.str, offset, len(values)))
                offset += values.nbytes
    return layout


def _split(values: dict[str, np.ndarray], n_partitions: int, parts: list[list[dict]]) -> None:
    """Append each partition's rows of ``values`` to ``parts[partition]``."""
    partition = partition_of(values["hi"], n_partitions)
    order = np.argsort(partition, kind="stable")
    starts = np.searchsorted(partition[order], np.arange(n_partitions + 1))
    for p in np.flatnonzero(np.diff(starts)):
        rows = order[starts[p]:starts[p + 1]]
        parts[p].append({k: v[rows] for k, v in values.items()})


def partial_files(fs, paths: list[str], names: list[str], kwargs: dict, spill: str, task: int, n_partitions: int) -> tuple[str, dict]:
    """Round 2 task: compact rows (hi, lo, step, features, votes) of the task's files in one spill file, split by partition.

    One file per task (not per task and partition): the spill folder holds as many files as
    there are map tasks, and a merge task reads only its byte ranges of each (the returned layout).
    """
    from raymimic.select.mimic import _finite_rows, _row_values, _with_score

    parts: list[list[dict]] = [[] for _ in range(n_partitions)]
    for path in paths:
        frame, uids = read_frame(fs, path, names)
        finite = _finite_rows(_with_score(frame, kwargs["score_column"]))
        values = _row_values(frame, finite, **kwargs)
        values["hi"], values["lo"] = arrow_uid_pairs(uids.filter(pa.array(finite)))
        del frame
        _split(values, n_partitions, parts)
    merged = {p: {k: np.concatenate([c[k] for c in chunks]) for k in chunks[0]} for p, chunks in enumerate(parts) if chunks}
    out = f"{spill}/rows/t{task:05d}.bin"
    return out, _save(fs, out, merged)


def _load(fs, pieces: list[tuple[str, list[tuple]]]) -> dict[str, np.ndarray]:
    """One partition's columns from its byte ranges of every map file."""
    loaded = []
    for path, columns in pieces:
        with fs.open(path, "rb") as f:
            part = {}
            for name, dtype, offset, n in columns:
                f.seek(offset)
                part[name] = np.frombuffer(f.read(n * np.dtype(dtype).itemsize), dtype)
            loaded.append(part)
    return {k: np.concatenate([part[k] for part in loaded]) for k in loaded[0]}


def _uid_groups(hi: np.ndarray, lo: np.ndarray) -> tuple[np.ndarray, np.ndarray] | None:
    """Each row's uid group (numbered in order of first appearance) and each group's first row; None if two uids share a key.

    A hash table on one 64-bit key is several times faster than sorting 128-bit keys; the
    check against the first row of every group keeps it exact.
    """
    codes, _ = pd.factorize(hi ^ (lo * GOLDEN_GAMMA))  # one 64-bit key (an odd multiplier), checked exactly below
    seen = np.maximum.accumulate(np.concatenate([[-1], codes[:-1]]))
    first = np.flatnonzero(codes > seen)
    if (hi[first][codes] != hi).any() or (lo[first][codes] != lo).any():
        return None
    return codes, first


def _distinct_steps(codes: np.ndarray, steps: np.ndarray, n_groups: int) -> np.ndarray | None:
    """Distinct steps per group (by a hash of (group, step)); None when that key would not fit in 63 bits."""
    low = int(steps.min())
    span = int(steps.max()) - low + 1
    if n_groups * span >= 2**62:
        return None
    keys = pd.unique(codes.astype(np.int64) * span + (steps - low))
    return np.bincount(keys // span, minlength=n_groups)


def _reduce(rows: dict[str, np.ndarray], methods: list[str]) -> tuple[pd.DataFrame, np.ndarray, np.ndarray]:
    """Per-uid sums of one partition's rows as :func:`raymimic.select.mimic._per_uid` computes them (means skip NaN); uid words.

    Uids come out in order of first appearance; :func:`_reduce_sorted` (sorted by uid) when the hash keys collide.
    """
    hi, lo, step = rows["hi"], rows["lo"], rows["step"]
    groups = _uid_groups(hi, lo) if len(hi) else None
    n_steps = None if groups is None else _distinct_steps(groups[0], step, len(groups[1]))
    if n_steps is None:
        return _reduce_sorted(rows, methods)
    codes, first = groups
    n = len(first)
    frame = pd.DataFrame({"n_obs": np.bincount(codes, minlength=n), "n_steps": n_steps})
    _fill(frame, rows, methods, lambda v: np.bincount(codes, weights=v, minlength=n))
    return frame, hi[first], lo[first]


def _fill(frame: pd.DataFrame, rows: dict[str, np.ndarray], methods: list[str], group_sum) -> None:
    """The decision columns after n_obs and n_steps, in :func:`raymimic.select.mimic._per_uid`'s order.

    ``group_sum(values)``: the per-uid sums of a row column (by hash groups or sorted runs).
    """

    def mean(values: np.ndarray) -> np.ndarray:  # NaN-skipping, as pandas' groupby mean
        ok = ~np.isnan(values)
        count, total = group_sum(ok.astype(np.float64)), group_sum(np.where(ok, values, 0.0))
        with np.errstate(invalid="ignore", divide="ignore"):
            return np.where(count > 0, total / np.maximum(count, 1), np.nan)

    def total(values: np.ndarray) -> np.ndarray:
        return np.rint(group_sum(values)).astype(np.int64)

    frame["mimic_score"] = mean(rows["mimic_score"])
    frame["mean_norm_weight"] = mean(rows["norm_weight"])
    frame["mean_raw_score"] = mean(rows["raw_score"])
    for m in methods:
        frame[f"votes_{m}"] = total(rows[f"votes_{m}"])
    for name in sorted(k for k in rows if k.startswith("step_z_")):
        frame[name] = mean(rows[name])


def _reduce_sorted(rows: dict[str, np.ndarray], methods: list[str]) -> tuple[pd.DataFrame, np.ndarray, np.ndarray]:
    """:func:`_reduce` by sorting on (hi, lo, step): slower, exact whatever the keys."""
    order = np.lexsort((rows["step"], rows["lo"], rows["hi"]))
    rows = {k: v[order] for k, v in rows.items()}
    hi, lo, step = rows["hi"], rows["lo"], rows["step"]
    new_uid = np.ones(len(hi), bool)
    new_uid[1:] = (hi[1:] != hi[:-1]) | (lo[1:] != lo[:-1])
    new_step = new_uid.copy()
    new_step[1:] |= step[1:] != step[:-1]
    starts = np.flatnonzero(new_uid)
    frame = pd.DataFrame({"n_obs": np.diff(np.append(starts, len(hi))), "n_steps": np.add.reduceat(new_step.astype(np.int64), starts)})
    _fill(frame, rows, methods, lambda v: np.add.reduceat(v, starts))
    return frame, hi[starts], lo[starts]


def _write_part(fs, path: str, frame: pd.DataFrame, uids: pa.Array) -> None:
    table = pa.Table.from_pandas(frame, preserve_index=False).add_column(0, "uid", uids)
    with fs.open(path, "wb") as f:
        pq.write_table(table, f)


def merge_partition(fs, pieces: list[tuple[str, list[tuple]]], methods: list[str], vote: dict | None, out_path: str) -> dict:
    """Round 3 task: one partition's per-uid decisions to ``out_path``; its totals.

    ``vote`` (rule and threshold) applies the vote rule here; None (top-fraction) leaves it to
    :func:`vote_part` once the threshold is known, and returns the range of ``mimic_score``.
    """
    from raymimic.select.mimic import _apply_vote
    from raymimic.select.quantile import _block_range

    if not pieces:
        return {"n_uids": 0, "n_obs": 0, "n_steps": 0, "path": None}
    frame, hi, lo = _reduce(_load(fs, pieces), methods)
    totals = {"n_uids": len(frame), "n_obs": int(frame["n_obs"].sum()), "n_steps": int(frame["n_steps"].sum()), "path": out_path}
    if vote is None:
        totals["range"] = {k: v[0] for k, v in _block_range(frame, "mimic_score").items()}
    else:
        frame = _apply_vote(frame, methods, **vote)
    _write_part(fs, out_path, frame, pa.array(pairs_to_hex(hi, lo), pa.binary()).cast(pa.string()))
    return totals


def histogram_part(fs, path: str, edges: np.ndarray) -> np.ndarray:
    """Top-fraction, round 4 task: the part's histogram of ``mimic_score`` over the global ``edges``."""
    from raymimic.select.quantile import _block_histogram

    with fs.open(path, "rb") as f:
        values = pq.read_table(f, columns=["mimic_score"])["mimic_score"].to_numpy()
    return _block_histogram({"mimic_score": values}, "mimic_score", edges)["counts"][0]


def vote_part(fs, path: str, methods: list[str], rule, threshold: float) -> None:
    """Top-fraction, round 5 task: apply the vote rule at the global threshold and rewrite the part."""
    from raymimic.select.mimic import _apply_vote

    with fs.open(path, "rb") as f:
        table = pq.read_table(f)
    frame = _apply_vote(table.drop_columns(["uid"]).to_pandas(), methods, rule, threshold)
    _write_part(fs, path, frame, table["uid"])


def histogram_quantile(ranges: list[dict], histogram, quantile: float, bins: int = 1 << 16) -> float:
    """:func:`raymimic.select.quantile.approximate_quantiles` from per-part ranges; ``histogram(edges)`` sums the parts' counts."""
    n = int(sum(r["n"] for r in ranges))
    if n == 0:
        raise ValueError(f"column 'mimic_score' has no finite value ({int(sum(r['n_nan'] for r in ranges))} NaN): cannot rank")
    lo, hi = float(min(r["min"] for r in ranges)), float(max(r["max"] for r in ranges))
    if lo == hi:
        return lo
    edges = np.linspace(lo, hi, bins + 1)
    cumulative = np.concatenate([[0], np.cumsum(histogram(edges))]) / n
    return float(np.interp(quantile, cumulative, edges))


class DecisionParts:
    """The decision parts read on the driver one batch at a time, with the Dataset calls :func:`write_outputs` makes.

    Writing the outputs streams every decision through the driver anyway; reading the parts
    there directly saves starting a Ray Data execution for it.
    """

    def __init__(self, fs, paths: list[str], columns: list[str] | None = None, renames: dict | None = None):
        self.fs, self.paths, self.columns, self.renames = fs, list(paths), columns, dict(renames or {})

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
        return DecisionParts(self.fs, self.paths, None, {**self.renames, **renames})

    def select_columns(self, columns: list[str]) -> DecisionParts:
        return DecisionParts(self.fs, self.paths, list(columns), self.renames)

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
    """Where the compact rows and the decision parts live; a local temporary folder unless given (removed by :meth:`remove`)."""

    def __init__(self, root: str | None):
        self.owned = root is None
        root = root or tempfile.mkdtemp(prefix="raymimic-stage2-")
        self.fs, path = fsspec.core.url_to_fs(root)
        self.path = f"{path.rstrip('/')}/{uuid.uuid4().hex[:12]}"
        self.root = path
        for sub in ("rows", "decisions"):
            self.fs.makedirs(f"{self.path}/{sub}", exist_ok=True)

    def remove_rows(self) -> None:
        """The compact rows are merged: only the decision parts stay."""
        self.fs.rm(f"{self.path}/rows", recursive=True)

    def remove(self) -> None:
        target = self.root if self.owned else self.path
        protocols = self.fs.protocol if isinstance(self.fs.protocol, (tuple, list)) else (self.fs.protocol,)
        if "file" in protocols:
            shutil.rmtree(target, ignore_errors=True)
            with contextlib.suppress(OSError):
                os.rmdir(self.root)  # the given folder goes too once no other run uses it
        elif self.fs.exists(target):
            self.fs.rm(target, recursive=True)


def releasing(fn, *args):
    """``fn(*args)``, then hand freed memory back to the system: a worker runs many tasks, and its allocators keep pages otherwise."""
    try:
        return fn(*args)
    finally:
        gc.collect()
        pa.default_memory_pool().release_unused()


def cpu_count() -> int:
    import ray

    return max(1, int(ray.cluster_resources().get("CPU", os.cpu_count() or 1)))


def write_part_outputs(decisions: DecisionParts, output: str, keep_column: str = "keep", quality_column: str = "mean_raw_score",
                       columns=None, summary: dict | None = None) -> dict:
    """:func:`raymimic.select.output.write_outputs` for decision parts: the same files and summary, flat driver memory.

    ``keep.npy`` is written part by part: each part's kept uids are sorted on their own, and
    the parts cover increasing ranges of ``hi``, so their concatenation is the sorted subset
    file. The driver holds one part's kept uids, never the whole subset.
    """
    from raymimic.select.output import DecisionSink, open_output

    fs, root, chosen = open_output(decisions, output, keep_column, columns)
    sink, kept_parts = DecisionSink(quality_column), []
    with fs.open(f"{root}/decisions.parquet", "wb") as stream:
        for i, path in enumerate(decisions.paths):
            his, los = [], []
            for batch in DecisionParts(decisions.fs, [path], None, decisions.renames).select_columns(chosen).iter_batches():
                keep = sink.append(stream, batch, keep_column)
                hi, lo = arrow_uid_pairs(batch["uid"].filter(pa.array(keep)))
                his.append(hi)
                los.append(lo)
            kept_parts.append(_save_kept(fs, f"{root}/.keep-{i:05d}.bin", his, los))
        sink.close()
    return sink.write_summary(fs, root, output, summary, _concatenate_subset(fs, f"{root}/keep.npy", kept_parts))


def _save_kept(fs, path: str, his: list[np.ndarray], los: list[np.ndarray]) -> tuple[str, int]:
    """One part's kept uids, sorted, as raw ``u8,u8`` records in a temporary file; (path, count)."""
    from raymimic.data.uids import pairs_to_array

    array = pairs_to_array(np.concatenate(his), np.concatenate(los))
    with fs.open(path, "wb") as f:
        f.write(array.tobytes())
    return path, len(array)


def _concatenate_subset(fs, path: str, parts: list[tuple[str, int]]) -> int:
    """``keep.npy``: the npy header for the total count, then every part's records in order; the temporary files go."""
    from raymimic.data.uids import SUBSET_DTYPE

    n = sum(count for _, count in parts)
    header = {"descr": np.lib.format.dtype_to_descr(SUBSET_DTYPE), "fortran_order": False, "shape": (n,)}
    with fs.open(path, "wb") as out:
        np.lib.format.write_array_header_1_0(out, header)
        for part, _ in parts:
            with fs.open(part, "rb") as f:
                shutil.copyfileobj(f, out, 16 << 20)
            fs.rm(part)
    return n
