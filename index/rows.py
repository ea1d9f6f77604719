"""Row sources: what the index stage reads item vectors and queries from.

A row source is an (n, d) float matrix read a block of rows at a time: a numpy array, or `Rows`,
whose rows are computed on demand and never held whole (a million users' blended vectors would be
gigabytes as one array). Everything in index/ that takes vectors or queries takes a row source.

Example:
    rows = Rows(1_000_000, 64, lambda idx: make_vectors(idx))   # make_vectors(idx) -> (len(idx), 64)
    rows[0:4096]            # a block, computed now
    rows.take(picked)[:10]  # a lazy view of some rows
"""

from __future__ import annotations

from typing import Callable, Protocol

import numpy as np


class RowSource(Protocol):
    """An (n, d) matrix read by rows: `len`, `.shape`, and `[slice]` or `[integer array]` give arrays."""

    shape: tuple[int, int]

    def __len__(self) -> int: ...

    def __getitem__(self, key) -> np.ndarray: ...


class Rows:
    """A `RowSource` whose rows are `compute(row_indices)`: `rows[i]`, `rows[a:b]`, `rows[index_array]`
    and `rows[bool_mask]` work as on an array; `len` and `.shape` too."""

    def __init__(self, n: int, d: int, compute: Callable[[np.ndarray], np.ndarray]):
        self.shape, self._compute = (n, d), compute

    def __len__(self) -> int:
        return self.shape[0]

    def __getitem__(self, key) -> np.ndarray:
        if isinstance(key, (int, np.integer)):
            return self._compute(np.array([key], dtype=np.int64))[0]
        if isinstance(key, slice):
            return self._compute(np.arange(*key.indices(self.shape[0]), dtype=np.int64))
        key = np.asarray(key)
        return self._compute(np.flatnonzero(key) if key.dtype == bool else key.astype(np.int64))

    def take(self, rows: np.ndarray) -> "Rows":
        """A lazy view of some rows, in the given order."""
        rows = np.asarray(rows, dtype=np.int64)
        return Rows(len(rows), self.shape[1], lambda idx: self._compute(rows[idx]))


def take_rows(x: RowSource, rows: np.ndarray) -> RowSource:
    """`x[rows]`, lazily when `x` is a `Rows`."""
    return x.take(rows) if isinstance(x, Rows) else x[rows]


class ParquetRows(Rows):
    """The fixed-size-list `column` of a Parquet file as a row source, read a row group at a time (the
    last one read is kept): the run's embeddings.parquet, written in blocks, without holding it whole.
    `dtype`: of the rows given (default: as stored, e.g. float16). It pickles as its path, so a task
    sent to a worker takes the file, not its rows (the worker reads it from the shared run folder)."""

    def __init__(self, path, column: str = "vector", dtype=None):
        import pyarrow.parquet as pq

        self.path, self.column, self.dtype = str(path), column, dtype
        self._file = pq.ParquetFile(self.path)
        meta = self._file.metadata
        sizes = [meta.row_group(g).num_rows for g in range(meta.num_row_groups)]
        self._starts = np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64)
        field = self._file.schema_arrow.field(column).type
        self._size, self._dtype = int(field.list_size), np.dtype(dtype or field.value_type.to_pandas_dtype())
        self._last: dict[int, np.ndarray] = {}
        super().__init__(int(self._starts[-1]), self._size, self._rows)

    def __reduce__(self):
        return ParquetRows, (self.path, self.column, self.dtype)

    def _rows(self, idx: np.ndarray) -> np.ndarray:
        from embedder.artifacts import arrow_to_vectors

        out = np.empty((len(idx), self._size), dtype=self._dtype)
        which = np.searchsorted(self._starts, idx, side="right") - 1
        for g in np.unique(which):
            if g not in self._last:
                self._last.clear()
                column = self._file.read_row_group(int(g), columns=[self.column]).column(0)
                self._last[g] = arrow_to_vectors(column, self._dtype)
            here = which == g
            out[here] = self._last[g][idx[here] - self._starts[g]]
        return out


def parquet_rows(path, column: str = "vector", dtype=None) -> ParquetRows:
    """`ParquetRows(path, column, dtype)`."""
    return ParquetRows(path, column, dtype)
