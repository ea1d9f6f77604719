"""Next-day lists: K similar items per item, K recommended items per user, as one long frame.

Exactly K per subject whenever K eligible items exist: a row the index leaves short (an approximate
index, a user with no history) is filled from the popularity ranking, and says so in `source`.
"""

from __future__ import annotations

from typing import Callable

import numpy as np
import pandas as pd
import pyarrow as pa

from index.rows import take_rows
from index.search import exact_search, search_excluding
from recommend.ranking.profiles import Computed

LIST_COLUMNS = ["subject_kind", "subject_id", "rank", "item_id", "score", "source"]
LIST_SCHEMA = pa.schema([("subject_kind", pa.string()), ("subject_id", pa.string()), ("rank", pa.int32()),
                         ("item_id", pa.string()), ("score", pa.float32()), ("source", pa.string())])


def fill_from_popular(scores: np.ndarray, ids: np.ndarray, exclude: list[np.ndarray], popular_order: np.ndarray,
                      queries: np.ndarray | None, item_vectors: np.ndarray, popular_scores: np.ndarray) -> np.ndarray:
    """Fill the -1 slots of each row in place with the most popular items not excluded and not listed.

    A filled slot's score is query . item when the row has a query vector, else the item's popularity
    relative to the most popular. Returns a bool mask of the rows that needed filling.
    """
    k = ids.shape[1]
    short = (ids < 0).any(axis=1)
    top = float(popular_scores.max()) if len(popular_scores) and popular_scores.max() > 0 else 1.0
    for row in np.flatnonzero(short):
        have = ids[row][ids[row] >= 0]
        n = len(have)
        taken = np.concatenate([have, exclude[row]]) if len(exclude[row]) else have
        # popular_order is long; only look as deep as needed
        cands = popular_order[: k + len(taken)]
        cands = cands[~np.isin(cands, taken)][: k - n]
        ids[row, n:n + len(cands)] = cands
        if queries is not None and np.any(queries[row]):
            scores[row, n:n + len(cands)] = item_vectors[cands] @ queries[row]
        else:
            scores[row, n:n + len(cands)] = popular_scores[cands] / top
    return short


def similar_items(index, queries: np.ndarray, k: int, popular_scores: np.ndarray,
                  progress: Callable[[int], None] | None = None,
                  item_vectors: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """For every item, the k nearest other items. `queries[i]` is item i's query vector (its indexed
    vector when the space is symmetric); `item_vectors`: the indexed vectors (default: `queries`).
    Returns (scores, ids, filled-from-popular mask)."""
    item_vectors = queries if item_vectors is None else item_vectors
    n = len(queries)
    k = min(k, max(n - 1, 0))
    exclude = [np.array([i], dtype=np.int64) for i in range(n)]
    scores, ids = search_excluding(index, queries, k, exclude, progress=progress)
    filled = fill_from_popular(scores, ids, exclude, np.argsort(-popular_scores, kind="stable"), queries,
                               item_vectors, popular_scores)
    return scores, ids, filled


def recommended_items(index, profiles: np.ndarray, has_history: np.ndarray, seen: list[np.ndarray], k: int,
                      item_vectors: np.ndarray, popular_scores: np.ndarray,
                      progress: Callable[[int], None] | None = None, new_items: np.ndarray | None = None,
                      new_slots: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """For every user, the k items nearest their profile that they have not interacted with.

    Users without history get the most popular items. With `new_slots`, each user with history gets
    up to that many of the best-matching `new_items` (items without events) at the end of the list.
    Returns (scores, ids, source) where source is 'history', 'history+new' (a new item let in),
    'history+popular' (topped up) or 'popular' per user.
    """
    k = min(k, len(item_vectors))
    scores = np.full((len(profiles), k), -np.inf, dtype=np.float32)
    ids = np.full((len(profiles), k), -1, dtype=np.int64)
    rows = np.flatnonzero(has_history)
    if len(rows):
        s, i = search_excluding(index, take_rows(profiles, rows), k, picked(seen, rows), progress=progress)
        scores[rows], ids[rows] = s, i
    filled = fill_from_popular(scores, ids, seen, np.argsort(-popular_scores, kind="stable"), profiles,
                               item_vectors, popular_scores)
    let_in = reserve_for_new(scores, ids, profiles, item_vectors, new_items if new_items is not None else np.array([], np.int64),
                             seen, rows, new_slots)
    source = labels(np.where(~has_history, "popular", np.where(filled, "history+popular", np.where(let_in, "history+new", "history"))))
    return scores, ids, source


def labels(values: np.ndarray) -> np.ndarray:
    """A fixed-width string array as an object array sharing one str per distinct value: at a million
    users '<U15' takes 60 MB, this 8 MB."""
    distinct, codes = np.unique(values, return_inverse=True)
    return np.asarray(distinct.tolist(), dtype=object)[codes.ravel()]


def picked(seq, rows: np.ndarray) -> Computed:
    """`seq[rows[i]]` on demand (see Computed)."""
    rows = np.asarray(rows)
    return Computed(len(rows), lambda i: seq[rows[i]])


def reserve_for_new(scores: np.ndarray, ids: np.ndarray, queries: np.ndarray, item_vectors: np.ndarray,
                    new_items: np.ndarray, seen: list[np.ndarray], rows: np.ndarray, slots: int = 1) -> np.ndarray:
    """Give new items (no events yet) a way in: in each listed row of `rows` holding fewer than
    `slots` new items, the last places go to the best-scoring new items for that row (in place).
    Lists shorter than 5 get none, and at most one place in five is given. The best new items come
    from one exact search over the new items only. Returns a bool mask of the rows changed."""
    changed = np.zeros(len(ids), dtype=bool)
    k = ids.shape[1]
    slots = min(slots, k // 5)  # at most one place in five: a short list stays what the user is known to like
    if slots <= 0 or not len(new_items) or not len(rows):
        return changed
    new_items = np.asarray(new_items, dtype=np.int64)
    is_new = np.zeros(len(item_vectors), dtype=bool)
    is_new[new_items] = True
    rows = rows[ids[rows, k - 1] >= 0]  # only full lists give up places
    have = is_new[np.where(ids[rows] >= 0, ids[rows], 0)].sum(axis=1)
    rows = rows[have < slots]
    if not len(rows):
        return changed
    position = {int(item): p for p, item in enumerate(new_items)}

    def exclude(j: int) -> np.ndarray:  # the new items already in row j's list or seen: made per block
        r = rows[j]
        return np.array([position[int(i)] for i in ids[r] if is_new[i]] + [position[int(i)] for i in seen[r] if is_new[i]],
                        dtype=np.int64)

    new_vectors = np.ascontiguousarray(item_vectors[new_items], dtype=np.float32)  # computed once, searched per block
    best_scores, best = exact_search(new_vectors, take_rows(queries, rows), slots, Computed(len(rows), exclude))
    for j, row in enumerate(rows):
        picks = [(float(s), int(new_items[b])) for s, b in zip(best_scores[j], best[j]) if b >= 0]
        need = slots - int(is_new[ids[row]].sum())
        picks = picks[:need]
        if not picks:
            continue
        # drop the lowest old items, keep the rest (and any new ones) in order, then the picks
        old_positions = [p for p in range(k) if not is_new[ids[row, p]]]
        dropped = set(old_positions[len(old_positions) - len(picks):])
        kept = [(scores[row, p], ids[row, p]) for p in range(k) if p not in dropped]
        merged = kept + picks
        ids[row] = [i for _, i in merged]
        scores[row] = [s for s, _ in merged]
        changed[row] = True
    return changed


def lists_tables(kind: str, subject_ids, scores: np.ndarray, ids: np.ndarray, item_ids: np.ndarray, source=None,
                 block: int = 65_536):
    """`lists_frame` as Arrow tables of `block` subjects each: a million users' lists are 10 million
    rows, which as one frame of Python strings took gigabytes."""
    subject_ids = np.asarray(subject_ids, dtype=object)
    source = np.asarray(source if source is not None else ["similar"] * len(ids), dtype=object)
    for start in range(0, len(ids), block):
        stop = start + block
        frame = lists_frame(kind, subject_ids[start:stop], scores[start:stop], ids[start:stop], item_ids, source[start:stop])
        yield pa.Table.from_pandas(frame, schema=LIST_SCHEMA, preserve_index=False)


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
