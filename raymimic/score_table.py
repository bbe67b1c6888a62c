"""The Stage-1 score table, written exactly once per (uid, step) across failures and resumes.

Layout (**contract**): parquet files under ``<run>/scores/`` with columns uid (str), step
(int64), epoch (int32), rank (int32), score (float32, raw m_i), weight (float32, w_i),
batch_size (int32, global B). ``step`` is the 0-based index of the optimizer update the
sample took part in.

Exactly once: every rank buffers its rows and writes them as one file per step range,
``steps-{first:010d}-{last:010d}-rank-{rank:05d}.parquet``, atomically (temporary name, then
rename), at every checkpoint and every ``flush_every`` steps in between, so no file straddles
a checkpoint. Before a run (fresh or resumed from a checkpoint after ``S`` completed steps)
rank 0 deletes every file holding a step ``>= S``: rows a failed attempt wrote after its last
committed checkpoint disappear, and the resumed attempt writes those steps again. A reader
sees only complete files; rows past the latest checkpoint of a *running* job may still be
replaced.
"""
from __future__ import annotations

import re
import uuid

import fsspec
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

SCHEMA = pa.schema(
    [
        ("uid", pa.string()),
        ("step", pa.int64()),
        ("epoch", pa.int32()),
        ("rank", pa.int32()),
        ("score", pa.float32()),
        ("weight", pa.float32()),
        ("batch_size", pa.int32()),
    ]
)
_FILE = re.compile(r"^steps-(\d+)-(\d+)-rank-(\d+)\.parquet$")
_TMP_PREFIX = ".tmp-"


def file_name(first_step: int, last_step: int, rank: int) -> str:
    return f"steps-{first_step:010d}-{last_step:010d}-rank-{rank:05d}.parquet"


def _fs(uri: str):
    return fsspec.core.url_to_fs(uri)


class ScoreTableWriter:
    """Buffers one rank's rows and writes them as atomically named step-range files."""

    def __init__(self, scores_uri: str, rank: int):
        self.uri = scores_uri.rstrip("/")
        self.rank = rank
        self.fs, self.path = _fs(self.uri)
        self.fs.makedirs(self.path, exist_ok=True)
        self._columns: dict[str, list[np.ndarray]] = {name: [] for name in SCHEMA.names}
        self._steps: list[int] = []

    def add(self, uids, step: int, epoch: int, scores, weights, batch_size: int) -> None:
        n = len(uids)
        if len(scores) != n or len(weights) != n:
            raise ValueError(f"score rows need one score and weight per uid: {n} uids, {len(scores)} scores, {len(weights)} weights")
        self._columns["uid"].append(np.asarray(uids, dtype=object))
        self._columns["step"].append(np.full(n, step, dtype=np.int64))
        self._columns["epoch"].append(np.full(n, epoch, dtype=np.int32))
        self._columns["rank"].append(np.full(n, self.rank, dtype=np.int32))
        self._columns["score"].append(np.asarray(scores, dtype=np.float32))
        self._columns["weight"].append(np.asarray(weights, dtype=np.float32))
        self._columns["batch_size"].append(np.full(n, batch_size, dtype=np.int32))
        self._steps.append(step)

    @property
    def pending_rows(self) -> int:
        return sum(len(part) for part in self._columns["uid"])

    def flush(self) -> str | None:
        """Write the buffered rows as one file (atomic rename); returns its URI, None when empty."""
        if not self._steps:
            return None
        table = pa.table({name: np.concatenate(parts) for name, parts in self._columns.items()}, schema=SCHEMA)
        name = file_name(min(self._steps), max(self._steps), self.rank)
        tmp = f"{self.path}/{_TMP_PREFIX}{uuid.uuid4().hex}-{name}.tmp"  # no .parquet suffix: readers skip it
        with self.fs.open(tmp, "wb") as f:
            pq.write_table(table, f)
        self.fs.mv(tmp, f"{self.path}/{name}")
        self._columns = {key: [] for key in SCHEMA.names}
        self._steps = []
        return f"{self.uri}/{name}"


def score_files(scores_uri: str) -> list[tuple[int, int, int, str]]:
    """``(first_step, last_step, rank, path)`` of every committed score file, sorted."""
    fs, path = _fs(scores_uri.rstrip("/"))
    if not fs.exists(path):
        return []
    found = []
    for entry in fs.ls(path, detail=False):
        match = _FILE.match(entry.rstrip("/").rsplit("/", 1)[-1])
        if match:
            found.append((int(match[1]), int(match[2]), int(match[3]), entry))
    return sorted(found)


def discard_from_step(scores_uri: str, step: int) -> list[str]:
    """Delete score files holding any step ``>= step`` and leftover temporary files; returns them."""
    fs, path = _fs(scores_uri.rstrip("/"))
    if not fs.exists(path):
        return []
    doomed = [p for first, last, _, p in score_files(scores_uri) if last >= step]
    doomed += [p for p in fs.ls(path, detail=False) if p.rstrip("/").rsplit("/", 1)[-1].startswith(_TMP_PREFIX)]
    for p in doomed:
        fs.rm(p)
    return doomed


def read_score_table(scores_uri: str) -> pa.Table:
    """All committed rows as one pyarrow table (small tables, tests and reports; use Ray Data for large)."""
    files = score_files(scores_uri)
    if not files:
        return SCHEMA.empty_table()
    fs, _ = _fs(scores_uri)
    tables = []
    for *_, p in files:
        with fs.open(p, "rb") as f:
            tables.append(pq.read_table(f))
    return pa.concat_tables(tables)
