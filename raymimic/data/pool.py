"""Read a DataComp pool as a streaming Ray Dataset.

Layout read (as img2dataset and DataComp's download write it)::

    POOL/shards/{:08d}.tar        webdataset: KEY.jpg|.png|.webp, KEY.txt, KEY.json (holds "uid")
    POOL/metadata/{:08d}.parquet  (+ same-name .npz) joined in by uid when asked for

``read_pool(uri)`` returns a ``ray.data.Dataset`` with one row per readable sample and the
columns ``uid`` (32 lower-case hex), ``text``, ``image`` (encoded bytes), ``key``,
``shard`` (plus ``json`` on request, and metadata/embedding columns when asked for).
Shards are read by a shard-level reader, one Ray task per shard, streaming the tar and
yielding blocks of ``rows_per_block`` rows, so no shard is ever held whole in the driver.

Rejects
-------
A sample that cannot be used is skipped, never silently: it is recorded with
``(shard, key, reason, detail)`` in a :class:`PoolRejects` ledger. Reasons:
``truncated_tar``, ``unreadable_shard``, ``missing_image``, ``corrupt_image``,
``missing_caption``, ``caption_not_utf8``, ``missing_json``, ``invalid_json``,
``json_without_uid``, ``malformed_uid``, ``duplicate_uid`` (the first copy read is kept;
within a shard that is the first in tar order, across shards the shard read first), and
from :func:`raymimic.data.preprocess.preprocess_for_clip`, ``undecodable_image``.

How the caller gets them::

    rejects = PoolRejects()
    ds = read_pool("s3://bucket/pool", rejects=rejects)
    ds.materialize()                      # or iterate / write / train: Ray Data is lazy
    rejects.count()                       # -> int;   rejects.counts_by_reason() -> dict
    rejects.table()                       # -> pyarrow.Table (shard, key, reason, detail)
    rejects.write("s3://bucket/run/rejects.parquet")
    print(rejects.summary())

The ledger is complete once the dataset has been fully consumed; re-running the dataset
(e.g. ``count()`` then ``take_all()``) does not double count, because entries are keyed by
``(shard, key)``. When every shard has been read, a one-line summary is printed. Without a
``rejects=`` argument, read_pool still keeps a ledger (duplicate uids need it) and prints
the summary line.

Only an unreadable pool root raises (:class:`PoolNotReadableError`, naming it).
"""
from __future__ import annotations

import io
import json
import re
import tarfile
from collections import Counter
from collections.abc import Iterable, Iterator, Sequence

import pyarrow as pa

from raymimic.data import _fs
from raymimic.data.metadata import METADATA_COLUMNS, embedding_keys, read_metadata
from raymimic.data.uids import validate_uid

PoolNotReadableError = _fs.PoolNotReadableError

IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp")
POOL_COLUMNS = ("uid", "text", "image", "key", "shard")
OPTIONAL_POOL_COLUMNS = ("json", "image_format")
_COLUMN_TYPES = {name: pa.string() for name in POOL_COLUMNS + OPTIONAL_POOL_COLUMNS} | {"image": pa.binary()}
REJECT_SCHEMA = pa.schema([("shard", pa.string()), ("key", pa.string()), ("reason", pa.string()), ("detail", pa.string())])
# webdataset's rule: the key is the path up to the first dot of the file name
_KEY_AND_EXTENSION = re.compile(r"^((?:.*/|)[^.]+)[.]([^/]*)$")


# ----------------------------------------------------------------------------- shard reading


def _samples_of_tar(stream) -> Iterator[tuple[str, dict[str, bytes] | None, str | None]]:
    """Yield ``(key, {extension: bytes}, None)`` per sample of a tar stream, in tar order.

    If the tar ends mid-way, yields ``(key, None, error_text)`` once for the sample being
    read (or, when that sample is already complete, the sample and then ``("", None,
    error_text)`` for what was lost after it) and stops.
    """
    key, members = None, {}
    stream = _CountingReader(stream)
    try:
        with tarfile.open(fileobj=stream, mode="r|") as tar:
            for info in tar:
                if not info.isfile():
                    continue
                match = _KEY_AND_EXTENSION.match(info.name)
                if not match:
                    continue
                member_key, extension = match.group(1), match.group(2).lower()
                if member_key != key:
                    if key is not None:
                        yield key, members, None
                    key, members = member_key, {}
                members[extension] = tar.extractfile(info).read()
        if stream.count % 512:
            # tarfile ends quietly on a partial header; a tar file is always whole 512-byte blocks
            raise tarfile.ReadError(f"file ends inside a 512-byte block (after {stream.count} bytes)")
    except (tarfile.TarError, EOFError, OSError) as error:
        yield from _truncated(key, members, error)
        return
    if key is not None:
        yield key, members, None


def _truncated(key, members, error):
    problem = f"{type(error).__name__}: {error}"
    if key is not None and _is_complete(members):
        # the tar broke after this sample's last member: keep it, report what follows as lost
        yield key, members, None
        yield "", None, f"tar ends after sample {key}: {problem}"
    else:
        yield (key or ""), None, problem


class _CountingReader:
    """File wrapper counting the bytes read, to notice a tar cut inside a block."""

    def __init__(self, raw):
        self.raw, self.count = raw, 0

    def read(self, size=-1):
        data = self.raw.read(size)
        self.count += len(data)
        return data


def _is_complete(members: dict[str, bytes]) -> bool:
    return "txt" in members and "json" in members and any(ext in members for ext in IMAGE_EXTENSIONS)


def _check_image(data: bytes) -> str | None:
    """Cheap check (header only, no full decode): None if the bytes look like an image."""
    from PIL import Image

    try:
        with Image.open(io.BytesIO(data)) as image:
            width, height = image.size
        if width <= 0 or height <= 0:
            return f"image has size {width}x{height}"
    except Exception as error:  # PIL raises many types for bad data
        return f"{type(error).__name__}: {error}"
    return None


def parse_sample(key: str, members: dict[str, bytes], check_images: bool = True) -> tuple[dict | None, tuple[str, str] | None]:
    """Validate one webdataset sample; return ``(row, None)`` or ``(None, (reason, detail))``."""
    image_extension = next((ext for ext in IMAGE_EXTENSIONS if ext in members), None)
    if image_extension is None:
        return None, ("missing_image", f"no .{'/.'.join(IMAGE_EXTENSIONS)} member (has {sorted(members)})")
    image = members[image_extension]
    if check_images:
        problem = _check_image(image)
        if problem:
            return None, ("corrupt_image", problem)
    if "txt" not in members:
        return None, ("missing_caption", "no .txt member")
    try:
        text = members["txt"].decode("utf-8")
    except UnicodeDecodeError as error:
        return None, ("caption_not_utf8", str(error))
    if "json" not in members:
        return None, ("missing_json", "no .json member")
    try:
        meta = json.loads(members["json"])
    except (ValueError, UnicodeDecodeError) as error:
        return None, ("invalid_json", str(error))
    if not isinstance(meta, dict) or "uid" not in meta:
        return None, ("json_without_uid", "the .json member has no 'uid' field")
    try:
        uid = validate_uid(meta["uid"])
    except ValueError as error:
        return None, ("malformed_uid", str(error))
    row = {"uid": uid, "text": text, "image": image, "key": key, "json": members["json"].decode("utf-8", "replace"),
           "image_format": image_extension}
    return row, None


def read_shard(path: str, check_images: bool = True, dedup: bool = True) -> Iterator[tuple[list[dict], list[tuple[str, str, str]]]]:
    """Read one tar shard (any fsspec path); yield ``(rows, rejects)`` per sample group.

    Plain Python, no Ray: the same code serves the Ray reader and single-process tools.
    ``rejects`` are ``(key, reason, detail)``. Duplicate uids within the shard are rejected
    here (unless ``dedup`` is False); across shards the ledger decides.
    """
    import fsspec

    seen: set[str] = set()
    try:
        stream_context = fsspec.open(path, "rb")
        stream = stream_context.open()
    except Exception as error:
        yield [], [("", "unreadable_shard", f"{type(error).__name__}: {error}")]
        return
    try:
        for key, members, error in _samples_of_tar(stream):
            if error is not None:
                yield [], [(key, "truncated_tar", error)]
                continue
            row, problem = parse_sample(key, members, check_images)
            if problem is not None:
                yield [], [(key, *problem)]
            elif dedup and row["uid"] in seen:
                yield [], [(key, "duplicate_uid", f"uid {row['uid']} already read earlier in this shard")]
            else:
                seen.add(row["uid"])
                yield [row], []
    finally:
        stream.close()


# ----------------------------------------------------------------------------- rejects ledger


class _Ledger:
    """Ray actor: the pool-wide uid claims and the rejects, keyed so re-execution is idempotent."""

    def __init__(self, pool_uri: str, num_shards: int, print_summary: bool):
        self.pool_uri = pool_uri
        self.num_shards = num_shards
        self.print_summary = print_summary
        self.owner: dict[str, tuple[str, str]] = {}  # uid -> (shard, key) that keeps it
        self.rejects: dict[tuple[str, str, str], tuple[str, str]] = {}  # (shard, key, stage) -> (reason, detail)
        self.rows_per_shard: dict[str, int] = {}
        self.summary_printed = False

    def claim(self, shard: str, keys: list[str], uids: list[str]) -> list[bool]:
        granted = []
        for key, uid in zip(keys, uids):
            owner = self.owner.setdefault(uid, (shard, key))
            ok = owner == (shard, key)
            if not ok:
                self.rejects[(shard, key, "read")] = ("duplicate_uid", f"uid {uid} already read from {owner[0]} key {owner[1]}")
            granted.append(ok)
        return granted

    def add_rejects(self, entries: list[tuple[str, str, str, str, str]]) -> None:
        for shard, key, stage, reason, detail in entries:
            self.rejects[(shard, key, stage)] = (reason, detail)

    def record(self, shard: str, keys: list[str], uids: list[str] | None, rejects: list, done_rows: int | None) -> list[bool]:
        """One round trip per block: its rejects, its uid claims (None: no de-duplication),
        and, for a shard's last block, the rows emitted before it."""
        self.add_rejects(rejects)
        granted = self.claim(shard, keys, uids) if uids is not None else [True] * len(keys)
        if done_rows is not None:
            self.shard_done(shard, done_rows + sum(granted))
        return granted

    def shard_done(self, shard: str, rows: int) -> None:
        self.rows_per_shard[shard] = rows
        if self.print_summary and not self.summary_printed and len(self.rows_per_shard) == self.num_shards:
            self.summary_printed = True
            print(self.summary(), flush=True)

    def entries(self) -> list[tuple[str, str, str, str]]:
        return [(shard, key, reason, detail) for (shard, key, _), (reason, detail) in sorted(self.rejects.items())]

    def summary(self) -> str:
        reasons = Counter(reason for reason, _ in self.rejects.values())
        detail = ", ".join(f"{reason} {count}" for reason, count in sorted(reasons.items())) or "none"
        done = len(self.rows_per_shard)
        return (
            f"read_pool {self.pool_uri}: {sum(self.rows_per_shard.values())} samples read from "
            f"{done}/{self.num_shards} shards; {sum(reasons.values())} rejected ({detail})"
        )


class PoolRejects:
    """The samples a pool read skipped, with reasons; see the module docstring for use.

    Create one in the driver (Ray must be initialised) and pass it to ``read_pool`` and
    ``preprocess_for_clip``. It is backed by a small Ray actor, so rejects found in any task
    on any node land in one place.
    """

    def __init__(self, print_summary: bool = True):
        self.print_summary = print_summary
        self._actor = None

    def _bind(self, pool_uri: str, num_shards: int):
        import ray

        if self._actor is not None:
            raise ValueError("this PoolRejects is already bound to a pool read; create one PoolRejects per read_pool call")
        from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

        # on the driver's node: a worker node that dies (preemption, scale-down) must not take the
        # pool-wide ledger, and with it the whole read, down; if the driver's node dies the job is gone anyway.
        # Hard affinity: Ray places an actor that needs no resources on a random alive node unless its node
        # affinity is hard, so a soft one would put the ledger on a worker node whenever the cluster has some
        here = NodeAffinitySchedulingStrategy(ray.get_runtime_context().get_node_id(), soft=False)
        self._actor = ray.remote(num_cpus=0, scheduling_strategy=here)(_Ledger).remote(pool_uri, num_shards, self.print_summary)
        return self._actor

    @property
    def actor(self):
        if self._actor is None:
            raise ValueError("PoolRejects is not bound to a pool yet: pass it to read_pool(..., rejects=...)")
        return self._actor

    def _call(self, method: str, *args):
        import ray

        return ray.get(getattr(self.actor, method).remote(*args))

    def table(self) -> pa.Table:
        """All rejects so far as an Arrow table (shard, key, reason, detail)."""
        rows = self._call("entries")
        columns = list(zip(*rows)) if rows else [[], [], [], []]
        return pa.Table.from_arrays([pa.array(list(c), pa.string()) for c in columns], schema=REJECT_SCHEMA)

    def count(self) -> int:
        return self.table().num_rows

    def counts_by_reason(self) -> dict[str, int]:
        return dict(Counter(self.table().column("reason").to_pylist()))

    def summary(self) -> str:
        return self._call("summary")

    def write(self, path: str) -> str:
        """Write the rejects as a parquet table to ``path`` (local or any fsspec URI); return it."""
        import fsspec
        import pyarrow.parquet as pq

        with fsspec.open(path, "wb") as f:
            pq.write_table(self.table(), f)
        return path


# ----------------------------------------------------------------------------- Ray reading


def shard_files(uri: str) -> list[str]:
    """The tar shards of a pool: ``POOL/shards/*.tar`` (or ``POOL/*.tar``, or ``uri`` itself if a .tar)."""
    fs, root = _fs.resolve(uri)
    try:
        exists = fs.exists(root)
    except Exception as error:
        raise PoolNotReadableError(f"cannot read pool root {uri!r}: {error}") from error
    if not exists:
        raise PoolNotReadableError(f"pool root {uri!r} does not exist; expected a directory with shards/*.tar")
    if root.endswith(".tar") and fs.isfile(root):
        return [_fs.display_path(fs, root)]
    directory = f"{root}/shards" if fs.isdir(f"{root}/shards") else root
    shards = _fs.list_files(fs, directory, ".tar", uri)
    if not shards:
        raise PoolNotReadableError(f"pool root {uri!r} has no .tar shards in {directory!r} (expected POOL/shards/{{:08d}}.tar)")
    return [_fs.display_path(fs, path) for path in shards]


def _flush(shard, rows, rejects, ledger, columns, dedup, done_rows=None) -> pa.Table | None:
    """Send a block's rejects and uid claims to the ledger in one call; return the rows kept.

    ``done_rows``: rows of this shard emitted before this block, when it is the shard's last.
    """
    import ray

    entries = [(shard, key, "read", reason, detail) for key, reason, detail in rejects]
    if entries or (dedup and rows) or done_rows is not None:
        claims = [row["uid"] for row in rows] if dedup else None
        granted = ray.get(ledger.record.remote(shard, [row["key"] for row in rows], claims, entries, done_rows))
        rows = [row for row, ok in zip(rows, granted) if ok]
    if not rows:
        return None
    return pa.table({name: pa.array([row[name] for row in rows], _COLUMN_TYPES[name]) for name in columns})


def _read_one_shard(shard: str, *, ledger, columns, rows_per_block, check_images, dedup) -> Iterator[pa.Table]:
    rows, rejects, total = [], [], 0
    for new_rows, new_rejects in read_shard(shard, check_images, dedup):
        for row in new_rows:
            row["shard"] = shard
        rows += new_rows
        rejects += new_rejects
        if len(rows) >= rows_per_block:
            table = _flush(shard, rows, rejects, ledger, columns, dedup)
            rows, rejects = [], []
            if table is not None:
                total += table.num_rows
                yield table
    table = _flush(shard, rows, rejects, ledger, columns, dedup, done_rows=total)
    if table is not None:
        yield table


def _shards_datasource(shards: list[str], read_args: dict):
    """A Ray Data source with one read task per shard.

    A read operator, not a ``map_batches`` over shard paths: Ray Data fuses consecutive
    ``map_batches`` and gives the fused task the larger ``batch_size`` in *input* rows, so a
    downstream ``map_batches(batch_size=256)`` (preprocessing) would make one task read 256
    shards one after another. Read tasks are never bundled that way: every shard is its own task.
    """
    import functools

    from ray.data.block import BlockMetadata
    from ray.data.datasource import Datasource, ReadTask

    class PoolShardsDatasource(Datasource):
        def get_name(self) -> str:
            return "ReadPoolShards"

        def estimate_inmemory_data_size(self):
            return None

        def get_read_tasks(self, parallelism, per_task_row_limit=None, data_context=None):
            metadata = BlockMetadata(num_rows=None, size_bytes=None, exec_stats=None, input_files=None)
            return [ReadTask(functools.partial(_read_one_shard, shard, **read_args), metadata) for shard in shards]

    return PoolShardsDatasource()


def read_pool(
    uri: str,
    *,
    columns: Sequence[str] | None = None,
    metadata_columns: Sequence[str] | None = None,
    embeddings: bool | str | Iterable[str] | None = None,
    rejects: PoolRejects | None = None,
    check_images: bool = True,
    dedup: bool = True,
    rows_per_block: int = 512,
    join_partitions: int | None = None,
    concurrency: int | None = None,
    shards: Sequence[str] | None = None,
):
    """Read a DataComp pool (local path or fsspec URI) as a streaming ``ray.data.Dataset``.

    ``columns``: pool columns among ``uid, text, image, key, shard, json, image_format``
    (``uid`` always kept); default ``uid, text, image, key, shard``.
    ``metadata_columns`` / ``embeddings``: metadata parquet columns and npz embeddings
    (``b32_img, b32_txt, l14_img, l14_txt`` or True for all) joined in by uid (left join:
    samples without metadata get nulls); a metadata column whose name clashes with a pool
    column is renamed ``metadata_<name>``.
    ``rejects``: a :class:`PoolRejects` to collect skipped samples (see module docstring).
    ``check_images``: parse each image header and reject bytes that are not an image
    (cheap; full decoding happens in preprocessing). ``dedup``: reject repeated uids; the
    ledger then holds one entry per uid (about 200 bytes), fine up to tens of millions of
    samples; for larger pools de-duplicate upstream and pass ``dedup=False``.
    ``rows_per_block``: rows per output block; ``concurrency``: max parallel shard reads.
    ``shards``: read only these tars of the pool (paths as :func:`shard_files` gives them, e.g. the
    shards :func:`raymimic.data.shard_index.locate_uids` found a few uids in); default all.
    """
    import ray

    columns = _pool_columns(columns)
    if shards is not None and not list(shards):
        raise ValueError(f"read_pool({uri!r}, shards=[]): give at least one shard, or None to read them all")
    shards = list(shards) if shards is not None else shard_files(uri)
    rejects = rejects if rejects is not None else PoolRejects()
    ledger = rejects._bind(str(uri), len(shards))
    read_args = {"ledger": ledger, "columns": columns, "rows_per_block": rows_per_block, "check_images": check_images, "dedup": dedup}
    ds = ray.data.read_datasource(_shards_datasource(shards, read_args), concurrency=concurrency, override_num_blocks=len(shards))
    keys = embedding_keys(embeddings)
    if metadata_columns or keys:
        ds = _join_metadata(ds, uri, columns, metadata_columns or [], keys, join_partitions or max(1, min(len(shards), 32)))
    return ds


def _pool_columns(columns: Sequence[str] | None) -> list[str]:
    if columns is None:
        return list(POOL_COLUMNS)
    allowed = POOL_COLUMNS + OPTIONAL_POOL_COLUMNS
    unknown = [c for c in columns if c not in allowed]
    if unknown:
        raise ValueError(f"unknown pool column(s) {unknown}; read_pool offers {list(allowed)} (metadata columns go in metadata_columns=)")
    return list(dict.fromkeys(["uid", *columns]))


def _join_metadata(ds, uri, pool_columns, metadata_columns, keys, num_partitions):
    unknown = [c for c in metadata_columns if c not in METADATA_COLUMNS]
    if unknown:
        raise ValueError(f"unknown metadata column(s) {unknown}; DataComp metadata has {list(METADATA_COLUMNS)}")
    wanted = [c for c in metadata_columns if c != "uid"]
    metadata = read_metadata(uri, columns=wanted, embeddings=keys)
    clashes = {c: f"metadata_{c}" for c in wanted if c in pool_columns}
    if clashes:
        metadata = metadata.rename_columns(clashes)
    return ds.join(metadata, join_type="left_outer", num_partitions=num_partitions, on=("uid",))
