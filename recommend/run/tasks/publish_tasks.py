"""The publish's points, a lists part at a time, and where they are uploaded from.

Every part the lists stage wrote (recommend/run/tasks/list_tasks.py: a block of items or of users) becomes
that many Qdrant points, made by `part_points` from the run folder's files:

    items  ids from the item side; vectors "text" (the embeddings), "blend" and "blend_query" (the
           item side); payloads from the item part's arrays and the catalog's metadata columns (sent
           with the task: a block's rows)
    users  ids from the block's users file (embedder/event_blocks.py); the vector "profile" and the
           payloads from the user part's arrays

The same function runs wherever the writing does:
- the embedded default: each shard is a task on a worker that reads its parts (`Points.pieces`: the
  user blocks overlapping its hash range, or a run of item blocks) and writes them with the engine
  (recommend/serving/publish.py, `write_version`);
- with a Qdrant server (`publish.url`) and Dask workers, each part is a task that uploads its points
  from a worker over that worker's own connection, a few per task slot in flight; the driver creates
  the collections, counts what arrived and switches the aliases;
- without workers, the driver streams the parts in order.
No process holds more than a part's payloads. A part uploaded
twice (its worker lost mid-part, Dask runs the task again) writes the same point ids (UUID5 of the
business ids), so the count the driver checks stays right.

The server path was not run against a Qdrant server (none runs on our machines): its tasks were run
against local mode, through a single worker (tests/test_publish_tasks.py).

Example (what the publish stage does):
    source = PointSource(blocks.run, parquet_rows(blocks.run.embeddings))
    items = collection_points(client, source, parts, "item", metadata, sizes["item"], Target(url))
    publish_version(store, run_id, items, users, metadata=meta)
"""

from __future__ import annotations

import functools
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Mapping

import numpy as np

from embedder.event_blocks import block_user_ids
from embedder.run_folder import RunFolder
from embedder.task_window import in_window
from index.rows import RowSource
from recommend.ranking.blend import ItemSide
from recommend.run.tasks.item_tasks import read_item_ids, read_item_side
from recommend.run.tasks.list_tasks import Part
from recommend.run.tasks.text_pieces import TextPiece
from recommend.serving.payloads import item_payloads, user_payloads
from recommend.serving.publish import (BLEND_QUERY_VECTOR, BLEND_VECTOR, ITEM_VECTOR, USER_VECTOR, PointIds, Points,  # noqa: F401
                                      upload, vector_sizes)
from recommend.serving.store import close_clients, open_store, shared_local


@dataclass(frozen=True)
class PointSource:
    """What every part's points are made from (small: it travels with each task)."""

    run: RunFolder    # the item side, the parts, the event blocks (the users' ids)
    text: RowSource   # the items' text vectors: embeddings.parquet as ParquetRows, which pickles as its path


@dataclass(frozen=True)
class Target:
    """Where and how the points are uploaded: from tasks on the workers to a Qdrant server by URL (one
    connection per worker process, its API key from the worker's environment variable `api_key_env`)
    or to a local-mode folder, which takes one writer at a time (a cluster of one single-threaded
    worker); with neither, from this process into the client the store gives."""

    url: str | None = None
    path: str | None = None
    api_key_env: str = "QDRANT_API_KEY"
    batch_size: int = 256  # points per upsert
    parallel: int = 1      # upserts in flight, in this process

    @property
    def from_workers(self) -> bool:
        return bool(self.url or self.path)

    def open(self):
        if self.url:
            return open_store(self.url, self.api_key_env)
        return shared_local(Path(self.path))


_lock = threading.Lock()
_sides: dict[RunFolder, tuple[ItemSide, np.ndarray]] = {}


def _item_side(run: RunFolder) -> tuple[ItemSide, np.ndarray]:
    """The run's item side (memory-mapped) and item ids, read once per process."""
    with _lock:
        if run not in _sides:
            _sides.clear()
            _sides[run] = (read_item_side(run), read_item_ids(run))
        return _sides[run]


def forget_sources() -> None:
    """Drop the item side and ids read for the publish, and close local-mode folders opened by tasks
    (run in the driver and on every worker when the publish ends)."""
    with _lock:
        _sides.clear()
    close_clients(local_only=True)


def part_points(source: PointSource, part: Part, metadata: Mapping[str, list], text: bool = True
                ) -> tuple[list[str], dict[str, np.ndarray], list[dict]]:
    """(business ids, named vectors, payloads) of one part's subjects. `metadata`: the catalog's
    chosen columns for an item part's rows; `text`: with the items' text vectors (a server's item
    points hold them; the embedded store's are in text shards of their own, read by text_pieces.py's `TextPiece`)."""
    side, item_ids = _item_side(source.run)
    with np.load(source.run.part_arrays(part.kind, part.block)) as arrays:
        lists = {name: arrays[name] for name in arrays.files}
    if part.kind == "item":
        rows = np.arange(part.start, part.start + part.subjects, dtype=np.int64)
        subjects = item_ids[rows]
        vectors = {BLEND_VECTOR: side.docs()[rows], BLEND_QUERY_VECTOR: side.raw_queries()[rows]}
        if text:
            vectors[ITEM_VECTOR] = source.text[rows]
        payloads = item_payloads(item_ids, metadata, lists["scores"], lists["ids"], lists["source"],
                                 subjects=subjects)
        return subjects.tolist(), vectors, payloads
    subjects = block_user_ids(source.run, part.block)
    seen = (lists["seen_indptr"], lists["seen_items"]) if "seen_indptr" in lists else None
    payloads = user_payloads(subjects, item_ids, lists["scores"], lists["ids"], lists["source"], seen)
    return subjects, {USER_VECTOR: lists["vectors"]}, payloads


def upload_part(qdrant, name: str, source: PointSource, part: Part, metadata: Mapping[str, list], batch_size: int,
                progress: Callable[[int], None] | None = None, parallel: int = 1) -> int:
    """Upload one part's points into collection `name`; returns how many."""
    ids, vectors, payloads = part_points(source, part, metadata)
    upload(qdrant, name, PointIds(part.kind, ids), vectors, payloads, batch_size, progress, parallel)
    return len(ids)


def upload_part_task(target: Target, name: str, source: PointSource, part: Part, metadata: Mapping[str, list]) -> int:
    """`upload_part` on a worker, over its own connection to `target`."""
    return upload_part(target.open(), name, source, part, metadata, target.batch_size)


def collection_points(client, source: PointSource, parts: list[Part], kind: str, metadata: Mapping[str, object],
                      sizes: dict[str, int], target: Target = Target()) -> Points:
    """The `kind` ("item" or "user") parts' points for `stage_version`: uploaded from tasks on the
    workers of `client` when `target` names a server or folder, else streamed from this process into
    the client the store gives. `metadata`: column -> the catalog's values for every item (pandas Series or
    sequences), sent a part's rows at a time."""
    mine = sorted((p for p in parts if p.kind == kind), key=lambda p: p.block)

    def rows_of(part: Part) -> dict[str, list]:
        if kind != "item":
            return {}
        cut = slice(part.start, part.start + part.subjects)
        return {c: (v.iloc[cut] if hasattr(v, "iloc") else np.asarray(v[cut])).tolist() for c, v in metadata.items()}

    def load(qdrant, name: str, progress: Callable[[int], None] | None) -> None:
        if not target.from_workers or client is None:
            for part in mine:
                upload_part(qdrant, name, source, part, rows_of(part), target.batch_size, progress, target.parallel)
            forget_sources()
            return
        stamp = time.time_ns()

        def submit(i: int):
            part = mine[i]
            return client.submit(upload_part_task, target, name, source, part, rows_of(part), pure=False,
                                 key=f"upload-part-{kind}-{part.block}-{stamp}")

        try:
            for _, written in in_window(client, len(mine), submit):
                if progress:
                    progress(written)
        finally:
            client.run(forget_sources)

    pieces = [functools.partial(part_points, source, part, rows_of(part), False) for part in mine]
    texts = ([TextPiece(str(source.run.item_ids), source.text, p.start, p.start + p.subjects, rows_of(p)) for p in mine]
             if kind == "item" else None)
    in_order = [p.block for p in mine] == list(range(len(mine)))  # user parts are the event blocks, 0..n-1
    return Points(sizes, sum(p.subjects for p in mine), load, pieces, len(mine) if kind == "user" and in_order else None,
                  texts)
