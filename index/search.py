"""k-NN in blocks, with per-query exclusions (the query item itself, items a user has seen).

Every search returns ``(scores, ids)``, both (n_queries, k); a slot with no result holds id -1 and
score -inf. `exact_search` is the one exact search (faiss's own `knn`, a block of vectors at a time):
the oracle for approximate indexes and the search wherever a few queries meet many vectors. Where a
GPU is visible, every exact search (this one, a flat index's, `ExactIndex`'s) runs there instead, with
the same answer (index/device_search.py).
"""

from __future__ import annotations

from typing import Callable, Sequence

import faiss
import numpy as np
import scipy.sparse as sp
from pydantic import BaseModel

from index.device_search import device_top_k, search_device
from index.rows import RowSource


Exclusions = "sp.csr_matrix | Sequence[np.ndarray] | None"
# A query that excludes more ids than this is searched exactly with its exclusions masked out,
# instead of asking the index for k + that many neighbours (a user with thousands of items seen).
HEAVY = 256


def search_excluding(index, queries: RowSource, k: int, exclude=None, *, vectors: RowSource | None = None,
                     block_size: int = 4096, progress: Callable[[int], None] | None = None
                     ) -> tuple[np.ndarray, np.ndarray]:
    """Top-k ids by inner product for each query, never returning an id in that query's exclusions.

    `exclude`: a CSR matrix (row i: the ids query i excludes) or a sequence of id arrays. Each block
    asks the index for k + (the block's largest exclusion) neighbours and drops the excluded ones for
    the whole block at once, so an exact index returns exactly min(k, n - excluded) results per query.
    Queries that exclude more than HEAVY ids are searched exactly over `vectors` (default: a flat
    index's own vectors) with their exclusions masked. Returns ``(scores, ids)``.
    """
    n, ntotal = len(queries), index.ntotal
    device = search_device() if is_exact(index) else None
    if device is not None:  # every query of an exact search on the GPU, its exclusions masked there
        return device_top_k(flat_vectors(index), queries, k, exclusions(exclude, 0, n, ntotal) if exclude is not None
                            else None, device=device, progress=progress)
    scores = np.full((n, k), -np.inf, dtype=np.float32)
    ids = np.full((n, k), -1, dtype=np.int64)
    vectors = vectors if vectors is not None else flat_vectors(index)
    for start in range(0, n, block_size):
        stop = min(start + block_size, n)
        q = np.ascontiguousarray(queries[start:stop], dtype=np.float32)
        excluded = exclusions(exclude, start, stop, ntotal)
        counts = np.diff(excluded.indptr)
        heavy = counts > HEAVY if vectors is not None else np.zeros(len(q), dtype=bool)
        light = np.flatnonzero(~heavy)
        if len(light) and ntotal:
            want = min(k + int(counts[light].max(initial=0)), ntotal)
            found_scores, found_ids = index.search(q[light] if heavy.any() else q, want)
            block = excluded[light] if heavy.any() else excluded
            s, i = keep_allowed(found_scores, found_ids, block, k, ntotal)
            scores[start + light], ids[start + light] = s, i
        for row in np.flatnonzero(heavy):  # few: at most one per HEAVY+1 excluded ids
            scores[start + row], ids[start + row] = masked_top_k(q[row], vectors, k, excluded.indices[
                excluded.indptr[row]:excluded.indptr[row + 1]])
        if progress:
            progress(stop - start)
    return scores, ids


def exclusions(exclude, start: int, stop: int, n_cols: int) -> sp.csr_matrix:
    """Rows start..stop of `exclude` as a CSR matrix (empty rows when there is none)."""
    if exclude is None:
        return sp.csr_matrix((stop - start, n_cols), dtype=np.int8)
    if sp.issparse(exclude):
        return sp.csr_matrix(exclude[start:stop])
    rows = [np.asarray(r, dtype=np.int64) for r in exclude[start:stop]]
    indptr = np.concatenate([[0], np.cumsum([len(r) for r in rows])])
    indices = np.concatenate(rows) if rows else np.zeros(0, dtype=np.int64)
    return sp.csr_matrix((np.ones(len(indices), dtype=np.int8), indices, indptr), shape=(stop - start, n_cols))


def keep_allowed(found_scores: np.ndarray, found_ids: np.ndarray, excluded: sp.csr_matrix, k: int, n_cols: int
                 ) -> tuple[np.ndarray, np.ndarray]:
    """The first k candidates of each row (already in score order) that are found and not excluded,
    for a whole block at once; -1 / -inf where fewer remain."""
    b, width = found_ids.shape
    valid = found_ids >= 0
    if excluded.nnz:
        rows = np.repeat(np.arange(b, dtype=np.int64), np.diff(excluded.indptr))
        codes = np.arange(b, dtype=np.int64)[:, None] * n_cols + np.where(valid, found_ids, 0)
        valid &= ~np.isin(codes, rows * n_cols + excluded.indices)
    order = np.argsort(~valid, axis=1, kind="stable")[:, :k]  # the valid ones first, in their order
    kept_ids, kept_scores, kept = (np.take_along_axis(a, order, 1) for a in (found_ids, found_scores, valid))
    ids = np.full((b, k), -1, dtype=np.int64)
    scores = np.full((b, k), -np.inf, dtype=np.float32)
    ids[:, :order.shape[1]] = np.where(kept, kept_ids, -1)
    scores[:, :order.shape[1]] = np.where(kept, kept_scores, -np.inf)
    return scores, ids


def masked_top_k(query: np.ndarray, vectors: RowSource, k: int, excluded: np.ndarray, block: int = 1 << 18
                 ) -> tuple[np.ndarray, np.ndarray]:
    """Exact top-k of one query over `vectors` with the `excluded` ids left out, a block at a time."""
    best_scores = np.full(k, -np.inf, dtype=np.float32)
    best_ids = np.full(k, -1, dtype=np.int64)
    for start in range(0, len(vectors), block):
        sims = np.asarray(vectors[start:start + block], dtype=np.float32) @ query
        mine = excluded[(excluded >= start) & (excluded < start + len(sims))] - start
        sims[mine] = -np.inf
        take = min(k, len(sims))
        top = np.argpartition(-sims, take - 1)[:take]
        cand_s = np.concatenate([best_scores, sims[top]])
        cand_i = np.concatenate([best_ids, top + start])
        order = np.argsort(-cand_s, kind="stable")[:k]
        best_scores, best_ids = cand_s[order], cand_i[order]
    return best_scores, np.where(np.isfinite(best_scores), best_ids, -1)


def flat_vectors(index) -> np.ndarray | None:
    """The vectors a flat (exact) FAISS index holds, as a numpy view (no copy); None for other kinds."""
    if isinstance(index, ExactIndex):
        return index.vectors
    flat = faiss.downcast_index(index) if hasattr(index, "this") else None
    if isinstance(flat, faiss.IndexFlat) and flat.ntotal:
        return faiss.rev_swig_ptr(flat.get_xb(), flat.ntotal * flat.d).reshape(flat.ntotal, flat.d)
    return None


class ExactIndex:
    """Exact inner-product search over `vectors` (a row source), read a block at a time: faiss's
    `knn` on each block, the per-block top-k merged. It answers `search(queries, k)` like a FAISS
    index, and holds one block of vectors at a time, never a copy of all of them."""

    def __init__(self, vectors: RowSource, block: int = 65_536):
        self.vectors, self.block = vectors, block
        self.ntotal, self.d = len(vectors), int(vectors.shape[1])

    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        queries = np.ascontiguousarray(queries, dtype=np.float32)
        device = search_device()
        if device is not None:
            return device_top_k(self.vectors, queries, k, device=device)
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


def exact_search(vectors: RowSource, queries: RowSource, k: int, exclude: sp.csr_matrix | Sequence[np.ndarray] | None = None
                 ) -> tuple[np.ndarray, np.ndarray]:
    """Exact top-k by inner product of each query over all `vectors`, `exclude[i]` (an id array, or a
    CSR matrix's row i) left out of query i's results. Returns ``(scores, ids)``.

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
    return recall_on_rows(vectors, queries, rows, got_ids[rows], k, exclude_self)


def recall_on_rows(vectors: RowSource, queries: RowSource, rows: np.ndarray, got_ids: np.ndarray, k: int,
                   exclude_self: bool = True) -> Recall:
    """recall@k of the lists `got_ids` of query rows `rows` (in that order) against exact search."""
    _, truth = exact_search(vectors, queries[rows], k, own_rows(rows) if exclude_self else None)
    return Recall(recall=round(recall_at_k(got_ids, truth), 4), k=k, sample=int(len(rows)), exact=False)
