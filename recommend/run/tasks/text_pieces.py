"""What an embedded store's text shard reads of a lists part (recommend/serving/text_shards.py): the
items' ids, their text vectors and their metadata, from the run folder's files.

Kept apart from publish_tasks.py for the import time of the process that writes a text shard with a
graph (recommend/serving/shard_process.py starts a fresh Python for it): this module needs pyarrow and
the payloads, while publish_tasks.py brings in the fit, the index and Dask (about 0.7 s of the 1.3 s a
child took to start on machine C; two of them started at the end of a 10 s publish at 100k x 100k).

Example (one per item part, as collection_points makes them):
    piece = TextPiece(str(run.item_ids), embeddings, part.start, part.start + part.subjects, metadata_rows)
    ids, {"text": vectors}, payloads = piece()
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

from index.rows import RowSource
from recommend.serving.payloads import metadata_payloads

TEXT = "text"  # recommend/serving/publish.py's ITEM_VECTOR


@functools.lru_cache(maxsize=1)
def _item_ids(path: str):
    """The run's item ids column (Arrow, sliced per piece), read once per process."""
    import pyarrow.parquet as pq

    return pq.read_table(path).column(0)


@dataclass(frozen=True)
class TextPiece:
    """Items start..stop of the run: a picklable callable giving (ids, {"text": vectors}, payloads)."""

    item_ids: str            # the run folder's item_ids.parquet
    text: RowSource          # embeddings.parquet as ParquetRows (pickles as its path)
    start: int
    stop: int
    metadata: dict           # column -> the catalog's values for these rows

    def __call__(self) -> tuple[list[str], dict, list[dict]]:
        ids = _item_ids(self.item_ids).slice(self.start, self.stop - self.start).to_pylist()
        return ids, {TEXT: self.text[self.start:self.stop]}, metadata_payloads(ids, self.metadata)
