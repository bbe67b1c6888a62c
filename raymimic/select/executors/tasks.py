"""The mimic filter over a score-table URI: plain Ray tasks over its files, uids kept as two uint64 words.

Two rounds of tasks, each task reading its own files once (no Ray Data plan, no hash shuffle):

1. *map*: each task reads a contiguous group of files (only the columns the filter uses) and
   computes, per file, the :func:`~raymimic.select.kernels.block_summary`; it turns the uids of
   the usable rows into two uint64 words straight from the arrow buffers and spills those rows'
   input columns (step, the score columns, weight, batch size: as read, nothing derived) to one
   raw file, split by uid partition. A uid's partition is known in advance: uids are uniform, so
   the top 32 bits of ``hi`` split evenly (``partition = (hi >> 32) * P >> 32``), no sampling and
   no shuffle plan. The row count and the union schema come from the parquet footers, read on
   the driver before any task starts; the driver combines the summaries and fits the binarizers.
2. *merge*: one task per partition reads its byte ranges of every spill file, computes the rows'
   :func:`~raymimic.select.kernels.row_values` (votes, features), reduces them per uid
   (:func:`~raymimic.select.kernels.per_uid_words`), applies the vote rule and writes
   ``decisions/part-<p>.parquet``. Partitions follow the order of ``hi``; within a part, uids
   come in the order first seen.

Every task commits: its file is written under a temporary name and renamed, then a marker
(``<file>.json``) names what it holds; a rerun on the same folder skips the tasks whose markers
and files are whole (:func:`run`).

Memory is flat in rows: a task holds its own files' compact rows (about 36 bytes a row), a merge
task one partition (``rows / P`` rows; ``P`` grows with rows), and the driver only summaries and
totals. Disk holds the compact rows once (one file per map task) and the decisions.
"""
from __future__ import annotations

import contextlib
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

from raymimic.data.uids import arrow_uid_pairs, pairs_to_array, pairs_to_hex
from raymimic.score_table import COLUMNS, ScoreTableError, check_schema, control_column, control_names, table_files
from raymimic.select import kernels
from raymimic.select.executors import Outcome
from raymimic.select.executors.parts import (
    DecisionParts,
    SpillFolder,
    commit_bytes,
    commit_json,
    concatenate_subset,
    read_committed,
    temporary_name,
)
from raymimic.select.output import TEMPORARY_PREFIX, DecisionSink, commit, open_output
from raymimic.select.quality import QualityAccumulator
from raymimic.select.quantile import block_histogram, block_range

LOCAL_ROWS = 2_000_000
"""Tables of at most this many rows run the rounds in the driver's process (one task's worth of rows: bounded memory)."""
ROWS_PER_TASK = 2_000_000
"""Rows a map task reads (whole files, so a task may hold more); more tasks only when there are more CPUs."""
ROWS_PER_PARTITION = 1_000_000
"""Score rows a merge task holds at most on average: the partition count grows with rows, so its memory does not."""
MAX_RETRIES = 3
"""Times a task is rerun when its worker process or node dies (not when the task raises)."""


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
        n_groups = min(len(self.paths), in_waves(math.ceil(self.n_rows / ROWS_PER_TASK), n_cpus))
        if n_groups <= 1:
            return [list(self.paths)] if self.paths else []
        bounds = np.searchsorted(np.cumsum(self.rows), np.linspace(0, self.n_rows, n_groups + 1)[1:-1], side="right")
        cuts = [0, *sorted(set(int(b) for b in bounds) - {0, len(self.paths)}), len(self.paths)]
        return [self.paths[a:b] for a, b in zip(cuts[:-1], cuts[1:]) if b > a]


def partition_count(n_rows: int, n_cpus: int) -> int:
    """Merge partitions: one per CPU at least, more as rows grow so that none holds more than about :data:`ROWS_PER_PARTITION`."""
    return in_waves(math.ceil(n_rows / ROWS_PER_PARTITION), n_cpus)


def in_waves(n_tasks: int, n_cpus: int) -> int:
    """``n_tasks`` rounded up to whole waves of ``n_cpus`` tasks: a last wave of fewer tasks than CPUs would leave CPUs idle."""
    return int(max(1, math.ceil(n_tasks / n_cpus)) * n_cpus)


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
    return marker


def _split(values: dict[str, np.ndarray], n_partitions: int, parts: list[list[dict]]) -> None:
    """Append each partition's rows of ``values`` to ``parts[partition]``."""
    partition = partition_of(values["hi"], n_partitions)
    order = np.argsort(partition, kind="stable")
    starts = np.searchsorted(partition[order], np.arange(n_partitions + 1))
    for p in np.flatnonzero(np.diff(starts)):
        rows = order[starts[p]:starts[p + 1]]
        parts[p].append({k: v[rows] for k, v in values.items()})


def map_files(fs, paths: list[str], names: list[str], summary_kwargs: dict, spill_columns: list[str], out_path: str,
              n_partitions: int) -> tuple[dict, list[dict]]:
    """Round 1 task: every file's block summary, and the usable rows' compact input columns spilled by uid partition.

    The spill file holds, per partition, the uid words and the columns the votes need, as read
    (one file per task; a merge task reads only its byte ranges); it is committed, then the
    summaries, then the marker. Returns the marker and the summaries.
    """
    summaries, parts = [], [[] for _ in range(n_partitions)]
    for path in paths:
        frame, uids = read_frame(fs, path, names)
        frame.insert(0, "uid", pd.Series(pd.arrays.ArrowStringArray(uids.combine_chunks().cast(pa.string()))))
        with _naming(path):
            summary = kernels.block_summary(frame, **summary_kwargs)
            finite = kernels.finite_rows(kernels.with_score(frame, summary_kwargs["score_column"]))
            values = {c: frame[c].to_numpy()[finite] for c in spill_columns}
            values["hi"], values["lo"] = arrow_uid_pairs(uids.filter(pa.array(finite)))
        summary["sample"] = summary["sample"].astype({"uid": object})
        summaries.append(summary)
        del frame, uids
        _split(values, n_partitions, parts)
    merged = {p: {k: np.concatenate([c[k] for c in chunks]) for k in chunks[0]} for p, chunks in enumerate(parts) if chunks}
    marker = _save(fs, out_path, merged)
    commit_bytes(fs, _summaries_path(out_path), pickle.dumps(summaries))
    commit_json(fs, f"{out_path}.json", marker)
    return marker, summaries


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


def merge_partition(fs, pieces: list[tuple[str, list[tuple]]], vote_kwargs: dict, methods: list[str], vote: dict | None,
                    out_path: str) -> dict:
    """Round 2 task: one partition's row votes, reduced per uid, to ``out_path``; its totals.

    ``vote`` (rule and threshold) applies the vote rule here; None (top-fraction) leaves it to
    :func:`vote_part` once the threshold is known, and returns the range of ``mimic_score``.
    """
    if not pieces:
        out = {"n_uids": 0, "n_obs": 0, "n_steps": 0, "path": None}
        commit_json(fs, f"{out_path}.json", out)
        return out
    rows = _load(fs, pieces)
    values = kernels.row_values(pd.DataFrame({k: v for k, v in rows.items() if k not in ("hi", "lo")}), None, **vote_kwargs)
    values["hi"], values["lo"] = rows["hi"], rows["lo"]
    del rows
    frame, hi, lo = kernels.per_uid_words(values, methods)
    out = kernels.totals(frame)
    if vote is None:
        out["range"] = {k: float(v[0]) for k, v in block_range(frame, "mimic_score").items()}
    else:
        frame = kernels.apply_vote(frame, methods, **vote)
    return _write_part(fs, out_path, frame, pa.array(pairs_to_hex(hi, lo), pa.binary()).cast(pa.string()), out)


def histogram_part(fs, path: str, edges: np.ndarray) -> np.ndarray:
    """Top-fraction, round 3 task: the part's histogram of ``mimic_score`` over the global ``edges``."""
    with fs.open(path, "rb") as f:
        values = pq.read_table(f, columns=["mimic_score"])["mimic_score"].to_numpy()
    return block_histogram({"mimic_score": values}, "mimic_score", edges)["counts"][0]


def vote_part(fs, path: str, methods: list[str], rule, threshold: float, out_path: str) -> dict:
    """Top-fraction, round 4 task: apply the vote rule at the global threshold to a part; the voted part goes to ``out_path``."""
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
        pa.default_memory_pool().release_unused()


def cpu_count() -> int:
    """The cluster's CPUs; Ray started (or joined, as ``ray.init()`` does) when the caller has not."""
    import ray

    if not ray.is_initialized():
        ray.init()
    return max(1, int(ray.cluster_resources().get("CPU", os.cpu_count() or 1)))


def run_tasks(fn, calls: list[tuple], local: bool, resources: dict[str, float] | None = None) -> list:
    """``fn`` over every argument tuple of ``calls``: in this process (``local``) or as one Ray task each, results in order.

    A Ray task asks for one CPU and ``resources`` (custom Ray resources, e.g. a label of the nodes it may run on).
    """
    if local:
        return [releasing(fn, *args) for args in calls]
    import ray

    # a worker or node that dies mid-task is retried (the task's output is only committed by rename, so a retry rewrites
    # it whole); an error raised by the task itself (bad input, a full disk) is not: it would fail again
    task = ray.remote(num_cpus=1, max_retries=MAX_RETRIES, retry_exceptions=False)(releasing).options(name=fn.__name__,
                                                                                                     resources=resources or None)
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


def _summaries_path(spill_path: str) -> str:
    """Where a map task's summaries are committed: beside the work's other summaries, kept once its rows are merged."""
    return spill_path.replace("/rows/", "/summaries/") + ".pkl"


def _committed_map(fs, path: str) -> tuple[dict, list[dict]] | None:
    """A map task's marker and summaries when its spill file is whole (the size the marker gives); None otherwise."""
    marker = read_committed(fs, f"{path}.json")
    blob = read_committed(fs, _summaries_path(path))
    if marker is None or blob is None:
        return None
    marker = json.loads(marker)
    try:
        return (marker, pickle.loads(blob)) if fs.size(path) == marker["nbytes"] else None
    except (FileNotFoundError, pickle.UnpicklingError, EOFError, ValueError):  # a missing or truncated file: redone
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


def _resume(calls: dict, committed, fn, local: bool, resources: dict | None, counts: dict, name: str) -> dict:
    """Run ``fn`` for every key of ``calls`` whose output has not committed (``committed(key)`` is None); every key's result."""
    done = {key: committed(key) for key in calls}
    pending = [key for key, value in done.items() if value is None]
    for key, result in zip(pending, run_tasks(fn, [calls[key] for key in pending], local, resources)):
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
    resources = mimic.task_resources

    summary_kwargs = mimic.summary_kwargs(files.n_rows)
    spill_columns = ["step", "weight", "batch_size", *dict.fromkeys([mimic.score_column, *mimic.lift_columns])]
    part_paths = [f"{spill.path}/decisions/part-{p:05d}.parquet" for p in range(n_partitions)]
    merged = {path: _committed_part(fs, path) for path in part_paths}
    map_paths = [f"{spill.path}/rows/t{i:05d}.bin" for i in range(len(groups))]
    if all(m is not None for m in merged.values()):  # every partition merged (the compact rows may be gone): the summaries suffice
        maps = {p: (None, pickle.loads(read_committed(fs, _summaries_path(p)))) for p in map_paths}
        counts["map"] = {"tasks": len(groups), "run": 0, "committed_before": len(groups)}
    else:
        maps = _resume({p: (fs, group, names, summary_kwargs, spill_columns, p, n_partitions) for p, group in zip(map_paths, groups)},
                       lambda path: _committed_map(fs, path), map_files, local, resources, counts, "map")
    mimic.absorb([s for _, summaries in maps.values() for s in summaries], files.n_rows)
    mimic.fit_binarizers()

    # top-fraction ranks after every partition is reduced: its vote waits for the threshold
    vote = None if mimic.method == "top-fraction" else {"rule": mimic.rule, "threshold": None}
    if any(m is None for m in merged.values()):
        by_partition: list[list[tuple]] = [[] for _ in range(n_partitions)]
        for marker, _ in maps.values():
            for p, columns in marker["layout"].items():
                by_partition[int(p)].append((marker["path"], columns))
        merged = _resume({path: (fs, by_partition[p], mimic.vote_kwargs(), mimic.methods, vote, path) for p, path in enumerate(part_paths)},
                         lambda path: _committed_part(fs, path), merge_partition, local, resources, counts, "merge")
    else:
        counts["merge"] = {"tasks": n_partitions, "run": 0, "committed_before": n_partitions}
    spill.remove_rows()
    merged = [m for m in merged.values() if m["path"]]
    mimic.count(sum(t["n_uids"] for t in merged), sum(t["n_obs"] for t in merged), sum(t["n_steps"] for t in merged))
    paths = [t["path"] for t in merged]
    threshold = None
    if mimic.method == "top-fraction":
        def histogram(edges: np.ndarray) -> np.ndarray:
            return np.sum(run_tasks(histogram_part, [(fs, p, edges) for p in paths], local, resources), axis=0)

        threshold = histogram_quantile([t["range"] for t in merged], histogram, 1 - mimic.fraction)
        voted = _resume({p.replace("/part-", "/voted-"): (fs, p, mimic.methods, mimic.rule, threshold, p.replace("/part-", "/voted-"))
                         for p in paths}, lambda path: _committed_part(fs, path), vote_part, local, resources, counts, "vote")
        paths = list(voted)
    stats = {"stage2_tasks": {"in_process": local, "map_tasks": len(groups), "partitions": n_partitions, "rounds": counts}}
    stats["fingerprint"] = plan["fingerprint"]
    return Outcome(None, threshold, stats, DecisionParts(fs, paths, in_process=local, task_resources=resources), spill)


def publish_part(fs, path: str, renames: dict, columns: list[str], keep_column: str, quality_column: str, out_fs, out_part: str,
                 keep_path: str) -> dict:
    """Output task: one decision part with the output's columns to ``out_part``, its kept uids sorted to ``keep_path``
    (raw ``u8,u8`` records); its counts and the quality sums of its rows."""
    with fs.open(path, "rb") as f:
        table = pq.read_table(f)
    table = table.rename_columns([renames.get(n, n) for n in table.column_names]).select(columns)
    with out_fs.open(out_part, "wb") as f:
        pq.write_table(table, f)
    keep = table[keep_column].to_numpy(zero_copy_only=False).astype(bool)
    kept = pairs_to_array(*arrow_uid_pairs(table["uid"].filter(pa.array(keep))))
    with out_fs.open(keep_path, "wb") as f:
        f.write(kept.tobytes())
    quality = QualityAccumulator()
    if quality_column in table.column_names:
        values = table[quality_column].to_numpy(zero_copy_only=False).astype(np.float64)
        scored = ~np.isnan(values)  # uids without any score row have no score to average
        quality.update(keep[scored], values[scored])
    return {"n_rows": len(table), "n_kept": len(kept), "quality": [quality.n, quality.n_kept, quality.total, quality.total_kept]}


def write_part_outputs(decisions: DecisionParts, output: str, keep_column: str = "keep", quality_column: str = "mean_raw_score",
                       columns=None, summary: dict | None = None, write: bool = True) -> dict:
    """:func:`raymimic.select.output.write_outputs` for decision parts, written by one task per part; the driver holds no row.

    ``decisions.parquet`` is a folder of parts (a parquet dataset: every reader of the file reads
    it), one per decision part in uid order. ``keep.npy`` stays one sorted file (DataComp's
    resharder reads one): each task sorts its part's kept uids, the parts cover increasing ranges
    of ``hi``, so the driver concatenates them. Both are written under temporary names and renamed.
    """
    fs, root, chosen = open_output(decisions, output, keep_column, columns)
    folder = f"{root}/{TEMPORARY_PREFIX}decisions.parquet"
    if fs.exists(folder):
        fs.rm(folder, recursive=True)
    fs.makedirs(folder, exist_ok=True)
    calls = [(decisions.fs, path, decisions.renames, chosen, keep_column, quality_column, fs, f"{folder}/part-{i:05d}.parquet",
              f"{root}/{TEMPORARY_PREFIX}keep-{i:05d}.bin") for i, path in enumerate(decisions.paths)]
    published = run_tasks(publish_part, calls, decisions.in_process, decisions.task_resources)
    sink = DecisionSink(quality_column)
    sink.n_rows = sum(p["n_rows"] for p in published)
    if not sink.n_rows:
        raise ValueError("the filter produced no decision at all (no uid): nothing to write")
    quality = np.array([p["quality"] for p in published], dtype=np.float64).sum(axis=0)
    sink.quality.n, sink.quality.n_kept = int(quality[0]), int(quality[1])
    sink.quality.total, sink.quality.total_kept = float(quality[2]), float(quality[3])
    if fs.exists(f"{root}/decisions.parquet"):
        fs.rm(f"{root}/decisions.parquet", recursive=True)
    fs.mv(folder, f"{root}/decisions.parquet", recursive=True)
    n_kept = concatenate_subset(fs, f"{root}/{TEMPORARY_PREFIX}keep.npy", [(call[-1], p["n_kept"]) for call, p in zip(calls, published)])
    commit(fs, f"{root}/{TEMPORARY_PREFIX}keep.npy", f"{root}/keep.npy")
    return sink.summary(fs, root, output, summary, n_kept, write)
