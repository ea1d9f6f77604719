"""Diversity, optional per query: maximal marginal relevance (MMR) over a pool of candidates.

An app that asks for variety passes `diversity` (0..1). The candidates are the query's usual answer
made deeper (a user's or an item's stored list and a vector query on the store, `POOL` of them or 5k;
a text search's nearest), and k are chosen greedily, each the candidate with the highest

    (1 - diversity) * relevance - diversity * (its highest similarity to those already chosen)

where relevance is the candidate's place in the pool scaled to 0..1 (the first 1, the last 0: the
stored list's order first, then the vector query's; scores from different paths, a popular fallback
or a boosted new item, are not on one scale) and similarity is the cosine of the items' text vectors
(unit length: what the items are about, whatever their popularity). diversity 0 is the plain ranking; 1 takes the best item, then
each time the one least like those taken. Both stores answer it the same way: the text vectors are
read by id (Carbonell and Goldstein, SIGIR 1998).

Example:
    order = mmr(np.array([0.9, 0.8, 0.7]), unit_vectors, k=2, diversity=0.5)   # positions in the pool
"""

from __future__ import annotations

import numpy as np

POOL = 50  # candidates at least (5k when more)


def pool_size(k: int) -> int:
    return max(POOL, 5 * k)


def mmr(relevance: np.ndarray, vectors: np.ndarray, k: int, diversity: float) -> list[int]:
    """Positions of the `k` candidates MMR picks, in the order picked. `relevance`: (n,) of any scale,
    min-max scaled here; `vectors`: (n, d) unit vectors, the similarity between candidates."""
    relevance = np.asarray(relevance, dtype=np.float64)
    n = len(relevance)
    if n == 0 or k <= 0:
        return []
    spread = relevance.max() - relevance.min()
    relevant = (relevance - relevance.min()) / spread if spread > 0 else np.ones(n)
    similar = np.asarray(vectors, dtype=np.float64) @ np.asarray(vectors, dtype=np.float64).T
    closest = np.full(n, -np.inf)  # each candidate's highest similarity to those chosen (none yet)
    chosen, left = [], np.ones(n, dtype=bool)
    for _ in range(min(k, n)):
        penalty = np.where(np.isfinite(closest), closest, 0.0)
        value = np.where(left, (1 - diversity) * relevant - diversity * penalty, -np.inf)
        best = int(np.argmax(value))  # ties: the earlier, i.e. the more relevant as the pool is ranked
        chosen.append(best)
        left[best] = False
        closest = np.maximum(closest, similar[best])
    return chosen


def diversify(reader, candidates: list, k: int, diversity: float) -> list:
    """The `k` of `candidates` (Recommendations, best first: their places are their relevance) MMR
    picks, by their text vectors read from `reader`; a candidate without one keeps only its relevance."""
    from recommend.serving.publish import ITEM_VECTOR
    from recommend.serving.version_store import point_id

    if not diversity or len(candidates) <= 1:
        return candidates[:k]
    ids = [c.item_id for c in candidates]
    pids, rows = reader.vectors(ids, ITEM_VECTOR)
    by_pid = {str(p): r for p, r in zip(pids, rows)}  # the engine answers UUIDs
    dim = len(rows[0]) if rows else 1
    vectors = np.array([by_pid.get(point_id("item", i), np.zeros(dim)) for i in ids], dtype=np.float64)
    norms = np.linalg.norm(vectors, axis=1, keepdims=True)
    vectors = np.divide(vectors, norms, out=np.zeros_like(vectors), where=norms > 0)
    return [candidates[i] for i in mmr(-np.arange(len(candidates), dtype=np.float64), vectors, k, diversity)]
