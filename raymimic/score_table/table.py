"""The score table itself: its schema, file names, writers and readers.

The score table is the contract between Stage 1 (training, :mod:`raymimic.train.loop`; the
score-only pass, :mod:`raymimic.train.score_only`) and Stage 2 (:mod:`raymimic.select`).

Layout (**contract**): parquet files under ``<run>/scores/``, one row per sample per optimizer
step, with the required columns uid (str), step (int64), epoch (int32), rank (int32), score
(float32, raw m_i), weight (float32, w_i), batch_size (int32, global B). ``step`` is the 0-based
index of the optimizer update the sample took part in. Optional float32 columns
``score_<name>`` (``<name>`` in ``[a-z0-9_]+``) hold the same sample's score against another
direction or a baseline score of the same step, higher = more likely to keep
(:mod:`raymimic.score_table.columns` names them and says what each is). Readers accept tables
with or without them, also when only some files have them: the small reader fills the missing
values with null, the Ray reader reads with the union schema of all files, so every block has
every column (null where a file lacks it).

File names (:func:`file_name`, :func:`parse_file_name`, one regular expression):
``steps-{first:010d}-{last:010d}-rank-{rank:05d}.parquet`` for Stage-1 training files, and
``steps-{first}-{last}-rank-{rank}-part-{hex}.parquet`` for the score-only pass, which writes one
file per Ray Data block named by a hash of the block's (uid, step) pairs (a retried block gets
the same name and replaces its file, so rows are written once). The score-only step is the
checkpoint's, ``-1`` when unknown (``steps--000000001--000000001-rank-00000-part-....parquet``).

Exactly once (training): every rank buffers its rows and writes them as one file per step
range, atomically (temporary name, then rename), at every checkpoint and every
``flush_every`` steps in between, so no file straddles a checkpoint. Before a run (fresh or
resumed from a checkpoint after ``S`` completed steps) rank 0 deletes every file holding a
step ``>= S`` (:func:`discard_from_step`): rows a failed attempt wrote after its last committed
checkpoint disappear, and the resumed attempt writes those steps again. A reader sees only
complete files; rows past the latest checkpoint of a *running* job may still be replaced.

Readers read the *committed* files (:func:`table_files`): every ``*.parquet`` file directly in
the folder whose name does not start with ``.`` or ``_``. Temporary files (``.tmp-...tmp``) are
never read. Files named otherwise than the pattern (score tables written by other tools, e.g.
``00000.parquet``) are read too; only pattern-named files take part in :func:`discard_from_step`.
A URI may also name one parquet file.

- :func:`read_score_table`: small tables (tests, reports) as one ``pyarrow.Table``;
- :func:`read_score_dataset`: large tables as a ``ray.data.Dataset`` (local paths and fsspec URIs);
- :func:`count_rows`: the row count from the parquet footers, without reading row data.
"""
from __future__ import annotations

import contextlib
import hashlib
import re
import uuid
from collections.abc import Iterable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any, NamedTuple

import fsspec
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from raymimic.score_table.columns import CONTROL_PREFIX, control_column, control_name

# ------------------------------------------------------------------------------ schema
REQUIRED_FIELDS = (
    pa.field("uid", pa.string()),
    pa.field("step", pa.int64()),
    pa.field("epoch", pa.int32()),
    pa.field("rank", pa.int32()),
    pa.field("score", pa.float32()),
    pa.field("weight", pa.float32()),
    pa.field("batch_size", pa.int32()),
)
SCHEMA = pa.schema(REQUIRED_FIELDS)
"""The required columns, in order (a table without control columns)."""
COLUMNS = tuple(SCHEMA.names)
"""Names of the required columns: uid, step, epoch, rank, score, weight, batch_size."""
STAGE2_COLUMNS = tuple(c for c in COLUMNS if c != "rank")
"""The columns Stage 2 needs (``rank`` only says which worker wrote a row)."""
CONTROL_TYPE = pa.float32()
_TYPES = {f.name: f.type for f in REQUIRED_FIELDS}


def _type_name(dtype: pa.DataType) -> str:
    return {pa.float32(): "float32", pa.float64(): "float64", pa.float16(): "float16"}.get(dtype, str(dtype))


CONTRACT = (", ".join(f"{f.name} {_type_name(f.type)}" for f in REQUIRED_FIELDS)
            + f", plus optional {_type_name(CONTROL_TYPE)} columns {CONTROL_PREFIX}<name> with <name> in [a-z0-9_]+ (e.g. score_zero)")
"""The contract in words, for error messages."""


class ScoreTableError(ValueError):
    """A score table (or one of its files) that does not follow the contract or cannot be read."""


def control_names(names_or_schema: Any) -> list[str]:
    """Control names of the optional columns present in a schema or list of column names, in order."""
    names, _ = _names_and_types(names_or_schema)
    return [n for n in map(control_name, names) if n is not None]


def schema_for(controls: Iterable[str] = ()) -> pa.Schema:
    """The contract's schema with one float32 ``score_<name>`` column per control name (in order, duplicates once)."""
    columns = [control_column(c) for c in dict.fromkeys(controls)]
    return pa.schema([*REQUIRED_FIELDS, *(pa.field(c, CONTROL_TYPE) for c in columns)])


def _names_and_types(names_or_schema: Any) -> tuple[list[str], dict[str, pa.DataType]]:
    """Column names and (where known) pyarrow types of a pyarrow/Ray schema, a table or a list of names."""
    if isinstance(names_or_schema, pa.Table):
        names_or_schema = names_or_schema.schema
    if isinstance(names_or_schema, pa.Schema):
        return list(names_or_schema.names), dict(zip(names_or_schema.names, names_or_schema.types))
    if hasattr(names_or_schema, "names"):  # ray.data.Schema and the like
        names = list(names_or_schema.names)
        types = list(getattr(names_or_schema, "types", None) or [])
        if len(types) == len(names) and all(isinstance(t, pa.DataType) for t in types):
            return names, dict(zip(names, types))
        return names, {}
    if isinstance(names_or_schema, str):
        raise TypeError("check_schema needs a schema or a list of column names, not one string")
    return list(names_or_schema), {}


def _kind_ok(column: str, dtype: pa.DataType) -> bool:
    if pa.types.is_dictionary(dtype):
        dtype = dtype.value_type
    if pa.types.is_null(dtype):  # an all-null column fits any type
        return True
    expected = _TYPES.get(column, CONTROL_TYPE if control_name(column) else None)
    if expected is None:
        return True
    if pa.types.is_string(expected):
        return pa.types.is_string(dtype) or pa.types.is_large_string(dtype) or pa.types.is_string_view(dtype)
    if pa.types.is_integer(expected):
        return pa.types.is_integer(dtype)
    return pa.types.is_floating(dtype) or pa.types.is_integer(dtype)


def check_schema(names_or_schema: Any, where: str = "score table", required: Sequence[str] = COLUMNS) -> None:
    """Raise :class:`ScoreTableError` (a ``ValueError``) if ``required`` columns are missing or a column has the wrong kind.

    ``names_or_schema``: a pyarrow schema or table, a Ray Data schema, or column names (then only
    presence is checked). The message names ``where`` (a file, a dataset), lists what is missing
    and what the contract has.
    """
    names, types = _names_and_types(names_or_schema)
    missing = [c for c in required if c not in names]
    wrong = [f"has column {c!r} of type {_type_name(t)} where the contract has {_type_name(_TYPES.get(c, CONTROL_TYPE))}"
             for c, t in types.items() if not _kind_ok(c, t)]
    if missing or wrong:
        problems = ([f"lacks column(s) {missing}"] if missing else []) + wrong
        raise ScoreTableError(f"{where} {'; '.join(problems)} (its columns: {names}). The score-table contract has {CONTRACT}")


def conform(table: pa.Table, where: str = "score table", *, keep_other: bool = False) -> pa.Table:
    """``table`` checked and cast to the contract's types: required columns first, then ``score_<name>`` sorted.

    Other columns are dropped, or kept after those with ``keep_other``.
    """
    check_schema(table.schema, where)
    controls = sorted(c for c in table.column_names if control_name(c))
    target = [*REQUIRED_FIELDS, *(pa.field(c, CONTROL_TYPE) for c in controls)]
    if keep_other:
        known = {f.name for f in target}
        target += [table.schema.field(c) for c in table.column_names if c not in known]
    columns = []
    for field in target:
        column = table.column(field.name)
        try:
            columns.append(column if column.type == field.type else column.cast(field.type))
        except (pa.ArrowInvalid, pa.ArrowNotImplementedError) as exc:
            raise ScoreTableError(f"{where}: column {field.name!r} ({_type_name(column.type)}) cannot be cast to "
                                  f"{_type_name(field.type)}: {exc}") from exc
    return pa.Table.from_arrays(columns, schema=pa.schema(target))


# ------------------------------------------------------------------------------ file names
_FILE = re.compile(r"^steps-(-?\d+)-(-?\d+)-rank-(\d+)(?:-part-([0-9a-f]+))?\.parquet$")
_TMP_PREFIX = ".tmp-"


class ScoreFile(NamedTuple):
    """A committed score file named by the pattern; ``part`` is ``""`` for Stage-1 training files."""
    first_step: int
    last_step: int
    rank: int
    part: str
    path: str


def file_name(first_step: int, last_step: int, rank: int, part: str | None = None) -> str:
    """``steps-{first:010d}-{last:010d}-rank-{rank:05d}[-part-{part}].parquet``; ``part`` is lower-case hex."""
    if first_step > last_step or rank < 0:
        raise ValueError(f"bad score file range: steps {first_step}..{last_step}, rank {rank}")
    if part is not None and not re.fullmatch(r"[0-9a-f]+", part):
        raise ValueError(f"score file part must be lower-case hex, got {part!r}")
    suffix = f"-part-{part}" if part else ""
    return f"steps-{first_step:010d}-{last_step:010d}-rank-{rank:05d}{suffix}.parquet"


def parse_file_name(name: str) -> tuple[int, int, int, str] | None:
    """``(first_step, last_step, rank, part)`` of a score file's base name (``part`` ``""`` if none); None otherwise."""
    match = _FILE.match(name)
    if not match:
        return None
    return int(match[1]), int(match[2]), int(match[3]), match[4] or ""


def _fs(uri: str) -> tuple[fsspec.AbstractFileSystem, str]:
    fs, path = fsspec.core.url_to_fs(str(uri))
    return fs, path.rstrip("/") or path


def _is_local(fs: fsspec.AbstractFileSystem) -> bool:
    protocols = fs.protocol if isinstance(fs.protocol, (tuple, list)) else (fs.protocol,)
    return "file" in protocols or "local" in protocols


def _display(fs: fsspec.AbstractFileSystem, path: str) -> str:
    return path if _is_local(fs) else fs.unstrip_protocol(path)


def _base(path: str) -> str:
    return path.rstrip("/").rsplit("/", 1)[-1]


def _entries(fs: fsspec.AbstractFileSystem, path: str) -> list[str] | None:
    """Files directly in ``path`` (``[path]`` when it is a file); None when it does not exist."""
    if not fs.exists(path):
        return None
    if fs.isfile(path):
        return [path]
    return [e["name"] for e in fs.ls(path, detail=True) if e.get("type") != "directory"]


def score_files(scores_uri: str) -> list[ScoreFile]:
    """Every committed score file named by the pattern, sorted by (first, last, rank, part)."""
    fs, path = _fs(scores_uri)
    found = []
    for entry in _entries(fs, path) or []:
        parsed = parse_file_name(_base(entry))
        if parsed:
            found.append(ScoreFile(*parsed, entry))
    return sorted(found)


def _committed(name: str) -> bool:
    return name.endswith(".parquet") and not name.startswith((".", "_"))


def table_files(scores_uri: str) -> list[str]:
    """Paths the readers read: score files (sorted), then other committed ``*.parquet`` files by name.

    A URI naming one file gives that file, whatever its name; a missing folder gives ``[]``.
    """
    fs, path = _fs(scores_uri)
    entries = _entries(fs, path) or []
    if entries == [path]:
        return entries
    named = [f.path for f in score_files(scores_uri)]
    taken = set(named)
    return named + sorted(e for e in entries if e not in taken and _committed(_base(e)))


def discard_from_step(scores_uri: str, step: int) -> list[str]:
    """Delete score files holding any step ``>= step`` and leftover temporary files; returns them."""
    fs, path = _fs(scores_uri)
    entries = _entries(fs, path)
    if entries is None:
        return []
    doomed = [f.path for f in score_files(scores_uri) if f.last_step >= step]
    doomed += [p for p in entries if _base(p).startswith(_TMP_PREFIX)]
    for p in doomed:
        fs.rm(p)
    return doomed


# ------------------------------------------------------------------------------ writing
def _write_atomic(fs: fsspec.AbstractFileSystem, directory: str, name: str, table: pa.Table) -> str:
    """Write ``table`` as ``directory/name`` via a temporary file (no ``.parquet`` suffix, readers skip it)."""
    tmp = f"{directory}/{_TMP_PREFIX}{uuid.uuid4().hex}-{name}.tmp"
    try:
        with fs.open(tmp, "wb") as f:
            pq.write_table(table, f)
        fs.mv(tmp, f"{directory}/{name}")
    except BaseException:
        with contextlib.suppress(OSError):  # the original error matters more
            if fs.exists(tmp):
                fs.rm(tmp)
        raise
    return f"{directory}/{name}"


class ScoreTableWriter:
    """Buffers one rank's rows and writes them as atomically named step-range files.

    ``controls``: control names whose ``score_<name>`` columns every file of this writer has
    (null where an ``add`` did not give them). Columns passed in ``add(extra=...)`` that were not
    declared are written too (null for the rows of other ``add`` calls in the same file).
    """

    def __init__(self, scores_uri: str, rank: int, controls: Iterable[str] | None = None):
        self.uri = scores_uri.rstrip("/")
        self.rank = rank
        self.controls = [control_column(c) for c in dict.fromkeys(controls or ())]
        self.fs, self.path = _fs(self.uri)
        self.fs.makedirs(self.path, exist_ok=True)
        self._reset()

    def _reset(self) -> None:
        self._columns: dict[str, list[np.ndarray]] = {name: [] for name in COLUMNS}
        self._extra: list[dict[str, np.ndarray]] = []
        self._steps: list[int] = []

    def add(self, uids, step: int, epoch: int, scores, weights, batch_size: int, extra: Mapping[str, Any] | None = None) -> None:
        """Buffer one step's rows; ``extra`` maps ``score_<name>`` column names to one value per uid."""
        n = len(uids)
        if len(scores) != n or len(weights) != n:
            raise ValueError(f"score rows need one score and weight per uid: {n} uids, {len(scores)} scores, {len(weights)} weights")
        controls = {}
        for column, values in (extra or {}).items():
            if control_name(column) is None:
                raise ValueError(f"extra score column {column!r} is not named {CONTROL_PREFIX}<name> with <name> in [a-z0-9_]+ "
                                 "(e.g. score_zero)")
            values = np.asarray(values, dtype=np.float32).reshape(-1)
            if len(values) != n:
                raise ValueError(f"extra score column {column!r} has {len(values)} values for {n} uids")
            controls[column] = values
        self._columns["uid"].append(np.asarray(uids, dtype=object))
        self._columns["step"].append(np.full(n, step, dtype=np.int64))
        self._columns["epoch"].append(np.full(n, epoch, dtype=np.int32))
        self._columns["rank"].append(np.full(n, self.rank, dtype=np.int32))
        self._columns["score"].append(np.asarray(scores, dtype=np.float32))
        self._columns["weight"].append(np.asarray(weights, dtype=np.float32))
        self._columns["batch_size"].append(np.full(n, batch_size, dtype=np.int32))
        self._extra.append(controls)
        self._steps.append(step)

    @property
    def pending_rows(self) -> int:
        return sum(len(part) for part in self._columns["uid"])

    def _table(self) -> pa.Table:
        arrays = [pa.array(np.concatenate(self._columns[f.name]), type=f.type) for f in REQUIRED_FIELDS]
        seen = sorted({c for extra in self._extra for c in extra} - set(self.controls))
        fields = list(REQUIRED_FIELDS)
        for column in [*self.controls, *seen]:
            chunks = [pa.array(extra[column], type=CONTROL_TYPE) if column in extra else pa.nulls(len(uids), CONTROL_TYPE)
                      for extra, uids in zip(self._extra, self._columns["uid"])]
            arrays.append(pa.concat_arrays(chunks))
            fields.append(pa.field(column, CONTROL_TYPE))
        return pa.Table.from_arrays(arrays, schema=pa.schema(fields))

    def flush(self) -> str | None:
        """Write the buffered rows as one file (atomic rename); returns its URI, None when empty."""
        if not self._steps:
            return None
        table = self._table()
        name = file_name(min(self._steps), max(self._steps), self.rank)
        _write_atomic(self.fs, self.path, name, table)
        self._reset()
        return f"{self.uri}/{name}"


def part_name(table: pa.Table) -> str:
    """Score-only file name of a block of rows: its step range, its (lowest) rank and a hash of its (uid, step) pairs."""
    digest = hashlib.blake2b(digest_size=8)
    for chunk in table.column("uid").cast(pa.string()).chunks:
        digest.update("\0".join(chunk.to_pylist()).encode())
        digest.update(b"\1")
    digest.update(table.column("step").to_numpy().astype(np.int64).tobytes())
    steps = table.column("step").to_numpy()
    rank = int(table.column("rank").to_numpy().min())
    return file_name(int(steps.min()), int(steps.max()), rank, digest.hexdigest())


def write_part(table: pa.Table, scores_uri: str) -> str | None:
    """Write one block of score rows (e.g. of the score-only pass) atomically as one score file; returns its name.

    The name (:func:`part_name`) depends only on the block's (uid, step) pairs, so writing the
    same block again (a retried task) replaces the file instead of adding rows. Columns are cast
    to the contract; columns outside it are dropped. None (nothing written) for an empty block.
    """
    if table.num_rows == 0:
        return None
    table = conform(table, "score rows to write")
    name = part_name(table)
    fs, path = _fs(scores_uri)
    fs.makedirs(path, exist_ok=True)
    _write_atomic(fs, path, name, table)
    return name


def discard_parts(scores_uri: str, keep: Iterable[str], first_step: int, last_step: int) -> list[str]:
    """Delete score-only (``part``) files whose steps overlap ``first_step..last_step`` and whose names are not in ``keep``.

    After a score-only pass has written its files, this removes the output of an earlier pass of
    the same step(s) into the same folder, so a rerun replaces it. Returns the deleted paths.
    """
    keep = set(keep)
    fs, _ = _fs(scores_uri)
    doomed = [f.path for f in score_files(scores_uri)
              if f.part and _base(f.path) not in keep and f.first_step <= last_step and first_step <= f.last_step]
    for p in doomed:
        fs.rm(p)
    return doomed


# ------------------------------------------------------------------------------ reading
def _footer(fs: fsspec.AbstractFileSystem, path: str) -> pq.FileMetaData:
    try:
        with fs.open(path, "rb") as f:
            return pq.ParquetFile(f).metadata
    except (pa.ArrowException, OSError, ValueError) as exc:
        raise ScoreTableError(f"score file {_display(fs, path)} is not a readable parquet file: {exc}") from exc


def read_footers(fs: fsspec.AbstractFileSystem, paths: list[str]) -> list[pq.FileMetaData]:
    """Parquet footers of ``paths`` (metadata only, no row data), read by up to 16 threads."""
    if len(paths) <= 1:
        return [_footer(fs, p) for p in paths]
    with ThreadPoolExecutor(max_workers=min(16, len(paths))) as pool:
        return list(pool.map(lambda p: _footer(fs, p), paths))


def count_rows(scores_uri: str) -> int:
    """Rows of the committed files, summed from their parquet footers (no row data read); 0 if the folder is missing."""
    fs, _ = _fs(scores_uri)
    return sum(meta.num_rows for meta in read_footers(fs, table_files(scores_uri)))


def ordered_schema(schema: pa.Schema) -> pa.Schema:
    """Required columns first, then control columns sorted, then the rest in their order; no metadata."""
    controls = sorted(n for n in schema.names if control_name(n))
    first = [n for n in COLUMNS if n in schema.names] + controls
    taken = set(first)
    rest = [n for n in schema.names if n not in taken]
    return pa.schema([schema.field(n) for n in first + rest])


def read_score_table(scores_uri: str) -> pa.Table:
    """All committed rows as one pyarrow table (small tables: tests, reports; use :func:`read_score_dataset` for large).

    Every file is checked against the contract (the error names the file) and cast to its types;
    ``score_<name>`` columns missing from some files are null there, other columns are kept.
    A missing folder gives an empty table.
    """
    fs, _ = _fs(scores_uri)
    tables = []
    for p in table_files(scores_uri):
        where = f"score file {_display(fs, p)}"
        try:
            with fs.open(p, "rb") as f:
                table = pq.read_table(f)
        except (pa.ArrowException, OSError, ValueError) as exc:
            raise ScoreTableError(f"{where} is not a readable parquet file: {exc}") from exc
        tables.append(conform(table.replace_schema_metadata(None), where, keep_other=True))
    if not tables:
        return SCHEMA.empty_table()
    table = pa.concat_tables(tables, promote_options="permissive")
    return table.select(ordered_schema(table.schema).names)


def read_score_dataset(scores_uri: str, *, required: Sequence[str] = COLUMNS):
    """The committed files of ``<run>/scores`` (local path or any fsspec URI but ``memory://``) as a Ray Dataset.

    Only committed files are read (:func:`table_files`; never temporary files). Every file's
    footer is read first (in threads; metadata only) to check its columns against ``required``
    (the error names the file) and to build the union schema of all files, which Ray reads with:
    a file without some ``score_<name>`` column gives nulls there (NaN in pandas batches), so
    tables with, without and with some optional columns all read. An existing folder without
    files gives an empty dataset with the required columns; a missing one ``FileNotFoundError``.
    """
    import pyarrow.fs
    import ray

    fs, path = _fs(scores_uri)
    protocols = fs.protocol if isinstance(fs.protocol, (tuple, list)) else (fs.protocol,)
    if "memory" in protocols:
        raise ValueError(f"score table {scores_uri!r} is on fsspec's process-local memory filesystem, which Ray workers cannot see; "
                         "use a local path, file://, s3://, gs:// or another shared store")
    if not fs.exists(path):
        raise FileNotFoundError(f"score tables {scores_uri!r} do not exist "
                                "(expected RUN/scores, a directory of parquet files written by Stage 1)")
    files = table_files(scores_uri)
    if not files:
        return ray.data.from_arrow(SCHEMA.empty_table())
    schemas = []
    for p, meta in zip(files, read_footers(fs, files)):
        schema = meta.schema.to_arrow_schema().remove_metadata()
        check_schema(schema, f"score file {_display(fs, p)}", required)
        schemas.append(schema)
    try:
        unified = ordered_schema(pa.unify_schemas(schemas, promote_options="permissive"))
    except (pa.ArrowInvalid, pa.ArrowTypeError) as exc:
        raise ScoreTableError(f"the files of score table {scores_uri!r} have incompatible column types: {exc}") from exc
    filesystem = None if _is_local(fs) else pyarrow.fs.PyFileSystem(pyarrow.fs.FSSpecHandler(fs))
    return ray.data.read_parquet(files, filesystem=filesystem, schema=unified)
