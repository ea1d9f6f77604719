"""Files a run writes: each one whole or not at all (`atomic_path`), vectors as fixed-size lists."""

from __future__ import annotations

import errno
import json
import os
import uuid
from contextlib import contextmanager
from pathlib import Path
from typing import Iterable, Iterator

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import xxhash

from embedder.errors import StorageError


@contextmanager
def atomic_path(path: Path | str, fs=None, *, durable: bool = False) -> Iterator[str]:
    """A temporary name beside `path` to write to; renamed to `path` when the block ends without an
    error, removed when it raises. A crash never leaves a half file under the real name.

    `fs`: an fsspec filesystem for a path that is not local (the embedding cache at a URL).
    `durable` (local files): the file is synced before the rename and its folder after, so that a
    power cut leaves the old file or the new one (the store's markers and live pointer).

    Example:
        with atomic_path("run/index.faiss") as tmp:
            faiss.write_index(index, tmp)
    """
    path = str(path)
    head, _, name = path.rpartition("/")
    tmp = f"{head}/.{name}.{uuid.uuid4().hex[:8]}.tmp" if head else f".{name}.{uuid.uuid4().hex[:8]}.tmp"
    if fs is None:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
    else:
        fs.makedirs(head, exist_ok=True)
    try:
        yield tmp
        if fs is None:
            if durable:
                _sync(tmp)
            os.replace(tmp, path)
            if durable:
                _sync(Path(path).parent)
        else:
            fs.mv(tmp, path)
    except BaseException as exc:
        try:
            if fs is None:
                Path(tmp).unlink(missing_ok=True)
            elif fs.exists(tmp):
                fs.rm(tmp)
        except OSError:
            pass  # the original error is the one to report
        problem = storage_problem(exc)
        if problem:
            raise StorageError(f"cannot write {path}: {problem}; nothing was left half-written") from exc
        raise


def file_digest(path: Path | str) -> str:
    """xxh3-128 of a file's bytes, read in blocks: what a manifest records, so that damage is found."""
    h = xxhash.xxh3_128()
    with open(path, "rb") as fh:
        while block := fh.read(1 << 22):
            h.update(block)
    return f"xxh3-128:{h.hexdigest()}"


_STORAGE_ERRNOS = {errno.ENOSPC: "no space left on the device", errno.EDQUOT: "disk quota exceeded",
                   errno.EACCES: "permission denied", errno.EPERM: "operation not permitted",
                   errno.EROFS: "read-only file system", errno.EIO: "input/output error (a failing device?)"}


def storage_problem(exc: BaseException) -> str | None:
    """What a failed write says about the storage, in words, or None when it is some other error.
    pyarrow raises OSError with an errno; faiss a RuntimeError whose text carries the system's."""
    if isinstance(exc, OSError) and exc.errno in _STORAGE_ERRNOS:
        return _STORAGE_ERRNOS[exc.errno]
    if isinstance(exc, (OSError, RuntimeError)):
        text = str(exc)
        for code, words in _STORAGE_ERRNOS.items():
            if os.strerror(code) in text:
                return words
    return None


def vectors_to_arrow(vectors: np.ndarray) -> pa.FixedSizeListArray:
    """(n, d) float array -> Arrow fixed_size_list<d> (keeps float32/float16)."""
    vectors = np.ascontiguousarray(vectors)
    return pa.FixedSizeListArray.from_arrays(pa.array(vectors.reshape(-1)), vectors.shape[1])


def arrow_to_vectors(column, dtype=np.float32) -> np.ndarray:
    """Arrow fixed_size_list column -> (n, d) numpy array of `dtype`."""
    column = column.combine_chunks() if isinstance(column, pa.ChunkedArray) else column
    if len(column) == 0:
        return np.zeros((0, column.type.list_size), dtype=dtype)
    flat = column.flatten().to_numpy(zero_copy_only=False)
    return flat.reshape(len(column), column.type.list_size).astype(dtype, copy=False)


def write_parquet(table: pa.Table, path: Path | str) -> Path:
    """The table as one Parquet file, written whole or not at all."""
    with atomic_path(path) as tmp:
        columns = dictionary_columns(table.schema)
        pq.write_table(table, tmp, use_dictionary=columns, write_statistics=columns)
    return Path(path)


def dictionary_columns(schema: pa.Schema) -> list[str]:
    """The columns worth dictionary-encoding, and worth min/max statistics: all but lists (vectors).
    Vector elements rarely repeat, so a dictionary saves no space on them, and decoding a
    dictionary-encoded float16 vector column is slower than a plain one of the same size on disk
    (docs/performance.md). No reader uses the min and max of vector elements, and making them took
    half the time of writing a block of embeddings.parquet (65,536 x 384 float16: 579 -> 289 ms)."""
    return [f.name for f in schema if not (pa.types.is_list(f.type) or pa.types.is_fixed_size_list(f.type)
                                            or pa.types.is_large_list(f.type))]


def write_parquet_blocks(tables: Iterable[pa.Table], path: Path | str) -> Path:
    """Like `write_parquet`, for a table made a block at a time: each block is written as it comes
    (all blocks share the first one's schema), so the whole table is never in memory."""
    with atomic_path(path) as tmp:
        writer = None
        try:
            for table in tables:
                if writer is None:
                    columns = dictionary_columns(table.schema)
                    writer = pq.ParquetWriter(tmp, table.schema, use_dictionary=columns, write_statistics=columns)
                writer.write_table(table.cast(writer.schema))
        finally:
            if writer is not None:
                writer.close()
        if writer is None:
            raise ValueError(f"{path}: no blocks to write")
    return Path(path)


def write_json(data, path: Path | str, *, durable: bool = False) -> Path:
    """`data` (a dict, or a pydantic model) as indented JSON, written whole or not at all (`atomic_path`)."""
    text = data.model_dump_json(indent=2) if hasattr(data, "model_dump_json") else json.dumps(data, indent=2, default=str)
    return write_text(text + "\n", path, durable=durable)


def write_text(text: str, path: Path | str, *, durable: bool = False) -> Path:
    with atomic_path(path, durable=durable) as tmp:
        Path(tmp).write_text(text)
    return Path(path)


def _sync(path: Path | str) -> None:
    """fsync a file or a folder (its entries: a rename in it)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
