"""Ranking metrics for offline evaluation, with binary relevance (an item is relevant when the user
interacted with it in the held-out part).

Every function takes `ranked`: (users, K) item rows in rank order, -1 for an empty slot, and
`relevant`: per user, the held-out item rows. Users with nothing held out are left out of the mean.
Conventions (the common ones, e.g. RecBole and Microsoft Recommenders):
- nDCG@K = DCG / IDCG, DCG = sum over hits of 1 / log2(rank + 1), IDCG over min(|relevant|, K) hits.
- precision@K = hits / K; recall@K = hits / |relevant|; hit rate = share of users with >= 1 hit.
- MAP@K = mean over users of (sum over hits at rank r of precision@r) / min(|relevant|, K).
"""

from __future__ import annotations

import numpy as np


def _hits(ranked: np.ndarray, relevant: list[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """(hit matrix (users, K) bool, |relevant| per user) for the users with something held out."""
    hits = np.zeros(ranked.shape, dtype=bool)
    sizes = np.array([len(r) for r in relevant])
    for u, rel in enumerate(relevant):
        if len(rel):
            hits[u] = np.isin(ranked[u], rel) & (ranked[u] >= 0)
    keep = sizes > 0
    return hits[keep], sizes[keep]


def ranking_metrics(ranked: np.ndarray, relevant: list[np.ndarray], k: int | None = None) -> dict[str, float]:
    """nDCG, precision, recall, MAP and hit rate at K (K = ranked.shape[1] when not given)."""
    ranked = ranked[:, :k] if k else ranked
    k = ranked.shape[1]
    hits, sizes = _hits(ranked, relevant)
    if not len(sizes):
        return {"ndcg": 0.0, "precision": 0.0, "recall": 0.0, "map": 0.0, "hit_rate": 0.0, "users": 0}
    discount = 1.0 / np.log2(np.arange(2, k + 2))
    dcg = (hits * discount).sum(axis=1)
    ideal = np.cumsum(discount)[np.minimum(sizes, k) - 1]
    n_hits = hits.sum(axis=1)
    precision_at = np.cumsum(hits, axis=1) / np.arange(1, k + 1)
    ap = (precision_at * hits).sum(axis=1) / np.minimum(sizes, k)
    return {"ndcg": float(np.mean(dcg / ideal)), "precision": float(np.mean(n_hits / k)),
            "recall": float(np.mean(n_hits / sizes)), "map": float(np.mean(ap)),
            "hit_rate": float(np.mean(n_hits > 0)), "users": int(len(sizes))}


def coverage(ranked: np.ndarray, n_items: int) -> float:
    """Share of the catalog that appears in at least one list."""
    shown = np.unique(ranked[ranked >= 0])
    return float(len(shown) / n_items) if n_items else 0.0


def cold_share(ranked: np.ndarray, cold: np.ndarray) -> float:
    """Share of filled list slots that hold a cold item (`cold`: bool per item row)."""
    filled = ranked[ranked >= 0]
    return float(cold[filled].mean()) if len(filled) else 0.0


def cold_reach(ranked: np.ndarray, cold: np.ndarray, relevant: list[np.ndarray]) -> tuple[float, float]:
    """(share of lists holding at least one cold item, share of those cold places that hit a held-out
    item), over the users with something held out: how far items with no events reach, and how well."""
    users = np.flatnonzero([len(r) > 0 for r in relevant])
    if not len(users):
        return 0.0, 0.0
    rows = ranked[users]
    is_cold = (rows >= 0) & cold[np.maximum(rows, 0)]
    hits = sum(int(np.isin(rows[i][is_cold[i]], relevant[u]).sum()) for i, u in enumerate(users) if is_cold[i].any())
    places = int(is_cold.sum())
    return float(is_cold.any(axis=1).mean()), (hits / places if places else 0.0)
