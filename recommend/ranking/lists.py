"""Next-day lists: K similar items per item, K recommended items per user, as one long frame.

Exactly K per subject whenever K eligible items exist: a row the index leaves short (an approximate
index, a user with no history) is filled from the popularity ranking, and says so in `source`.
Everything here works on a block of rows at once: exclusions are CSR matrices (row i: the items
subject i must not get), not a Python loop over subjects.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np
import pandas as pd
import pyarrow as pa
import scipy.sparse as sp

from index.rows import RowSource, take_rows
from index.search import exact_search, exclusions, keep_allowed, search_excluding

LIST_COLUMNS = ["subject_kind", "subject_id", "rank", "item_id", "score", "source"]
LIST_SCHEMA = pa.schema([("subject_kind", pa.string()), ("subject_id", pa.string()), ("rank", pa.int32()),
                         ("item_id", pa.string()), ("score", pa.float32()), ("source", pa.string())])
BLOCK = 4096  # rows per block in the fills


def fill_from_popular(scores: np.ndarray, ids: np.ndarray, exclude: sp.csr_matrix, popular_order: np.ndarray,
                      queries: RowSource | None, item_vectors: RowSource, popular_scores: np.ndarray) -> np.ndarray:
    """Fill the -1 slots of each row in place with the most popular items not excluded and not listed.

    A filled slot's score is query . item when the row has a query vector, else the item's popularity
    relative to the most popular. Returns a bool mask of the rows that needed filling.
    """
    k = ids.shape[1]
    short = (ids < 0).any(axis=1)
    top = float(popular_scores.max()) if len(popular_scores) and popular_scores.max() > 0 else 1.0
    n_items = len(popular_order)
    for start in range(0, int(short.sum()), BLOCK):
        rows = np.flatnonzero(short)[start:start + BLOCK]
        excluded = sp.csr_matrix(exclude[rows]) if exclude is not None else exclusions(None, 0, len(rows), n_items)
        listed = ids[rows]  # valid ids first, -1 after (search order)
        have = (listed >= 0).sum(axis=1)
        depth = min(k + int(np.diff(excluded.indptr).max(initial=0)), n_items)
        candidates = np.broadcast_to(popular_order[:depth], (len(rows), depth))
        taken = sp.csr_matrix((np.ones(int(have.sum()), np.int8), listed[listed >= 0],
                               np.concatenate([[0], np.cumsum(have)])), shape=(len(rows), n_items))
        _, picks = keep_allowed(np.zeros(candidates.shape, np.float32), candidates, excluded + taken, k, n_items)
        slot = np.arange(k)[None, :]
        need = slot >= have[:, None]  # the slots to fill, in order
        fill = np.where(need, np.take_along_axis(picks, np.maximum(slot - have[:, None], 0), axis=1), -1)
        ids[rows] = np.where(need, fill, listed)
        filled = need & (fill >= 0)
        relative = popular_scores[np.maximum(fill, 0)] / top
        if queries is not None:
            q = np.asarray(take_rows(queries, rows)[:], dtype=np.float32)
            dots = np.einsum("rkd,rd->rk", np.asarray(item_vectors[np.maximum(fill, 0).ravel()], np.float32)
                             .reshape(len(rows), k, -1), q)
            relative = np.where(np.any(q, axis=1)[:, None], dots, relative)
        scores[rows] = np.where(filled, relative, scores[rows])
    return short


def similar_items(index, queries: RowSource, k: int, popular_scores: np.ndarray,
                  progress: Callable[[int], None] | None = None,
                  item_vectors: RowSource | None = None, rows: np.ndarray | None = None,
                  popular_order: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """For every item, the k nearest other items. `queries[i]` is item `rows[i]`'s query vector (its
    indexed vector when the space is symmetric); `rows` default: every item, in order (a block of
    items passes its own item numbers, so that each leaves itself out). `item_vectors`: the indexed
    vectors (default: `queries`); `popular_order`: the items by popularity, most popular first (computed
    when not given). Returns (scores, ids, filled-from-popular mask)."""
    item_vectors = queries if item_vectors is None else item_vectors
    n_items = index.ntotal
    rows = np.arange(len(queries), dtype=np.int64) if rows is None else np.asarray(rows, dtype=np.int64)
    k = min(k, max(n_items - 1, 0))
    itself = sp.csr_matrix((np.ones(len(rows), np.int8), rows, np.arange(len(rows) + 1)), shape=(len(rows), n_items))
    scores, ids = search_excluding(index, queries, k, itself, vectors=item_vectors, progress=progress)
    filled = fill_from_popular(scores, ids, itself, _order(popular_scores, popular_order), queries, item_vectors,
                               popular_scores)
    return scores, ids, filled


def _order(popular_scores: np.ndarray, popular_order: np.ndarray | None) -> np.ndarray:
    return np.argsort(-popular_scores, kind="stable") if popular_order is None else popular_order


@dataclass(frozen=True)
class Candidates:
    """The items users' lists are drawn from: their vectors (the index's documents), their popularity
    (the fill) and its order when known (as for `similar_items`), and the items without events, up to
    `new_slots` of which may earn a place in a list, their scores boosted by `new_boost`."""

    vectors: RowSource
    popularity: np.ndarray
    popular_order: np.ndarray | None = None
    new_items: np.ndarray | None = None  # rows of the items without events
    new_slots: int = 0
    new_boost: float = 1.0


def recommended_items(index, profiles: RowSource, has_history: np.ndarray, seen: sp.csr_matrix, k: int,
                      items: Candidates, progress: Callable[[int], None] | None = None, head: int | None = None
                      ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """For every user, the k items nearest their profile that they have not interacted with.

    `seen`: (users, items) CSR, the items each user interacted with. Users without history get the
    most popular items. New items may earn places (`earn_places`). Returns (scores, ids, source) where
    source is 'history', 'history+new' (a new item let in), 'history+popular' (topped up) or 'popular'
    per user. `head` (lists.keep: lists stored deeper than the k a query answers): new items earn
    places among the first `head` entries only, as in a list of `head`, so that those are the same
    whatever the depth.
    """
    item_vectors, popular_scores = items.vectors, items.popularity
    k = min(k, len(item_vectors))
    seen = sp.csr_matrix(seen)
    scores = np.full((len(profiles), k), -np.inf, dtype=np.float32)
    ids = np.full((len(profiles), k), -1, dtype=np.int64)
    rows = np.flatnonzero(has_history)
    if len(rows):
        s, i = search_excluding(index, take_rows(profiles, rows), k, seen[rows], vectors=item_vectors, progress=progress)
        scores[rows], ids[rows] = s, i
    filled = fill_from_popular(scores, ids, seen, _order(popular_scores, items.popular_order), profiles, item_vectors,
                               popular_scores)
    if head is None or head >= ids.shape[1]:
        let_in = earn_places(scores, ids, profiles, items, seen, rows)
    else:
        let_in = _earn_in_head(scores, ids, profiles, items, seen, rows, head)
    source = labels(np.where(~has_history, "popular", np.where(filled, "history+popular", np.where(let_in, "history+new", "history"))))
    return scores, ids, source


def _earn_in_head(scores: np.ndarray, ids: np.ndarray, queries: RowSource, items: Candidates, seen: sp.csr_matrix,
                  rows: np.ndarray, head: int) -> np.ndarray:
    """`earn_places` on the first `head` entries of each list (in place); an item that made way there
    leads the rest of the list, and a new item let in leaves it."""
    head_scores, head_ids = scores[:, :head].copy(), ids[:, :head].copy()
    let_in = earn_places(head_scores, head_ids, queries, items, seen, rows)
    depth = ids.shape[1]
    for r in np.flatnonzero(let_in):
        now = set(head_ids[r].tolist())
        made_way = [(i, s) for i, s in zip(ids[r, :head], scores[r, :head]) if i not in now]
        entered = now - set(ids[r, :head].tolist())
        rest = made_way + [(i, s) for i, s in zip(ids[r, head:], scores[r, head:]) if i not in entered]
        rest = (rest + [(-1, -np.inf)] * depth)[:depth - head]
        ids[r, head:], scores[r, head:] = [i for i, _ in rest], [s for _, s in rest]
    ids[:, :head], scores[:, :head] = head_ids, head_scores
    return let_in


def labels(values: np.ndarray) -> np.ndarray:
    """A fixed-width string array as an object array sharing one str per distinct value: at a million
    users '<U15' takes 60 MB, this 8 MB."""
    distinct, codes = np.unique(values, return_inverse=True)
    return np.asarray(distinct.tolist(), dtype=object)[codes.ravel()]


def earn_places(scores: np.ndarray, ids: np.ndarray, queries: RowSource, items: Candidates, seen: sp.csr_matrix,
                rows: np.ndarray) -> np.ndarray:
    """Let new items (`items.new_items`, no events yet) earn a place (in place): in each full list of
    `rows`, the best new item not yet listed or seen enters where `items.new_boost` x its score beats
    the list's last score; it takes its rank by that boosted score and the lowest item makes way. Up to
    `items.new_slots` new items per list, one at a time. The best new items come from one exact search
    over the new items only. Returns a bool mask of the rows changed."""
    item_vectors, slots, boost = items.vectors, items.new_slots, items.new_boost
    new_items = items.new_items if items.new_items is not None else np.array([], np.int64)
    changed = np.zeros(len(ids), dtype=bool)
    k = ids.shape[1]
    if slots <= 0 or not len(new_items) or not len(rows) or k == 0:
        return changed
    new_items = np.asarray(new_items, dtype=np.int64)
    position = np.full(len(item_vectors), -1, dtype=np.int64)
    position[new_items] = np.arange(len(new_items))
    rows = rows[ids[rows, k - 1] >= 0]  # full lists only: a short one was already topped up
    if not len(rows):
        return changed
    # lazily when the vectors are computed rows: a block of them at a time, not every new item at once
    # (a gate's few thousand users over a million items leave most of them without events)
    new_vectors = take_rows(item_vectors, new_items)
    listed = position[ids[rows]]
    in_list = sp.csr_matrix((np.ones((listed >= 0).sum(), np.int8), listed[listed >= 0],
                             np.concatenate([[0], np.cumsum((listed >= 0).sum(axis=1))])), shape=(len(rows), len(new_items)))
    excluded = sp.csr_matrix(seen[rows][:, new_items]) + in_list  # seen, or already in the list
    best_scores, best = exact_search(new_vectors, take_rows(queries, rows), slots, excluded)
    block_ids, block_scores = ids[rows], scores[rows]
    places = np.arange(k)[None, :]
    for j in range(slots):  # the j-th best new item of each row, where it beats the row's last score
        raw = best_scores[:, j]
        boosted = np.where(raw > 0, raw * boost, raw / boost)
        enters = (best[:, j] >= 0) & (boosted > block_scores[:, k - 1])
        at = (block_scores > boosted[:, None]).sum(axis=1)  # its rank among the list's scores
        source = places - (places > at[:, None])  # shift the rest down one place, the last one drops out
        moved_ids = np.take_along_axis(block_ids, source, axis=1)
        moved_scores = np.take_along_axis(block_scores, source, axis=1)
        here = places == at[:, None]
        moved_ids = np.where(here, new_items[np.maximum(best[:, j], 0)][:, None], moved_ids)
        moved_scores = np.where(here, boosted[:, None], moved_scores)
        block_ids = np.where(enters[:, None], moved_ids, block_ids)
        block_scores = np.where(enters[:, None], moved_scores, block_scores)
        changed[rows[enters]] = True
    ids[rows], scores[rows] = block_ids, block_scores
    return changed


def lists_frame(kind: str, subject_ids, scores: np.ndarray, ids: np.ndarray, item_ids: np.ndarray,
                source=None) -> pd.DataFrame:
    """Long format: one row per (subject, rank). Empty slots (fewer than k eligible items) are left out."""
    n, k = ids.shape
    valid = ids >= 0
    subj = np.repeat(np.asarray(subject_ids, dtype=object), k).reshape(n, k)
    ranks = np.tile(np.arange(1, k + 1), (n, 1))
    src = np.repeat(np.asarray(source if source is not None else ["similar"] * n, dtype=object), k).reshape(n, k)
    return pd.DataFrame({
        "subject_kind": kind, "subject_id": subj[valid], "rank": ranks[valid].astype(np.int32),
        "item_id": np.asarray(item_ids, dtype=object)[ids[valid]], "score": scores[valid].astype(np.float32),
        "source": src[valid],
    }, columns=LIST_COLUMNS)
