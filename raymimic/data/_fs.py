"""Resolving a pool root (local path or any fsspec URI) and listing its files.

Ray workers run in other processes, so a filesystem must be one they can reach again from
its pickled form: local disks, s3://, gs://, ... do; fsspec's ``memory://`` does not (each
process has its own memory filesystem), so it is refused with an explanation.

S3-compatible stores (MinIO, Ceph, moto, ...): set the standard ``AWS_ENDPOINT_URL`` (or
``AWS_ENDPOINT_URL_S3``) variable. s3fs reads it through botocore (>= 1.31.57), and pyarrow's
``FileSystem.from_uri``, which Ray Data's ``read_parquet``/``write_parquet`` and Ray Train's
``storage_path`` use, reads it too, so no endpoint is passed anywhere. Every process that
opens the store needs it in its environment: Ray workers inherit the driver's environment
when the driver starts Ray; on a cluster set it on the nodes or in the job's ``runtime_env``.
"""
from __future__ import annotations

import fsspec

PROCESS_LOCAL_PROTOCOLS = {"memory"}


class PoolNotReadableError(FileNotFoundError):
    """The pool root (or a required part of it) cannot be listed or read."""


def resolve(uri: str) -> tuple[fsspec.AbstractFileSystem, str]:
    """Return ``(filesystem, path)`` for ``uri``; raise a clear error if the protocol is unusable."""
    try:
        fs, path = fsspec.core.url_to_fs(str(uri))
    except ImportError as error:  # the protocol's fsspec package (s3fs, gcsfs, ...) is not installed
        hint = " (pip install 'raymimic[s3]')" if str(uri).startswith(("s3://", "s3a://")) else ""
        raise PoolNotReadableError(f"cannot open pool root {uri!r}: {error}{hint}") from error
    except ValueError as error:
        raise PoolNotReadableError(f"cannot open pool root {uri!r}: {error}") from error
    protocols = fs.protocol if isinstance(fs.protocol, (tuple, list)) else (fs.protocol,)
    if PROCESS_LOCAL_PROTOCOLS.intersection(protocols):
        raise PoolNotReadableError(
            f"pool root {uri!r} is on fsspec's process-local memory filesystem, which Ray "
            "workers cannot see; use a local path, file://, s3://, gs:// or another shared store"
        )
    return fs, path.rstrip("/")


def list_files(fs: fsspec.AbstractFileSystem, directory: str, suffix: str, uri: str) -> list[str]:
    """Sorted files directly in ``directory`` ending in ``suffix``; error naming ``uri`` if unreadable."""
    try:
        if not fs.isdir(directory):
            raise PoolNotReadableError(f"{uri!r}: directory {directory!r} does not exist or is not a directory")
        entries = fs.ls(directory, detail=False)
    except PoolNotReadableError:
        raise
    except Exception as error:  # any backend error (permissions, network) means the same here
        raise PoolNotReadableError(f"cannot list {directory!r} of pool {uri!r}: {error}") from error
    return sorted(entry for entry in entries if entry.endswith(suffix))


def display_path(fs: fsspec.AbstractFileSystem, path: str) -> str:
    """A path with its protocol, as a user would write it (for messages and reject tables)."""
    return fs.unstrip_protocol(path)
