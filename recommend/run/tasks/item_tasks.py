"""The item side and the index, built and saved on a Dask worker: the driver holds neither.

The behaviour fit (recommend/run/tasks/user_tasks.py) leaves its singular vectors on a worker. There the
item side is made from them (`ranking.blend.item_side_of`: the two behaviour sides, the projected
text, popularity) and saved in the run folder (`save_item_side`), where every worker loads it,
memory-mapped, for the lists (recommend/run/tasks/list_tasks.py). Then one task builds and tunes the FAISS
index from the saved item side and saves it beside it; another measures the item lists' recall on a
sample against exact search. The driver receives their summaries: the layout, counts, the tuning
and the file digests. Without a client the same functions run in this process.

Example (what the lists stage does):
    saved = fit_blocks(client, blocks, item_ids, text, settings)
    index = build_index(client, blocks, k, index_settings, sample, settings, n_searches)
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
from threadpoolctl import threadpool_limits

from embedder.artifacts import atomic_path, file_digest, write_parquet
from embedder.event_blocks import Blocks, first_users
from embedder.run_folder import RunFolder
from embedder.task_window import one_task
from index.build import load_index, save_index
from index.search import Recall, exact_search, flat_vectors, is_exact, recall_at_k, recall_on_rows, search_excluding
from index.settings import IndexSettings
from index.norm_head import head_path
from index.tune import Tuning, build_tuned
from recommend.ranking.blend import SCALE_SAMPLE, ItemSide, Layout, fit_item_side, scale_sample, user_block, user_block_vectors
from recommend.ranking.settings import RankingSettings
from recommend.run.tasks.user_tasks import BlockedFit, block_stats, forget_fit_rows, sample_users

_ARRAYS = ("behaviour_docs", "behaviour_queries", "text", "pop_feature", "popularity", "warm")


def save_item_side(run: RunFolder, items: ItemSide, item_ids) -> dict[str, str]:
    """The item side's arrays as .npy files, its ids and its layout (JSON) in the run folder's item
    side. Returns their digests (for the manifest)."""
    run.item_side.mkdir(exist_ok=True)
    for name in _ARRAYS:
        with atomic_path(run.item_array(name)) as tmp:
            with open(tmp, "wb") as fh:
                np.save(fh, np.ascontiguousarray(getattr(items, name)))
    write_parquet(pa.table({"item_id": pa.array(list(item_ids), pa.string())}), run.item_ids)
    with atomic_path(run.layout) as tmp:
        Path(tmp).write_text(json.dumps({"layout": items.layout.to_dict(), "query_scale": items.query_scale}))
    written = [*map(run.item_array, _ARRAYS), run.item_ids, run.layout]
    return {run.relative(path): file_digest(path) for path in written}


def read_item_side(run: RunFolder) -> ItemSide:
    """The saved item side, its arrays memory-mapped (read as they are used; processes on one host
    share the pages)."""
    arrays = {name: np.load(run.item_array(name), mmap_mode="r") for name in _ARRAYS}
    meta = json.loads(run.layout.read_text())
    return ItemSide(**arrays, layout=Layout(**meta["layout"]), query_scale=meta["query_scale"])


def read_item_ids(run: RunFolder) -> np.ndarray:
    return np.asarray(pq.read_table(run.item_ids).column(0).to_pylist(), dtype=object)


@dataclass
class SavedItemSide:
    """What the driver learns of the item side a worker built and saved."""

    layout: Layout
    cold_items: int            # items with no events
    cold_items_projected: int  # of them, given behaviour from their text
    files: dict[str, str]      # path in the run folder -> digest
    users: int = 0
    users_with_history: int = 0


def _save(side: tuple[ItemSide, int], run: RunFolder, item_ids) -> SavedItemSide:
    items, projected = side
    files = save_item_side(run, items, item_ids)
    return SavedItemSide(items.layout, int((~np.asarray(items.warm)).sum()), projected, files)


def fit_blocks(client, blocks: Blocks, item_ids, text, settings: RankingSettings, bar=None,
               sample: tuple[list[str], pd.DataFrame] | None = None) -> SavedItemSide:
    """The item side from the user blocks, as `ranking.blend.build_space` makes it from all events at
    once, built and saved in the blocks' run folder on a worker (`read_item_side` reads it). `text`: the items'
    text vectors (an `index.rows.ParquetRows` of the run's embeddings travels as its path).
    `sample`: `sample_users` of at least SCALE_SAMPLE users, when the caller has it."""
    n_items = len(item_ids)
    stats, pop = block_stats(client, blocks, n_items, settings)
    chosen, events = sample if sample is not None else sample_users(client, blocks, SCALE_SAMPLE)
    scale = user_block(events, n_items=n_items, user_ids=chosen, settings=settings, now=blocks.newest)
    rows = scale_sample(np.arange(len(chosen), dtype=np.uint64), scale.n_history)  # in hash order already
    fit = BlockedFit(client, blocks, n_items, settings)
    try:
        side = fit_item_side(fit, stats, pop, text, settings, scale.fit_on[rows], bar)
        saved = fit.fetch(fit.run(_save, side, blocks.run, np.asarray(item_ids, dtype=object)))
    finally:
        client.run(forget_fit_rows) if client is not None else forget_fit_rows()
    saved.users, saved.users_with_history = blocks.users, sum(s.users_with_events for s in blocks.summaries)
    return saved


@dataclass
class BuiltIndex:
    tuning: Tuning
    exact: bool
    files: dict[str, str]


def _index_task(run: RunFolder, k: int, index_settings: IndexSettings, sample: tuple[list[str], pd.DataFrame], now,
                settings: RankingSettings, n_searches: int) -> BuiltIndex:
    with threadpool_limits(os.cpu_count()):  # the only task while it runs: faiss and BLAS on the host's cores
        items = read_item_side(run)
        chosen, events = sample
        rows = user_block(events, n_items=len(items.popularity), user_ids=chosen, settings=settings, now=now)
        index, tuning = build_tuned(items.docs(), items.queries(), k, index_settings, user_block_vectors(rows, items),
                                    np.flatnonzero(rows.n_history > 0), n_searches=n_searches)
        save_index(index, run.index)
        written = [run.index, head_path(run.index)]  # the second where the index has a head (index/norm_head.py)
        return BuiltIndex(tuning, is_exact(index), {run.relative(p): file_digest(p) for p in written if p.exists()})


def build_index(client, blocks: Blocks, k: int, index_settings: IndexSettings, sample: tuple[list[str], pd.DataFrame],
                settings: RankingSettings, n_searches: int) -> BuiltIndex:
    """The index over the saved item side (`index.tune.build_tuned`: exact, or approximate and tuned
    on the item queries and the vectors of the `sample` users), built and saved in the blocks' run
    folder on a worker."""
    return one_task(client, _index_task, blocks.run, k, index_settings, sample, blocks.newest, settings, n_searches)


def _recall_task(run: RunFolder, rows: np.ndarray, found: np.ndarray, k: int) -> Recall:
    items = read_item_side(run)
    return recall_on_rows(items.docs(), items.queries(), rows, found, k)


def item_lists_recall(client, run: RunFolder, rows: np.ndarray, found: np.ndarray, k: int) -> Recall:
    """The item lists' recall@k on the sampled `rows` (their listed ids `found`) against exact search
    over the saved item side, on a worker."""
    return one_task(client, _recall_task, run, rows, found, k)


def _user_recall_task(run: RunFolder, n_blocks: int, n: int, k: int, settings: RankingSettings, now) -> Recall:
    with threadpool_limits(os.cpu_count()):
        items, index = read_item_side(run), load_index(run.index, mmap=True)
        user_ids, events = first_users(run, n_blocks, n, largest=True)
        rows = user_block(events, n_items=len(items.popularity), user_ids=user_ids, settings=settings, now=now)
        has = np.flatnonzero(rows.n_history > 0)
        profiles, seen = user_block_vectors(rows, items)[has], rows.binary[has].tocsr()
        docs = flat_vectors(index)
        docs = items.docs() if docs is None else docs
        found = search_excluding(index, profiles, k, seen, vectors=docs)[1]
        truth = exact_search(docs, profiles, k, seen)[1]
        return Recall(recall=round(recall_at_k(found, truth), 4), k=k, sample=int(len(has)), exact=False)


def user_search_recall(client, blocks: Blocks, n: int, k: int, settings: RankingSettings) -> Recall:
    """The index's recall@k for users' lists (their seen items excluded) against exact search, on the
    `n` users of largest hash (held out: the depth was tuned on those of smallest hash), on a worker."""
    return one_task(client, _user_recall_task, blocks.run, blocks.n, n, k, settings, blocks.newest)

