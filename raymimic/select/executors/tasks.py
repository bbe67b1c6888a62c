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

import contextlib
import gc
import hashlib
import json
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
from raymimic.select.executors.parts import DecisionParts, SpillFolder, commit_bytes, commit_json, read_committed, temporary_name
from raymimic.select.output import commit
from raymimic.select.quantile import block_histogram, block_range

LOCAL_ROWS = 2_000_000
"""Tables of at most this many rows run the rounds in the driver's process (one task's worth of rows: bounded memory)."""
ROWS_PER_TASK = 2_000_000
"""Rows a map task reads (whole files, so a task may hold more); more tasks only when there are more CPUs."""
ROWS_PER_PARTITION = 1_000_000
"""Score rows a merge task holds at most on average: the partition count grows with rows, so its memory does not."""


def _footer(fs, path: str) -> tuple[pq.FileMetaData, int]:
    try:
        with fs.open(path, "rb") as f:
            return pq.ParquetFile(f).metadata, f.size
    except (pa.ArrowException, OSError, ValueError) as exc:
        raise ScoreTableError(f"score file {path} is not a readable parquet file: {exc}") from exc


def _ordered_names(schema: pa.Schema) -> list[str]:
    """The score-table columns first, then the control columns sorted, then the rest in their order."""
    first = [n for n in COLUMNS if n in schema.names] + sorted(control_column(c) for c in control_names(schema.names))
    return first + [n for n in schema.names if n not in set(first)]


def _unify(paths: list[str], schemas: list[pa.Schema]) -> pa.Schema:
    """The files' union schema; ``ValueError`` naming the first file whose column type disagrees with an earlier file's."""
    try:
        return pa.unify_schemas(schemas, promote_options="permissive")
    except (pa.ArrowInvalid, pa.ArrowTypeError):
        seen: dict[str, tuple[str, pa.DataType]] = {}
        for path, schema in zip(paths, schemas):
            for field in schema:
                first = seen.setdefault(field.name, (path, field.type))
                try:
                    pa.unify_schemas([pa.schema([pa.field(field.name, first[1])]), pa.schema([field])], promote_options="permissive")
                except (pa.ArrowInvalid, pa.ArrowTypeError):
                    raise ValueError(f"score files disagree in schema: column {field.name!r} is {field.type} in {path} but {first[1]} in "
                                     f"{first[0]}; every file of a score table needs the same column types") from None
        raise


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
        self.sizes = [size for _, size in footers]
        footers = [meta for meta, _ in footers]
        for p, meta in zip(self.paths, footers):
            schema = meta.schema.to_arrow_schema().remove_metadata()
            check_schema(schema, f"score file {p}", required)
            schemas.append(schema)
        self.rows = [meta.num_rows for meta in footers]
        self.names = _ordered_names(_unify(self.paths, schemas)) if schemas else list(required)

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


def summarize_files(fs, paths: list[str], names: list[str], kwargs: dict, out_path: str) -> bytes:
    """Round 1 task: the block summary of every file (uids as arrow-backed strings: no Python objects but the sample's).

    The pickled list is committed to ``out_path`` and returned.
    """
    out = []
    for path in paths:
        frame, uids = read_frame(fs, path, names)
        frame.insert(0, "uid", pd.Series(pd.arrays.ArrowStringArray(uids.combine_chunks().cast(pa.string()))))
        with _naming(path):
            summary = kernels.block_summary(frame, **kwargs)
        summary["sample"] = summary["sample"].astype({"uid": object})
        out.append(summary)
    blob = pickle.dumps(out)
    commit_bytes(fs, out_path, blob)
    return blob


@contextlib.contextmanager
def _naming(path: str):
    """A ``ValueError`` about a file's rows (a malformed uid, a bad batch size) names the file."""
    try:
        yield
    except ValueError as err:
        raise ValueError(f"score file {path}: {err}") from None


def _save(fs, path: str, parts: dict[int, dict[str, np.ndarray]]) -> dict:
    """Commit every partition's columns back to back as raw bytes, then the marker ``<path>.json`` saying where each lies.

    The marker: ``{"layout": {p: [(name, dtype, offset, n)]}, "nbytes": size of the file}``.
    """
    layout, offset = {}, 0
    temporary = temporary_name(path)
    with fs.open(temporary, "wb") as f:
        for p, columns in parts.items():
            layout[p] = []
            for name, values in columns.items():
                values = np.ascontiguousarray(values)
                f.write(memoryview(values).cast("B"))
                layout[p].append((name, values.dtype.str, offset, len(values)))
                offset += values.nbytes
    commit(fs, temporary, path)
    marker = {"path": path, "layout": layout, "nbytes": offset}
    commit_json(fs, f"{path}.json", marker)
    return marker


def _split(values: dict[str, np.ndarray], n_partitions: int, parts: list[list[dict]]) -> None:
    """Append each partition's rows of ``values`` to ``parts[partition]``."""
    partition = partition_of(values["hi"], n_partitions)
    order = np.argsort(partition, kind="stable")
    starts = np.searchsorted(partition[order], np.arange(n_partitions + 1))
    for p in np.flatnonzero(np.diff(starts)):
        rows = order[starts[p]:starts[p + 1]]
        parts[p].append({k: v[rows] for k, v in values.items()})


def partial_files(fs, paths: list[str], names: list[str], kwargs: dict, out_path: str, n_partitions: int) -> dict:
    """Round 2 task: compact rows (hi, lo, step, features, votes) of the task's files in one spill file, split by partition.

    One file per task (not per task and partition): the spill folder holds as many files as
    there are map tasks, and a merge task reads only its byte ranges of each (the returned layout).
    """
    parts: list[list[dict]] = [[] for _ in range(n_partitions)]
    for path in paths:
        frame, uids = read_frame(fs, path, names)
        finite = kernels.finite_rows(kernels.with_score(frame, kwargs["score_column"]))
        values = kernels.row_values(frame, finite, **kwargs)
        with _naming(path):
            values["hi"], values["lo"] = arrow_uid_pairs(uids.filter(pa.array(finite)))
        del frame
        _split(values, n_partitions, parts)
    merged = {p: {k: np.concatenate([c[k] for c in chunks]) for k in chunks[0]} for p, chunks in enumerate(parts) if chunks}
    return _save(fs, out_path, merged)


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


def _write_part(fs, path: str, frame: pd.DataFrame, uids: pa.Array, marker: dict) -> dict:
    """Commit one decision part, then its marker ``<path>.json`` (``marker`` with the part's row count)."""
    table = pa.Table.from_pandas(frame, preserve_index=False).add_column(0, "uid", uids)
    temporary = temporary_name(path)
    with fs.open(temporary, "wb") as f:
        pq.write_table(table, f)
    commit(fs, temporary, path)
    marker = {**marker, "path": path, "n_uids": len(table)}
    commit_json(fs, f"{path}.json", marker)
    return marker


def merge_partition(fs, pieces: list[tuple[str, list[tuple]]], methods: list[str], vote: dict | None, out_path: str) -> dict:
    """Round 3 task: one partition's per-uid decisions to ``out_path``; its totals.

    ``vote`` (rule and threshold) applies the vote rule here; None (top-fraction) leaves it to
    :func:`vote_part` once the threshold is known, and returns the range of ``mimic_score``.
    """
    if not pieces:
        out = {"n_uids": 0, "n_obs": 0, "n_steps": 0, "path": None}
        commit_json(fs, f"{out_path}.json", out)
        return out
    frame, hi, lo = kernels.per_uid_words(_load(fs, pieces), methods)
    out = kernels.totals(frame)
    if vote is None:
        out["range"] = {k: float(v[0]) for k, v in block_range(frame, "mimic_score").items()}
    else:
        frame = kernels.apply_vote(frame, methods, **vote)
    return _write_part(fs, out_path, frame, pa.array(pairs_to_hex(hi, lo), pa.binary()).cast(pa.string()), out)


def histogram_part(fs, path: str, edges: np.ndarray) -> np.ndarray:
    """Top-fraction, round 4 task: the part's histogram of ``mimic_score`` over the global ``edges``."""
    with fs.open(path, "rb") as f:
        values = pq.read_table(f, columns=["mimic_score"])["mimic_score"].to_numpy()
    return block_histogram({"mimic_score": values}, "mimic_score", edges)["counts"][0]


def vote_part(fs, path: str, methods: list[str], rule, threshold: float, out_path: str) -> dict:
    """Top-fraction, round 5 task: apply the vote rule at the global threshold to a part; the voted part goes to ``out_path``."""
    with fs.open(path, "rb") as f:
        table = pq.read_table(f)
    frame = kernels.apply_vote(table.drop_columns(["uid"]).to_pandas(), methods, rule, threshold)
    return _write_part(fs, out_path, frame, table["uid"], {})


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
    try:
        return ray.get([task.remote(fn, *args) for args in calls])
    except ray.exceptions.RayTaskError as err:  # bad input or a full disk: the task's own error, not a remote traceback
        if isinstance(err.cause, (ValueError, OSError)):
            raise err.cause from None
        raise


def read_parts(parts: DecisionParts):
    """The decision parts as a Ray Dataset, read lazily (each consumer streams them from the spill folder)."""
    import pyarrow.fs
    import ray

    fs = parts.fs
    local = "file" in (fs.protocol if isinstance(fs.protocol, (tuple, list)) else (fs.protocol,))
    filesystem = None if local else pyarrow.fs.PyFileSystem(pyarrow.fs.FSSpecHandler(fs))
    return ray.data.read_parquet(parts.paths, filesystem=filesystem)


def fingerprint(files: ScoreFiles, names: list[str], settings: dict) -> str:
    """A digest of the inputs (every file's path, size and rows; the columns read) and the filter's settings."""
    key = {"files": [[p, size, rows] for p, size, rows in zip(files.paths, files.sizes, files.rows)], "names": names, "settings": settings}
    return hashlib.sha256(json.dumps(key, sort_keys=True, default=str).encode()).hexdigest()


def _plan(spill: SpillFolder, digest: str, groups: list[list[str]], n_partitions: int, local: bool) -> dict:
    """The run's plan (file groups, partitions), committed once: a rerun resumes the same tasks whatever its CPU count."""
    path = f"{spill.path}/plan.json"
    saved = read_committed(spill.fs, path)
    if saved is not None:
        plan = json.loads(saved)
        if plan["fingerprint"] != digest:
            raise ValueError(f"work folder {spill.path} holds an unfinished Stage 2 run of other inputs or settings; rerun with those, "
                             "or start fresh (--overwrite, or remove the folder)")
        return plan
    plan = {"fingerprint": digest, "groups": groups, "n_partitions": n_partitions, "local": local}
    commit_json(spill.fs, path, plan)
    return plan


def _committed_summary(fs, path: str) -> list | None:
    blob = read_committed(fs, path)
    try:
        return None if blob is None else pickle.loads(blob)
    except (pickle.UnpicklingError, EOFError, ValueError):  # a truncated file: redone
        return None


def _committed_rows(fs, path: str) -> dict | None:
    """A map task's marker when its spill file is whole (the size the marker gives); None otherwise."""
    marker = read_committed(fs, f"{path}.json")
    if marker is None:
        return None
    marker = json.loads(marker)
    try:
        return marker if fs.size(path) == marker["nbytes"] else None
    except FileNotFoundError:
        return None


def _committed_part(fs, path: str) -> dict | None:
    """A merge or vote task's marker when its part is a readable parquet file of the rows the marker gives; None otherwise."""
    marker = read_committed(fs, f"{path}.json")
    if marker is None:
        return None
    marker = json.loads(marker)
    if marker["path"] is None:
        return marker
    try:
        with fs.open(path, "rb") as f:
            return marker if pq.ParquetFile(f).metadata.num_rows == marker["n_uids"] else None
    except (FileNotFoundError, pa.ArrowException, OSError):
        return None


def _resume(calls: dict, committed, fn, local: bool, counts: dict, name: str) -> dict:
    """Run ``fn`` for every key of ``calls`` whose output has not committed (``committed(key)`` is None); every key's result."""
    done = {key: committed(key) for key in calls}
    pending = [key for key, value in done.items() if value is None]
    for key, result in zip(pending, run_tasks(fn, [calls[key] for key in pending], local)):
        done[key] = result
    counts[name] = {"tasks": len(calls), "run": len(pending), "committed_before": len(calls) - len(pending)}
    return done


def run(mimic, files: ScoreFiles) -> Outcome:
    """The rounds over ``files`` (checked by the filter) for ``mimic``, resuming the tasks a previous run committed.

    Every task commits its output (written under a temporary name, renamed, then a marker), so
    that a rerun on the same spill folder skips them; a folder of another run's inputs or settings
    is refused. A table of at most :data:`LOCAL_ROWS` rows runs the same rounds in this process:
    starting workers and importing into them would cost more than the work.
    """
    names = [c for c in files.names if c in COLUMNS or c in mimic.stats["score_columns"]]
    spill = SpillFolder(mimic.spill_dir)
    if spill.owned:  # a given folder outlives a failed run, which a rerun resumes
        weakref.finalize(mimic, spill.remove)
    local = files.n_rows <= LOCAL_ROWS
    n_cpus = 1 if local else cpu_count()
    plan = _plan(spill, fingerprint(files, names, mimic.settings()), files.groups(n_cpus),
                 mimic.num_partitions or partition_count(files.n_rows, n_cpus), local)
    groups, n_partitions, local, fs, counts = plan["groups"], plan["n_partitions"], plan["local"], spill.fs, {}

    kwargs = mimic.summary_kwargs(files.n_rows)
    summaries = _resume({f"{spill.path}/summaries/g{i:05d}.pkl": (fs, group, names, kwargs, f"{spill.path}/summaries/g{i:05d}.pkl")
                         for i, group in enumerate(groups)}, lambda path: _committed_summary(fs, path),
                        summarize_files, local, counts, "summary")
    mimic.absorb([s for blob in summaries.values() for s in (blob if isinstance(blob, list) else pickle.loads(blob))], files.n_rows)
    mimic.fit_binarizers()

    # top-fraction ranks after every partition is reduced: its vote waits for the threshold
    vote = None if mimic.method == "top-fraction" else {"rule": mimic.rule, "threshold": None}
    part_paths = [f"{spill.path}/decisions/part-{p:05d}.parquet" for p in range(n_partitions)]
    merged = {path: _committed_part(fs, path) for path in part_paths}
    if any(m is None for m in merged.values()):  # the compact rows are needed
        rows = _resume({f"{spill.path}/rows/t{i:05d}.bin": (fs, group, names, mimic.vote_kwargs(), f"{spill.path}/rows/t{i:05d}.bin",
                                                             n_partitions) for i, group in enumerate(groups)},
                       lambda path: _committed_rows(fs, path), partial_files, local, counts, "partials")
        by_partition: list[list[tuple]] = [[] for _ in range(n_partitions)]
        for marker in rows.values():
            for p, columns in marker["layout"].items():
                by_partition[int(p)].append((marker["path"], columns))
        merged = _resume({path: (fs, by_partition[p], mimic.methods, vote, path) for p, path in enumerate(part_paths)},
                         lambda path: _committed_part(fs, path), merge_partition, local, counts, "merge")
    else:
        counts["partials"] = {"tasks": len(groups), "run": 0, "committed_before": None}
        counts["merge"] = {"tasks": n_partitions, "run": 0, "committed_before": n_partitions}
    spill.remove_rows()
    merged = [m for m in merged.values() if m["path"]]
    mimic.count(sum(t["n_uids"] for t in merged), sum(t["n_obs"] for t in merged), sum(t["n_steps"] for t in merged))
    paths = [t["path"] for t in merged]
    threshold = None
    if mimic.method == "top-fraction":
        def histogram(edges: np.ndarray) -> np.ndarray:
            return np.sum(run_tasks(histogram_part, [(fs, p, edges) for p in paths], local), axis=0)

        threshold = histogram_quantile([t["range"] for t in merged], histogram, 1 - mimic.fraction)
        voted = _resume({p.replace("/part-", "/voted-"): (fs, p, mimic.methods, mimic.rule, threshold, p.replace("/part-", "/voted-"))
                         for p in paths}, lambda path: _committed_part(fs, path), vote_part, local, counts, "vote")
        paths = list(voted)
    stats = {"stage2_tasks": {"in_process": local, "map_tasks": len(groups), "partitions": n_partitions, "rounds": counts}}
    stats["fingerprint"] = plan["fingerprint"]
    return Outcome(None, threshold, stats, DecisionParts(fs, paths), spill)
