"""DataComp pool metadata as a Ray Dataset.

A DataComp pool keeps its metadata beside the shards::

    POOL/metadata/{:08d}.parquet   uid, url, text, original_width, original_height,
                                   clip_b32_similarity_score, clip_l14_similarity_score,
                                   face_bboxes, sha256
    POOL/metadata/{:08d}.npz       b32_img, b32_txt, l14_img, l14_txt  (row order of the parquet)

``read_metadata`` reads one parquet file (and, when embeddings are asked for, its npz) per
Ray task, so the metadata is never gathered in the driver. Embedding columns are fixed-shape
tensor columns (``float16``, one vector per row), which ``iter_batches(batch_format="numpy")``
hands out as 2-D arrays.
"""
from __future__ import annotations

import io
from collections.abc import Iterable, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from raymimic.data import _fs

METADATA_COLUMNS = (
    "uid",
    "url",
    "text",
    "original_width",
    "original_height",
    "clip_b32_similarity_score",
    "clip_l14_similarity_score",
    "face_bboxes",
    "sha256",
)
EMBEDDING_KEYS = ("b32_img", "b32_txt", "l14_img", "l14_txt")


def embedding_keys(embeddings: bool | str | Iterable[str] | None) -> list[str]:
    """Normalise the ``embeddings`` argument: None/False -> [], True -> all four, names -> checked list."""
    if embeddings is None or embeddings is False:
        return []
    if embeddings is True:
        return list(EMBEDDING_KEYS)
    keys = [embeddings] if isinstance(embeddings, str) else list(embeddings)
    unknown = [key for key in keys if key not in EMBEDDING_KEYS]
    if unknown:
        raise ValueError(f"unknown embedding(s) {unknown}; DataComp's npz files hold {list(EMBEDDING_KEYS)}")
    return keys


def metadata_files(pool_uri: str) -> list[str]:
    """The metadata parquet files of a pool, sorted, with their protocol (e.g. ``s3://...``)."""
    fs, root = _fs.resolve(pool_uri)
    files = _fs.list_files(fs, f"{root}/metadata", ".parquet", pool_uri)
    if not files:
        raise _fs.PoolNotReadableError(f"pool {pool_uri!r} has no metadata/*.parquet files")
    return [_fs.display_path(fs, path) for path in files]


def read_metadata_file(path: str, columns: Sequence[str] | None = None, embeddings: Sequence[str] = ()) -> pa.Table:
    """One metadata parquet file (plus its npz embeddings) as an Arrow table; plain, no Ray."""
    import fsspec
    from ray.data.extensions import ArrowTensorArray

    with fsspec.open(path, "rb") as f:
        table = pq.read_table(f, columns=list(columns) if columns is not None else None)
    if embeddings:
        npz_path = path[: -len(".parquet")] + ".npz"
        try:
            with fsspec.open(npz_path, "rb") as f:
                arrays = np.load(io.BytesIO(f.read()), allow_pickle=False)
                for key in embeddings:
                    if key not in arrays.files:
                        raise ValueError(f"{npz_path} has no array {key!r} (it has {arrays.files})")
                    vectors = arrays[key]
                    if len(vectors) != table.num_rows:
                        raise ValueError(
                            f"{npz_path}: {key} has {len(vectors)} rows but {path} has {table.num_rows}; "
                            "the npz must hold one vector per parquet row, in row order"
                        )
                    table = table.append_column(key, ArrowTensorArray.from_numpy(np.ascontiguousarray(vectors)))
        except FileNotFoundError as error:
            raise FileNotFoundError(f"embeddings {list(embeddings)} asked for but {npz_path} is missing") from error
    return table


def _read_batch_of_files(batch: dict, columns, embeddings) -> pa.Table:
    tables = [read_metadata_file(str(path), columns, embeddings) for path in batch["path"]]
    return pa.concat_tables(tables) if len(tables) > 1 else tables[0]


def read_metadata(
    pool_uri: str,
    columns: Sequence[str] | None = None,
    embeddings: bool | str | Iterable[str] | None = None,
):
    """Read ``POOL/metadata/*.parquet`` as a ``ray.data.Dataset``.

    ``columns``: metadata columns to keep (``uid`` is always kept); None keeps all.
    ``embeddings``: True for all of ``b32_img, b32_txt, l14_img, l14_txt``, or a list of them,
    read from each parquet file's same-name ``.npz`` and added as tensor columns.
    """
    import ray

    keys = embedding_keys(embeddings)
    if columns is not None:
        columns = list(dict.fromkeys(["uid", *columns]))
    files = metadata_files(pool_uri)
    # one block (and so one read task) per metadata file: files are the unit of parallelism
    paths = ray.data.from_items([{"path": path} for path in files], override_num_blocks=len(files))
    return paths.map_batches(
        _read_batch_of_files,
        batch_size=1,
        batch_format="numpy",
        fn_kwargs={"columns": columns, "embeddings": keys},
    )
