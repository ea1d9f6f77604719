"""A run's embeddings.parquet, made from the embedding cache on a worker (`write_embeddings`).

The encode leaves every item's vector in the cache; one task reads them back into the file in item
order, so that no vector comes to the driver. Its cost is reading every bucket of the cache and
writing the file: the keys are matched by Arrow (no Python string or dict per item) and a few buckets
are read at once by threads of the task (reading and checking a file mostly releases the GIL).
"""

from __future__ import annotations

from collections import deque
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from embedder.artifacts import arrow_to_vectors, vectors_to_arrow, write_parquet_blocks
from embedder.cache import STORED_DTYPE, EmbeddingCache, arrow_strings, bucket_rows
from embedder.errors import StorageError

EMBEDDINGS_BLOCK = 65_536  # rows per row group of embeddings.parquet (readers read one at a time)
READ_THREADS = 4  # cache buckets read at once (each held until its rows are placed: memory stays a few buckets)


def write_embeddings(out: str, item_ids, keys, cache_root: str) -> None:
    """embeddings.parquet (`item_id`, `content_hash`, `vector`; rows in item order) from the cache,
    where every key is after the encode (run as one task on a worker: the items x dim array is made
    there, READ_THREADS buckets of the cache read at a time). A key the cache no longer holds (a file
    damaged since the encode) stops the run, naming the bucket: nothing half-made is written."""
    cache = EmbeddingCache(cache_root)
    item_ids = arrow_strings(item_ids).cast(pa.string())  # arrays or Arrow arrays
    keys = arrow_strings(keys).cast(pa.string())
    keys = keys.combine_chunks() if isinstance(keys, pa.ChunkedArray) else keys

    def read(group: tuple[str, np.ndarray]):
        bucket, rows = group
        wanted = keys.take(rows)
        table, set_aside = cache.lookup_bucket(bucket, pc.unique(wanted))
        return bucket, rows, table, _last_index_in(wanted, table), set_aside

    vectors = None
    for bucket, rows, table, at, set_aside in _in_threads(read, bucket_rows(keys), READ_THREADS):
        if (at < 0).any() or set_aside:
            raise StorageError(f"embedding cache {cache_root}, bucket {bucket}: {int((at < 0).sum())} vector(s) this run "
                               f"encoded or found are gone{' (' + '; '.join(set_aside) + ')' if set_aside else ''}; "
                               "run the refresh again: they are encoded anew")
        got = arrow_to_vectors(table["vector"], STORED_DTYPE)
        if vectors is None:
            vectors = np.empty((len(keys), got.shape[1]), dtype=STORED_DTYPE)
        vectors[rows] = got[at]
    if vectors is None:
        raise StorageError(f"embedding cache {cache_root}: no vectors for the {len(keys)} items")
    write_parquet_blocks((pa.table({"item_id": item_ids[i:i + EMBEDDINGS_BLOCK], "content_hash": keys[i:i + EMBEDDINGS_BLOCK],
                                    "vector": vectors_to_arrow(vectors[i:i + EMBEDDINGS_BLOCK])})
                          for i in range(0, len(keys), EMBEDDINGS_BLOCK)), out)


def _in_threads(fn, items: list, threads: int):
    """fn(item) for each item, yielded in order, at most `threads` running or done and not yet taken
    (a pool's map would read every bucket ahead and hold them all)."""
    with ThreadPoolExecutor(threads) as pool:
        pending = deque(pool.submit(fn, item) for item in items[:threads])
        for item in items[threads:]:
            result = pending.popleft().result()
            pending.append(pool.submit(fn, item))
            yield result
        while pending:
            yield pending.popleft().result()


def _last_index_in(wanted: pa.Array, table: pa.Table | None) -> np.ndarray:
    """Each wanted key's row in `table` (-1: not there); a key in several rows (a compaction cut short
    leaves duplicates) gets its last, as a dict built from the rows did."""
    if table is None:
        return np.full(len(wanted), -1, dtype=np.int64)
    held = table["content_hash"].combine_chunks().cast(pa.string())
    backwards = pc.index_in(wanted, value_set=held.take(np.arange(len(held) - 1, -1, -1)))  # the first from the end
    at = backwards.fill_null(-1).to_numpy(zero_copy_only=False).astype(np.int64)
    return np.where(at >= 0, len(held) - 1 - at, -1)
