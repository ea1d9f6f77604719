"""Run artifacts on disk: Parquet written to a temporary name and renamed, vectors as fixed-size lists."""

from __future__ import annotations

import json
import os
import uuid
from pathlib import Path
from typing import Iterable

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq


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
    """Write to `<path>.<random>.tmp`, then rename: a crash never leaves a half file that looks whole."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{path.name}.{uuid.uuid4().hex[:8]}.tmp")
    pq.write_table(table, tmp)
    os.replace(tmp, path)
    return path


def write_parquet_blocks(tables: Iterable[pa.Table], path: Path | str) -> Path:
    """Like `write_parquet`, for a table made a block at a time: each block is written as it comes
    (all blocks share the first one's schema), so the whole table is never in memory."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{path.name}.{uuid.uuid4().hex[:8]}.tmp")
    writer = None
    try:
        for table in tables:
            if writer is None:
                writer = pq.ParquetWriter(tmp, table.schema)
            writer.write_table(table.cast(writer.schema))
    finally:
        if writer is not None:
            writer.close()
    if writer is None:
        raise ValueError(f"{path}: no blocks to write")
    os.replace(tmp, path)
    return path


def write_json(data: dict, path: Path | str) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{path.name}.{uuid.uuid4().hex[:8]}.tmp")
    tmp.write_text(json.dumps(data, indent=2, default=str) + "\n")
    os.replace(tmp, path)
    return path
