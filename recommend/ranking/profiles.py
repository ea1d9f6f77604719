"""User profiles and popularity from the event history.

An event's weight = the weight of its type (config events.weights) x 0.5 ** (age / half_life), where
age is measured back from the newest event in the data (not the wall clock: a rerun on the same data
gives the same lists).
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import scipy.sparse as sp


def interactions(events: pd.DataFrame, item_row: dict[str, int] | None, n_items: int, weights: dict[str, float],
                 half_life_days: float, user_ids: list[str], now: pd.Timestamp | None = None) -> sp.csr_matrix:
    """The (users, items) matrix of summed decayed weights, from events (user_id, item_id, ts,
    event_type). `user_ids` fixes the row order and may hold users with no events (empty rows).
    `item_row` None: the events carry their item rows in an `item` column (a user block's file).
    `now`: the newest event of the whole data (default: of these events)."""
    user_row = pd.Index(user_ids)
    if events.empty:
        return sp.csr_matrix((len(user_ids), n_items), dtype=np.float32)
    now = events["ts"].max() if now is None else now
    age_days = (now - events["ts"]).dt.total_seconds().to_numpy() / 86400.0
    w = events["event_type"].map(weights).to_numpy(dtype=np.float64) * 0.5 ** (age_days / half_life_days)
    rows = user_row.get_indexer(events["user_id"])
    cols = events["item"].to_numpy() if item_row is None else events["item_id"].map(item_row).to_numpy()
    matrix = sp.csr_matrix((w.astype(np.float32), (rows, cols)), shape=(len(user_ids), n_items))
    matrix.sum_duplicates()
    return matrix


def rows_dot(matrix: sp.csr_matrix, dense: np.ndarray) -> np.ndarray:
    """`matrix @ dense` in float32, reading only the rows of `dense` that `matrix` uses: scipy would
    convert a float16 `dense` to float32 whole for every product (gigabytes at a million items)."""
    cols, inverse = np.unique(matrix.indices, return_inverse=True)
    used = sp.csr_matrix((matrix.data, inverse.astype(np.int64), matrix.indptr), shape=(matrix.shape[0], len(cols)))
    return np.asarray(used @ np.asarray(dense[cols], dtype=np.float32), dtype=np.float32)


def user_profiles(matrix: sp.csr_matrix, item_vectors: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Profile = weighted mean of the vectors of the items a user interacted with, L2-normalised.

    Returns (profiles (users, d) float32, has_history (users,) bool); users with no history get zeros.
    """
    profiles = rows_dot(matrix, item_vectors)
    norms = np.linalg.norm(profiles, axis=1)
    has_history = norms > 0
    profiles[has_history] /= norms[has_history, None]
    return profiles, has_history


def popularity(matrix: sp.csr_matrix) -> np.ndarray:
    """Per item, the sum of decayed weights over all users: the fallback ranking."""
    return np.asarray(matrix.sum(axis=0)).ravel().astype(np.float32)
