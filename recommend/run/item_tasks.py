"""The item side and the index, built and saved on a Dask worker: the driver holds neither.

The behaviour fit (recommend/run/user_tasks.py) leaves its singular vectors on a worker. There the
item side is made from them (`ranking.blend.item_side_of`: the two behaviour sides, the projected
text, popularity) and saved in the run folder (`save_item_side`), where every worker loads it,
memory-mapped, for the lists (recommend/run/list_tasks.py). Then one task builds and tunes the FAISS
index from the saved item side and saves it beside it; another measures the item lists' recall on a
sample against exact search. The driver receives their summaries: the layout, counts, the tuning
and the file digests. Without a client the same functions run in this process.

Example (what the lists stage does):
    saved = fit_blocks(client, run_dir, blocks, item_ids, text, settings)
    index = build_index(client, run_dir, k, index_settings, sample, blocks.newest, settings, n_searches)
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
from embedder.event_blocks import Blocks
from embedder.task_window import one_task
from index.build import save_index
from index.search import Recall, is_exact, recall_on_rows
from index.settings import IndexSettings
from index.tune import Tuning, build_tuned
from recommend.ranking.blend import SCALE_SAMPLE, ItemSide, Layout, fit_item_side, scale_sample, user_block, user_block_vectors
from recommend.ranking.settings import RankingSettings
from recommend.run.user_tasks import BlockedFit, block_stats, forget_fit_rows, sample_users

ITEM_SIDE = "item-side"  # folder in the run folder: the item side's arrays, for the workers
INDEX = "index.faiss"
_ARRAYS = ("behaviour_docs", "behaviour_queries", "text", "pop_feature", "popularity", "warm")


def save_item_side(run_dir: Path, items: ItemSide, item_ids) -> dict[str, str]:
    """The item side's arrays as .npy files and its layout as JSON, under <run>/item-side/. Returns
    their digests (for the manifest)."""
    folder = Path(run_dir) / ITEM_SIDE
    folder.mkdir(exist_ok=True)
    for name in _ARRAYS:
        with atomic_path(folder / f"{name}.npy") as tmp:
            with open(tmp, "wb") as fh:
                np.save(fh, np.ascontiguousarray(getattr(items, name)))
    write_parquet(pa.table({"item_id": pa.array(list(item_ids), pa.string())}), folder / "item_ids.parquet")
    with atomic_path(folder / "layout.json") as tmp:
        Path(tmp).write_text(json.dumps({"layout": items.layout.to_dict(), "query_scale": items.query_scale}))
    names = [*(f"{n}.npy" for n in _ARRAYS), "item_ids.parquet", "layout.json"]
    return {f"{ITEM_SIDE}/{n}": file_digest(folder / n) for n in names}


def read_item_side(run_dir) -> ItemSide:
    """The saved item side, its arrays memory-mapped (read as they are used; processes on one host
    share the pages)."""
    folder = Path(run_dir) / ITEM_SIDE
    arrays = {name: np.load(folder / f"{name}.npy", mmap_mode="r") for name in _ARRAYS}
    meta = json.loads((folder / "layout.json").read_text())
    return ItemSide(**arrays, layout=Layout(**meta["layout"]), query_scale=meta["query_scale"])


def read_item_ids(run_dir) -> np.ndarray:
    return np.asarray(pq.read_table(Path(run_dir) / ITEM_SIDE / "item_ids.parquet").column(0).to_pylist(), dtype=object)


@dataclass
class SavedItemSide:
    """What the driver learns of the item side a worker built and saved."""

    layout: Layout
    cold_items: int            # items with no events
    cold_items_projected: int  # of them, given behaviour from their text
    files: dict[str, str]      # path in the run folder -> digest
    users: int = 0
    users_with_history: int = 0


def _save(side: tuple[ItemSide, int], run_dir: str, item_ids) -> SavedItemSide:
    items, projected = side
    files = save_item_side(Path(run_dir), items, item_ids)
    return SavedItemSide(items.layout, int((~np.asarray(items.warm)).sum()), projected, files)


def fit_blocks(client, run_dir, blocks: Blocks, item_ids, text, settings: RankingSettings, bar=None,
               sample: tuple[list[str], pd.DataFrame] | None = None) -> SavedItemSide:
    """The item side from the user blocks, as `ranking.blend.build_space` makes it from all events at
    once, built and saved in `run_dir` on a worker (`read_item_side` reads it). `text`: the items'
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
        saved = fit.fetch(fit.run(_save, side, str(run_dir), np.asarray(item_ids, dtype=object)))
    finally:
        client.run(forget_fit_rows) if client is not None else forget_fit_rows()
    saved.users, saved.users_with_history = blocks.users, sum(s.users_with_events for s in blocks.summaries)
    return saved


@dataclass
class BuiltIndex:
    tuning: Tuning
    exact: bool
    files: dict[str, str]


def _index_task(run_dir: str, k: int, index_settings: IndexSettings, sample: tuple[list[str], pd.DataFrame], now,
                settings: RankingSettings, n_searches: int) -> BuiltIndex:
    with threadpool_limits(os.cpu_count()):  # the only task while it runs: faiss and BLAS on the host's cores
        items = read_item_side(run_dir)
        chosen, events = sample
        rows = user_block(events, n_items=len(items.popularity), user_ids=chosen, settings=settings, now=now)
        index, tuning = build_tuned(items.docs(), items.queries(), k, index_settings, user_block_vectors(rows, items),
                                    np.flatnonzero(rows.n_history > 0), n_searches=n_searches)
        save_index(index, Path(run_dir) / INDEX)
        return BuiltIndex(tuning, is_exact(index), {INDEX: file_digest(Path(run_dir) / INDEX)})


def build_index(client, run_dir, k: int, index_settings: IndexSettings, sample: tuple[list[str], pd.DataFrame], now,
                settings: RankingSettings, n_searches: int) -> BuiltIndex:
    """The index over the saved item side (`index.tune.build_tuned`: exact, or approximate and tuned
    on the item queries and the vectors of the `sample` users), built and saved on a worker."""
    return one_task(client, _index_task, str(run_dir), k, index_settings, sample, now, settings, n_searches)


def _recall_task(run_dir: str, rows: np.ndarray, found: np.ndarray, k: int) -> Recall:
    items = read_item_side(run_dir)
    return recall_on_rows(items.docs(), items.queries(), rows, found, k)


def item_lists_recall(client, run_dir, rows: np.ndarray, found: np.ndarray, k: int) -> Recall:
    """The item lists' recall@k on the sampled `rows` (their listed ids `found`) against exact search
    over the saved item side, on a worker."""
    return one_task(client, _recall_task, str(run_dir), rows, found, k)
