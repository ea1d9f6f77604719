"""k-NN in blocks, with per-query exclusions (the query item itself, items a user has seen).

Every search returns ``(scores, ids)``, both (n_queries, k); a slot with no result holds id -1 and
score -inf. `exact_search` is the one exact search (faiss's own `knn`, a block of vectors at a time):
the oracle for approximate indexes and the search wherever a few queries meet many vectors.
"""

from __future__ import annotations

from typing import Callable, Sequence

import faiss
import numpy as np
from pydantic import BaseModel

from index.rows import RowSource


def search_excluding(index, queries: RowSource, k: int, exclude: Sequence[np.ndarray] | None = None,
                     block_size: int = 4096, progress: Callable[[int], None] | None = None
                     ) -> tuple[np.ndarray, np.ndarray]:
    """Top-k ids by inner product for each query, never returning an id in that query's `exclude`.

    Each block asks the index for k + (largest exclusion in the block) neighbours, so an exact index
    returns exactly min(k, n - excluded) results per query. Returns ``(scores, ids)``.
    """
    n = len(queries)
    scores = np.full((n, k), -np.inf, dtype=np.float32)
    ids = np.full((n, k), -1, dtype=np.int64)
    for start in range(0, n, block_size):
        stop = min(start + block_size, n)
        block_exclude = exclude[start:stop] if exclude is not None else [()] * (stop - start)
        extra = max((len(e) for e in block_exclude), default=0)
        want = min(k + extra, index.ntotal)
        if want == 0:
            continue
        found_scores, found_ids = index.search(np.ascontiguousarray(queries[start:stop], dtype=np.float32), want)
        for row in range(stop - start):
            cand_ids, cand_scores = found_ids[row], found_scores[row]
            keep = cand_ids >= 0
            if len(block_exclude[row]):
                keep &= ~np.isin(cand_ids, block_exclude[row])
            cand_ids, cand_scores = cand_ids[keep][:k], cand_scores[keep][:k]
            ids[start + row, :len(cand_ids)] = cand_ids
            scores[start + row, :len(cand_ids)] = cand_scores
        if progress:
            progress(stop - start)
    return scores, ids


class ExactIndex:
    """Exact inner-product search over `vectors` (a row source), read a block at a time: faiss's
    `knn` on each block, the per-block top-k merged. It answers `search(queries, k)` like a FAISS
    index, and holds one block of vectors at a time, never a copy of all of them."""

    def __init__(self, vectors: RowSource, block: int = 65_536):
        self.vectors, self.block = vectors, block
        self.ntotal, self.d = len(vectors), int(vectors.shape[1])

    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        queries = np.ascontiguousarray(queries, dtype=np.float32)
        if self.ntotal <= self.block:  # one block: faiss's answer as it is (the merge would reorder ties)
            return self._knn(queries, np.ascontiguousarray(self.vectors[:], dtype=np.float32), k)
        heap = faiss.ResultHeap(len(queries), k, keep_max=True)
        for start in range(0, self.ntotal, self.block):
            scores, ids = self._knn(queries, np.ascontiguousarray(self.vectors[start:start + self.block], np.float32), k)
            heap.add_result(scores, np.where(ids >= 0, ids + start, -1))
        heap.finalize()
        return heap.D, heap.I

    @staticmethod
    def _knn(queries: np.ndarray, vectors: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        take = min(k, len(vectors))
        scores = np.full((len(queries), k), -np.inf, dtype=np.float32)
        ids = np.full((len(queries), k), -1, dtype=np.int64)
        if take:
            scores[:, :take], ids[:, :take] = faiss.knn(queries, vectors, take, metric=faiss.METRIC_INNER_PRODUCT)
        return scores, ids


def exact_search(vectors: RowSource, queries: RowSource, k: int, exclude: Sequence[np.ndarray] | None = None
                 ) -> tuple[np.ndarray, np.ndarray]:
    """Exact top-k by inner product of each query over all `vectors`, `exclude[i]` left out of query
    i's results. Returns ``(scores, ids)``.

    Example:
        scores, ids = exact_search(item_vectors, item_vectors[:5], 10, exclude=[[0], [1], [2], [3], [4]])
    """
    return search_excluding(ExactIndex(vectors), queries, k, exclude)


def recall_at_k(got: np.ndarray, truth: np.ndarray) -> float:
    """Mean share of each row's true ids (-1 = none) that `got` found."""
    hits = [len(np.intersect1d(g[g >= 0], t[t >= 0])) / max(1, (t >= 0).sum()) for g, t in zip(got, truth)]
    return float(np.mean(hits)) if hits else 1.0


def is_exact(index) -> bool:
    return isinstance(index, (faiss.IndexFlat, faiss.IndexFlatIP, ExactIndex))


def sample_rows(n: int, sample: int, seed: int) -> np.ndarray:
    return np.sort(np.random.default_rng(seed).choice(n, min(sample, n), replace=False))


def own_rows(rows: np.ndarray) -> list[np.ndarray]:
    """Each row's own id as its exclusion: item i's neighbours leave item i out."""
    return [np.array([r], dtype=np.int64) for r in rows]


class Recall(BaseModel):
    """recall@k of lists against exact search, measured on `sample` of them (0: the index is exact)."""

    recall: float
    k: int
    sample: int
    exact: bool


def sampled_recall(index, vectors: RowSource, queries: RowSource, got_ids: np.ndarray, k: int,
                   sample: int = 1000, seed: int = 0, exclude_self: bool = True) -> Recall:
    """recall@k of lists an index produced (`got_ids`, rows aligned with `queries`) against exact
    search over `vectors`, on a seeded sample of rows. Exact indexes are not sampled: recall is 1."""
    if is_exact(index):
        return Recall(recall=1.0, k=k, sample=0, exact=True)
    rows = sample_rows(len(queries), sample, seed)
    _, truth = exact_search(vectors, queries[rows], k, own_rows(rows) if exclude_self else None)
    return Recall(recall=round(recall_at_k(got_ids[rows], truth), 4), k=k, sample=int(len(rows)), exact=False)
