"""The embedding cache: content hash -> vector, shared by every run and every worker.

Key = xxh3-128(model fingerprint, preprocessing version, normalised text), so an unchanged text under
an unchanged model is never encoded twice, and a changed model reuses nothing. Vectors are stored as
float16 (see STORED_DTYPE). The cache is a Parquet dataset at a local path or fsspec URL,
partitioned by the key's first hex digit (``<root>/bucket=<h>/part-<id>.parquet``): a lookup reads
only the buckets its keys fall in, one at a time.
"""

from __future__ import annotations

import uuid

import fsspec
import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import xxhash

from embedder.artifacts import arrow_to_vectors, atomic_path, vectors_to_arrow
from embedder.errors import InputError
from embedder.text import PREPROCESSING_VERSION

BUCKET_CHARS = 1  # 16 buckets; a bucket is one unit of lookup work
# Vectors are stored in float16: half the bytes of float32; for unit vectors the rounding error is
# below 1e-3 per component and the cosine to the float32 vector above 0.99999. Reads give float32.
STORED_DTYPE = np.float16


def content_hash(model_fingerprint: str, text: str) -> str:
    """The cache key of one normalised text under one model."""
    return xxhash.xxh3_128_hexdigest(f"{model_fingerprint}\0{PREPROCESSING_VERSION}\0{text}".encode())


def content_hashes(model_fingerprint: str, texts) -> pd.Series:
    return pd.Series([content_hash(model_fingerprint, t) for t in texts], dtype=object)


def _lookup_bucket(root: str, bucket: str, keys: list[str]) -> pa.Table | None:
    """One bucket's share of a lookup, run on a Dask worker."""
    return EmbeddingCache(root).lookup_bucket(bucket, keys)


class EmbeddingCache:
    """Vectors by content hash under `root` (a path or fsspec URL).

    Example:
        cache = EmbeddingCache(".recs/cache")
        found = cache.lookup(["3f2a...", ...])   # {hash: vector} for the hashes present
        cache.add(hashes, vectors)
    """

    def __init__(self, root: str):
        self.root = str(root).rstrip("/")
        try:
            self.fs, self.base = fsspec.core.url_to_fs(self.root)
        except (ImportError, ValueError) as exc:
            raise InputError(f"embed.cache: cannot use {self.root!r}: {exc}") from None

    def _bucket_dir(self, bucket: str) -> str:
        return f"{self.base}/bucket={bucket}"

    def lookup(self, hashes, client=None) -> dict[str, np.ndarray]:
        """Vectors for the given hashes that the cache holds; absent hashes are simply missing.

        A partition-wise join: each bucket is read by one task that keeps only the wanted rows, so no
        process ever holds the whole cache. With a Dask `client` the buckets are read on its workers
        in parallel, and only the matches travel back."""
        wanted = pd.Series(list(hashes), dtype=object).drop_duplicates()
        groups = [(bucket, keys.tolist()) for bucket, keys in wanted.groupby(wanted.str[:BUCKET_CHARS])]
        if client is not None and len(groups) > 1:
            futures = client.map(_lookup_bucket, [self.root] * len(groups), [b for b, _ in groups], [k for _, k in groups],
                                 pure=False)
            tables = client.gather(futures)
        else:
            tables = [self.lookup_bucket(bucket, keys) for bucket, keys in groups]
        found: dict[str, np.ndarray] = {}
        for table in tables:
            if table is not None and table.num_rows:
                found.update(zip(table["content_hash"].to_pylist(), arrow_to_vectors(table["vector"], STORED_DTYPE)))
        return found

    def lookup_bucket(self, bucket: str, keys: list[str]) -> pa.Table | None:
        """The rows of one bucket whose content hash is in `keys`."""
        return self._read_bucket(bucket, pa.array(keys, pa.string()))

    def _read_bucket(self, bucket: str, keys: pa.Array) -> pa.Table | None:
        directory = self._bucket_dir(bucket)
        if not self.fs.exists(directory):
            return None
        parts = []
        for path in sorted(self.fs.glob(f"{directory}/*.parquet")):
            with self.fs.open(path, "rb") as fh:
                table = pq.read_table(fh)
            parts.append(table.filter(pc.is_in(table["content_hash"], value_set=keys)))
        return pa.concat_tables(parts) if parts else None

    def add(self, hashes, vectors: np.ndarray, rows: np.ndarray | None = None) -> int:
        """Store new vectors (one file per touched bucket, written whole then renamed). Returns the count.
        The vector of hashes[i] is vectors[i], or vectors[rows[i]] when `rows` is given."""
        hashes = pd.Series(list(hashes), dtype=object)
        if len(hashes) == 0:
            return 0
        token = uuid.uuid4().hex
        for bucket, idx in hashes.groupby(hashes.str[:BUCKET_CHARS]).groups.items():
            idx = np.asarray(idx)
            table = pa.table({"content_hash": pa.array(hashes.iloc[idx].tolist(), pa.string()),
                              "vector": vectors_to_arrow(vectors[idx if rows is None else rows[idx]].astype(STORED_DTYPE))})
            with atomic_path(f"{self._bucket_dir(bucket)}/part-{token}.parquet", self.fs) as tmp, \
                    self.fs.open(tmp, "wb") as fh:
                pq.write_table(table, fh)
        return len(hashes)

    def size(self) -> int:
        """Number of cached vectors (reads only Parquet footers)."""
        total = 0
        for path in self.fs.glob(f"{self.base}/bucket=*/*.parquet"):
            with self.fs.open(path, "rb") as fh:
                total += pq.ParquetFile(fh).metadata.num_rows
        return total
