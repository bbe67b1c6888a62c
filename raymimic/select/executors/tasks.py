"""The mimic filter over a score-table URI: plain Ray tasks over its files, uids kept as two uint64 words.

Three rounds of tasks, each task reading its own files (no Ray Data plan, no hash shuffle):

1. *summary*: each task reads a contiguous group of files and returns, per file, the
   :func:`~raymimic.select.kernels.block_summary`. The row count and the union schema come from
   the parquet footers, read on the driver before any task starts.
2. *partials*: each task reads its files again, computes every row's
   :func:`~raymimic.select.kernels.row_values`, turns the uid into two uint64 words straight from
   the arrow buffers and writes one raw file to the spill folder, holding its compact rows split
   by uid partition (the task returns where each partition's columns lie). A uid's partition is
   known in advance: uids are uniform, so the top 32 bits of ``hi`` split evenly
   (``partition = (hi >> 32) * P >> 32``), no sampling and no shuffle plan.
3. *merge*: one task per partition reads its byte ranges of every spill file, reduces them per
   uid (:func:`~raymimic.select.kernels.per_uid_words`), applies the vote rule and writes
   ``decisions/part-<p>.parquet``. Partitions follow the order of ``hi``; within a part, uids
   come in the order first seen.

Memory is flat in rows: a task holds its own files' compact rows (about 60 bytes a row), a merge
task one partition (``rows / P`` rows; ``P`` grows with rows), and the driver only summaries and
totals. Disk holds the compact rows once (one file per map task) and the decisions.
"""
from __future__ import annotations

import gc
import math
import os
import pickle
import weakref
from concurrent.futures import ThreadPoolExecutor

import fsspec
import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from raymimic.data.uids import arrow_uid_pairs, pairs_to_hex
from raymimic.score_table import COLUMNS, ScoreTableError, check_schema, control_column, control_names, table_files
from raymimic.select import kernels
from raymimic.select.executors import Outcome
from raymimic.select.executors.parts import DecisionParts, SpillFolder
from raymimic.select.quantile import block_histogram, block_range

LOCAL_ROWS = 2_000_000
"""Tables of at most this many rows run the rounds in the driver's process (one task's worth of rows: bounded memory)."""
ROWS_PER_TASK = 2_000_000
"""Rows a map task reads (whole files, so a task may hold more); more tasks only when there are more CPUs."""
ROWS_PER_PARTITION = 1_000_000
"""Score rows a merge task holds at most on average: the partition count grows with rows, so its memory does not."""


def _footer(fs, path: str) -> pq.FileMetaData:
    try:
        with fs.open(path, "rb") as f:
            return pq.ParquetFile(f).metadata
    except (pa.ArrowException, OSError, ValueError) as exc:
        raise ScoreTableError(f"score file {path} is not a readable parquet file: {exc}") from exc


def _ordered_names(schema: pa.Schema) -> list[str]:
    """The score-table columns first, then the control columns sorted, then the rest in their order."""
    first = [n for n in COLUMNS if n in schema.names] + sorted(control_column(c) for c in control_names(schema.names))
    return first + [n for n in schema.names if n not in set(first)]


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
        with ThreadPoolExecutor(max_workers=max(1, min(16, len(self.paths)))) as pool:
            footers = list(pool.map(lambda p: _footer(self.fs, p), self.paths))
        schemas = []
        for p, meta in zip(self.paths, footers):
            schema = meta.schema.to_arrow_schema().remove_metadata()
            check_schema(schema, f"score file {p}", required)
            schemas.append(schema)
        self.rows = [meta.num_rows for meta in footers]
        self.names = _ordered_names(pa.unify_schemas(schemas, promote_options="permissive")) if schemas else list(required)

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
    out = []
    for path in paths:
        frame, uids = read_frame(fs, path, names)
        frame.insert(0, "uid", pd.Series(pd.arrays.ArrowStringArray(uids.combine_chunks().cast(pa.string()))))
        summary = kernels.block_summary(frame, **kwargs)
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
    parts: list[list[dict]] = [[] for _ in range(n_partitions)]
    for path in paths:
        frame, uids = read_frame(fs, path, names)
        finite = kernels.finite_rows(kernels.with_score(frame, kwargs["score_column"]))
        values = kernels.row_values(frame, finite, **kwargs)
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


def _write_part(fs, path: str, frame: pd.DataFrame, uids: pa.Array) -> None:
    table = pa.Table.from_pandas(frame, preserve_index=False).add_column(0, "uid", uids)
    with fs.open(path, "wb") as f:
        pq.write_table(table, f)


def merge_partition(fs, pieces: list[tuple[str, list[tuple]]], methods: list[str], vote: dict | None, out_path: str) -> dict:
    """Round 3 task: one partition's per-uid decisions to ``out_path``; its totals.

    ``vote`` (rule and threshold) applies the vote rule here; None (top-fraction) leaves it to
    :func:`vote_part` once the threshold is known, and returns the range of ``mimic_score``.
    """
    if not pieces:
        return {"n_uids": 0, "n_obs": 0, "n_steps": 0, "path": None}
    frame, hi, lo = kernels.per_uid_words(_load(fs, pieces), methods)
    out = {**kernels.totals(frame), "path": out_path}
    if vote is None:
        out["range"] = {k: v[0] for k, v in block_range(frame, "mimic_score").items()}
    else:
        frame = kernels.apply_vote(frame, methods, **vote)
    _write_part(fs, out_path, frame, pa.array(pairs_to_hex(hi, lo), pa.binary()).cast(pa.string()))
    return out


def histogram_part(fs, path: str, edges: np.ndarray) -> np.ndarray:
    """Top-fraction, round 4 task: the part's histogram of ``mimic_score`` over the global ``edges``."""
    with fs.open(path, "rb") as f:
        values = pq.read_table(f, columns=["mimic_score"])["mimic_score"].to_numpy()
    return block_histogram({"mimic_score": values}, "mimic_score", edges)["counts"][0]


def vote_part(fs, path: str, methods: list[str], rule, threshold: float) -> None:
    """Top-fraction, round 5 task: apply the vote rule at the global threshold and rewrite the part."""
    with fs.open(path, "rb") as f:
        table = pq.read_table(f)
    frame = kernels.apply_vote(table.drop_columns(["uid"]).to_pandas(), methods, rule, threshold)
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


def run_tasks(fn, calls: list[tuple], local: bool) -> list:
    """``fn`` over every argument tuple of ``calls``: in this process (``local``) or as one Ray task each, results in order."""
    if local:
        return [releasing(fn, *args) for args in calls]
    import ray

    task = ray.remote(num_cpus=1)(releasing).options(name=fn.__name__)
    return ray.get([task.remote(fn, *args) for args in calls])


def _read_parts(fs, paths: list[str]):
    """The merge tasks' decision parts as a Ray Dataset, read lazily (each consumer streams them from the spill folder)."""
    import pyarrow.fs
    import ray

    local = "file" in (fs.protocol if isinstance(fs.protocol, (tuple, list)) else (fs.protocol,))
    filesystem = None if local else pyarrow.fs.PyFileSystem(pyarrow.fs.FSSpecHandler(fs))
    return ray.data.read_parquet(paths, filesystem=filesystem)


def run(mimic, files: ScoreFiles) -> Outcome:
    """The rounds over ``files`` (checked by the filter) for ``mimic``.

    A table of at most :data:`LOCAL_ROWS` rows runs the same rounds in this process: starting
    workers and importing into them would cost more than the work.
    """
    names = [c for c in files.names if c in COLUMNS or c in mimic.stats["score_columns"]]
    local = files.n_rows <= LOCAL_ROWS
    n_cpus = 1 if local else cpu_count()
    groups = files.groups(n_cpus)
    kwargs = mimic.summary_kwargs(files.n_rows)
    blobs = run_tasks(summarize_files, [(files.fs, group, names, kwargs) for group in groups], local)
    mimic.absorb([pickle.loads(blob) for group in blobs for blob in group], files.n_rows)
    mimic.fit_binarizers()

    spill = SpillFolder(mimic.spill_dir)
    weakref.finalize(mimic, spill.remove)
    n_partitions = mimic.num_partitions or partition_count(files.n_rows, n_cpus)
    written = run_tasks(partial_files, [(spill.fs, group, names, mimic.vote_kwargs(), spill.path, i, n_partitions)
                                        for i, group in enumerate(groups)], local)
    by_partition: list[list[tuple]] = [[] for _ in range(n_partitions)]
    for path, layout in written:
        for p, columns in layout.items():
            by_partition[p].append((path, columns))
    # top-fraction ranks after every partition is reduced: its vote waits for the threshold
    vote = None if mimic.method == "top-fraction" else {"rule": mimic.rule, "threshold": None}
    merged = run_tasks(merge_partition, [(spill.fs, pieces, mimic.methods, vote, f"{spill.path}/decisions/part-{p:05d}.parquet")
                                         for p, pieces in enumerate(by_partition)], local)
    spill.remove_rows()
    merged = [t for t in merged if t["path"]]
    mimic.count(sum(t["n_uids"] for t in merged), sum(t["n_obs"] for t in merged), sum(t["n_steps"] for t in merged))
    paths = [t["path"] for t in merged]
    threshold = None
    if mimic.method == "top-fraction":
        def histogram(edges: np.ndarray) -> np.ndarray:
            return np.sum(run_tasks(histogram_part, [(spill.fs, p, edges) for p in paths], local), axis=0)

        threshold = histogram_quantile([t["range"] for t in merged], histogram, 1 - mimic.fraction)
        run_tasks(vote_part, [(spill.fs, p, mimic.methods, mimic.rule, threshold) for p in paths], local)
    stats = {"stage2_tasks": {"in_process": local, "map_tasks": len(groups), "partitions": n_partitions}}
    return Outcome(_read_parts(spill.fs, paths), threshold, stats, DecisionParts(spill.fs, paths), spill)
