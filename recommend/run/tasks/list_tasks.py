"""The lists stage's work on the Dask workers: blocks of items and blocks of users, each writing its part.

A worker built the index and the item side once (items x a few dozen dimensions) and saved both in
the run folder (recommend/run/tasks/item_tasks.py); each worker process loads them once, as it loads the
model, and then takes blocks:

- a block of items: their similar items;
- a block of users (an event block ingest wrote, embedder/event_blocks.py): their vectors, from
  their own events read from the block's file, and their recommended items (seen ones excluded,
  popularity and new-item fills).

Each block writes two files, whole or not at all, and returns a `Part` (their digests and counts):

    lists.parquet/<kind>-<block>.parquet   its lists in long format (one row per subject and rank)
    parts/<kind>-<block>.npz               the same as arrays (scores, ids, source; users: their vectors)

The publish makes its points from the `.npz` parts, a part at a time (recommend/run/tasks/publish_tasks.py).
Every list depends on its own row only, so the lists are those of the whole run computed in one
process (tests/test_list_tasks.py checks it).
Without a client the blocks run one after another in this process.

Example (what the lists stage does):
    save_item_side(blocks.run, space.items, item_ids)   # recommend/run/tasks/item_tasks.py
    parts = list_blocks(client, len(item_ids), blocks, settings, ListJob(k=10), sample=rows)
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field
from typing import Callable, Iterator

import numpy as np
import pyarrow as pa

from embedder.artifacts import atomic_path, file_digest, write_parquet
from embedder.task_window import in_window
from index.build import load_index
from index.search import flat_vectors
from index.rows import Rows, take_rows
from embedder.event_blocks import Blocks
from embedder.run_folder import RunFolder
from recommend.ranking.blend import ItemSide, user_block_vectors
from recommend.ranking.lists import LIST_SCHEMA, Candidates, labels, lists_frame, recommended_items, similar_items
from recommend.ranking.settings import RankingSettings
from recommend.run.tasks.item_tasks import read_item_ids, read_item_side
from recommend.run.tasks.user_tasks import load_user_block

BLOCK = 8192  # items or users per task by default: lists.block_size (Spark's ALS recommendForAll cuts 4096)


@dataclass(frozen=True)
class ListJob:
    """What every block is asked for."""

    k: int
    new_slots: int = 0     # blend.new_item_slots
    new_boost: float = 1.0  # blend.new_item_boost
    keep: int | None = None  # lists.keep: entries stored when more than k

    @property
    def depth(self) -> int:
        """The entries each list is searched and stored to (its first k are the answer's)."""
        return max(self.k, self.keep or self.k)


@dataclass
class Part:
    """What a block wrote and found; the driver keeps these, not the lists."""

    kind: str                # "item" or "user"
    block: int
    start: int               # its subjects are rows start..start+subjects-1 of the items or the users
    subjects: int
    files: dict[str, str]    # path in the run folder -> digest
    short_of_k: int = 0      # subjects with fewer than min(k, items) items listed
    new_items_listed: int = 0  # places held by items with no events
    seconds: float = 0.0     # the block's time on its worker
    sample_ids: np.ndarray | None = field(default=None, repr=False)  # item blocks: the listed ids of the sampled rows


@dataclass
class Loaded:
    """One run's item side and index, as a worker process holds them."""

    items: ItemSide
    item_ids: np.ndarray
    index: object
    docs: Rows | np.ndarray
    queries: Rows
    popular_order: np.ndarray
    new_items: np.ndarray


_loaded: dict[RunFolder, Loaded] = {}
_loading = threading.Lock()


def load_item_side(run: RunFolder) -> Loaded:
    """The run's item side (arrays memory-mapped: workers on one host share the pages) and index,
    loaded once per process and kept for the next block; a new run's replaces the last one."""
    with _loading:
        if run not in _loaded:
            _loaded.clear()
            items, item_ids = read_item_side(run), read_item_ids(run)
            index = load_index(run.index, mmap=True)  # one copy per host, in the page cache
            stored = flat_vectors(index)  # an exact index holds the documents as they are: no need to recompute them
            _loaded[run] = Loaded(items, item_ids, index, items.docs() if stored is None else stored, items.queries(),
                                      np.argsort(-np.asarray(items.popularity), kind="stable"),
                                      np.flatnonzero(~np.asarray(items.warm)))
        return _loaded[run]


def forget_item_side() -> None:
    """Drop the loaded item side and index (run on every worker when the stage ends: a long-lived
    worker of an external cluster does not keep last night's index until tomorrow's)."""
    with _loading:
        _loaded.clear()


def _write_part(run: RunFolder, kind: str, block: int, subject_ids, found: tuple[np.ndarray, np.ndarray, np.ndarray],
                item_ids: np.ndarray, vectors: np.ndarray | None = None, seen=None) -> dict[str, str]:
    """A block's two files; `found`: its (scores, ids, source); `seen`: the users' seen items (a CSR
    matrix of users x items), kept for the published payloads."""
    scores, ids, source = found
    lists = run.list_part(kind, block)
    frame = lists_frame(kind, subject_ids, scores, ids, item_ids, source)
    write_parquet(pa.Table.from_pandas(frame, schema=LIST_SCHEMA, preserve_index=False), lists)
    arrays = {"scores": scores, "ids": ids, "source": np.asarray(source, dtype=str)}
    if vectors is not None:
        arrays["vectors"] = vectors
    if seen is not None:
        arrays["seen_indptr"], arrays["seen_items"] = seen.indptr, seen.indices
    part = run.part_arrays(kind, block)
    with atomic_path(part) as tmp:
        with open(tmp, "wb") as fh:
            np.savez(fh, **arrays)
    return {run.relative(path): file_digest(path) for path in (lists, part)}


def item_block(run: RunFolder, block: int, start: int, stop: int, job: ListJob, sample: np.ndarray) -> Part:
    """Similar items for items start..stop-1 (run on a worker). `sample`: item rows whose listed ids
    come back in the Part, for the item lists' recall against exact search."""
    started = time.perf_counter()
    side = load_item_side(run)
    rows = np.arange(start, stop, dtype=np.int64)
    scores, ids, filled = similar_items(side.index, take_rows(side.queries, rows), job.depth, np.asarray(side.items.popularity),
                                        item_vectors=side.docs, rows=rows, popular_order=side.popular_order)
    warm = np.asarray(side.items.warm[rows])
    source = labels(np.where(filled, "similar+popular", np.where(warm, "similar", "similar-from-text")))
    files = _write_part(run, "item", block, side.item_ids[rows], (scores, ids, source), side.item_ids)
    return Part("item", block, start, len(rows), files, sample_ids=ids[np.isin(rows, sample), :job.k],
                seconds=time.perf_counter() - started)


def user_block(run: RunFolder, block: int, start: int, job: ListJob, n_items: int, settings: RankingSettings,
               now) -> Part:
    """Vectors and recommended items for the users of one event block (rows start.. of the users),
    their interactions read from the block's file (run on a worker)."""
    started = time.perf_counter()
    side = load_item_side(run)
    user_ids, rows = load_user_block(run, block, n_items, settings, now)
    vectors = user_block_vectors(rows, side.items)
    n_history = rows.n_history
    candidates = Candidates(side.docs, np.asarray(side.items.popularity), side.popular_order, side.new_items, job.new_slots,
                            job.new_boost)
    scores, ids, source = recommended_items(side.index, vectors, n_history > 0, rows.binary, job.depth, candidates,
                                            head=job.k)
    source = labels(np.where((source == "history") & (n_history < side.items.layout.few_events), "few-events", source))
    files = _write_part(run, "user", block, user_ids, (scores, ids, source), side.item_ids, vectors=vectors, seen=rows.binary)
    listed = (ids >= 0).sum(axis=1)
    return Part("user", block, start, len(user_ids), files, short_of_k=int((listed < min(job.k, len(side.item_ids))).sum()),
                new_items_listed=int(np.isin(ids[:, :job.k][ids[:, :job.k] >= 0], side.new_items).sum()),
                seconds=time.perf_counter() - started)


def list_blocks(client, n_items: int, blocks: Blocks, settings: RankingSettings, job: ListJob, *,
                sample: np.ndarray, block_size: int = BLOCK,
                progress: Callable[[str, int], Callable[[int], None]] | None = None) -> list[Part]:
    """Every item block of `block_size` rows and every user block (the event blocks ingest wrote), on
    the workers (in this process without a client), at most a few per task slot in flight. Returns
    their Parts in block order, items first. The item side and the index are read from the blocks'
    run folder, where the parts are written."""
    run = blocks.run
    run.lists.mkdir(exist_ok=True)
    run.parts.mkdir(exist_ok=True)
    n_item_blocks = -(-n_items // block_size)
    starts = blocks.starts
    calls = [(item_block, (run, b, b * block_size, min((b + 1) * block_size, n_items), job, sample))
             for b in range(n_item_blocks)]
    calls += [(user_block, (run, b, int(starts[b]), job, n_items, settings, blocks.newest))
              for b in range(blocks.n)]
    ticks = {"item": progress("item->item", n_items) if progress else None,
             "user": progress("user->item", blocks.users) if progress else None}
    parts: list[Part | None] = [None] * len(calls)
    try:
        for i, part in _run(client, calls.__getitem__, len(calls)):
            parts[i] = part
            if ticks[part.kind]:
                ticks[part.kind](part.subjects)
    finally:
        client.run(forget_item_side) if client is not None else forget_item_side()
    return parts


def _run(client, call: Callable[[int], tuple[Callable, tuple]], n: int) -> Iterator[tuple[int, Part]]:
    if client is None:
        for i in range(n):
            fn, args = call(i)
            yield i, fn(*args)
        return
    stamp = time.time_ns()

    def submit(i: int):
        fn, args = call(i)
        return client.submit(fn, *args, pure=False, key=f"{fn.__name__.replace('_', '-')}-{args[1]}-{stamp}")

    yield from in_window(client, n, submit)


def part_files(parts: list[Part]) -> dict[str, str]:
    return {name: digest for part in parts for name, digest in part.files.items()}
