"""Which shard holds a uid, from img2dataset's per-shard tables, without opening a tar.

img2dataset (and so DataComp's download) writes beside every ``POOL/shards/{:08d}.tar`` a
``{:08d}.parquet`` with one row per sample it tried (``key``, ``uid``, ``status``, ...).
:func:`locate_uids` reads only the ``uid``, ``key`` and ``status`` columns of those small tables
(a few Ray tasks per CPU) and returns where each wanted uid lives, so a reader that needs a few
samples opens only the tars holding them (``read_pool(..., shards=...)``).
"""
from __future__ import annotations

from collections.abc import Iterable

import pandas as pd

from raymimic.data import _fs

INDEX_COLUMNS = ("uid", "shard", "key")


def shard_tables(uri: str) -> list[str]:
    """The per-shard parquet tables of a pool (``POOL/shards/*.parquet``) that have a same-name ``.tar``; [] when there are none."""
    fs, root = _fs.resolve(uri)
    directory = f"{root}/shards"
    try:
        if not fs.isdir(directory):
            return []
    except Exception as error:
        raise _fs.PoolNotReadableError(f"cannot read pool root {uri!r}: {error}") from error
    tars = set(_fs.list_files(fs, directory, ".tar", uri))
    tables = _fs.list_files(fs, directory, ".parquet", uri)
    return [_fs.display_path(fs, path) for path in tables if path[: -len(".parquet")] + ".tar" in tars]


def _locate_in_tables(batch: dict, uids: frozenset) -> pd.DataFrame:
    import fsspec
    import pyarrow.parquet as pq

    found = []
    for path in batch["path"]:
        path = str(path)
        with fsspec.open(path, "rb") as f:
            parquet = pq.ParquetFile(f)
            table = parquet.read(columns=[c for c in ("uid", "key", "status") if c in parquet.schema_arrow.names]).to_pandas()
        if "uid" not in table or "key" not in table:
            continue
        if "status" in table:
            table = table[table["status"] == "success"]
        table = table[table["uid"].isin(uids)]
        found.append(pd.DataFrame({"uid": table["uid"].astype(str), "shard": path[: -len(".parquet")] + ".tar",
                                   "key": table["key"].astype(str)}))
    return pd.concat(found, ignore_index=True) if found else pd.DataFrame({c: pd.Series([], dtype=object) for c in INDEX_COLUMNS})


def locate_uids(uri: str, uids: Iterable[str]) -> pd.DataFrame | None:
    """``uid, shard, key`` of every wanted uid found in the pool's per-shard tables (shard: the tar's path,
    as :func:`raymimic.data.pool.shard_files` writes it); None when the pool has no per-shard tables."""
    import ray

    tables = shard_tables(uri)
    if not tables:
        return None
    # two tasks per CPU, each reading its tables one after another: a table is small, a task costs more than reading one
    tasks = max(1, min(len(tables), 2 * int(ray.cluster_resources().get("CPU", 1))))
    paths = ray.data.from_items([{"path": path} for path in tables], override_num_blocks=tasks)
    found = paths.map_batches(_locate_in_tables, fn_kwargs={"uids": frozenset(uids)}, batch_format="numpy", batch_size=1)
    frame = found.to_pandas()
    if frame.empty:
        return pd.DataFrame({c: pd.Series([], dtype=object) for c in INDEX_COLUMNS})
    return frame[list(INDEX_COLUMNS)].drop_duplicates("uid").sort_values("uid", ignore_index=True)
