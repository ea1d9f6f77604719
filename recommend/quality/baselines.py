"""Reference rankers for offline evaluation, trained on the same training part as the lists:
item-kNN (cosine between items over who touched them) and implicit's ALS (when the `implicit`
package is installed: it is a benchmark dependency, `pip install -e ".[bench]"`, not a runtime one).

Both return (users, k) item rows with each user's seen items left out, as `rank_users` does.
"""

from __future__ import annotations

import numpy as np
import scipy.sparse as sp

from index.search import keep_allowed

BLOCK = 1024  # users scored at a time


def top_k_scores(score_block, seen: sp.csr_matrix, k: int) -> np.ndarray:
    """Top-k item rows of each row of a dense (users, items) score block, `seen` masked out."""
    scores = np.asarray(score_block, dtype=np.float32)
    coo = seen.tocoo()
    scores[coo.row, coo.col] = -np.inf
    take = min(k, scores.shape[1])
    top = np.argpartition(-scores, take - 1, axis=1)[:, :take]
    order = np.argsort(-np.take_along_axis(scores, top, 1), axis=1, kind="stable")
    ranked = np.take_along_axis(top, order, 1)
    return np.where(np.isfinite(np.take_along_axis(scores, ranked, 1)), ranked, -1)


def item_knn(binary: sp.csr_matrix, k: int, neighbours: int = 100) -> np.ndarray:
    """Item-kNN: each item keeps its `neighbours` most cosine-similar items (over the users who
    touched them); a user's score for an item sums its similarity to the user's items."""
    gram = (binary.T @ binary).tocsc().astype(np.float32)
    norms = np.sqrt(np.maximum(gram.diagonal(), 1e-12))
    gram = sp.diags(1 / norms) @ gram @ sp.diags(1 / norms)
    gram.setdiag(0)
    gram = sp.csc_matrix(gram)
    gram.eliminate_zeros()
    for j in np.flatnonzero(np.diff(gram.indptr) > neighbours):  # keep each column's strongest neighbours
        start, stop = gram.indptr[j], gram.indptr[j + 1]
        cut = np.argpartition(-gram.data[start:stop], neighbours - 1)[neighbours:]
        gram.data[start + cut] = 0
    gram.eliminate_zeros()
    out = np.full((binary.shape[0], k), -1, dtype=np.int64)
    for start in range(0, binary.shape[0], BLOCK):
        rows = slice(start, start + BLOCK)
        out[rows] = top_k_scores((binary[rows] @ gram).toarray(), binary[rows], k)
    return out


def implicit_als(binary: sp.csr_matrix, k: int, factors: int = 64, iterations: int = 15) -> np.ndarray | None:
    """implicit's AlternatingLeastSquares on the binary matrix, its own `recommend` with already-liked
    items filtered; None when the package is not installed."""
    try:
        import implicit
        from threadpoolctl import threadpool_limits
    except ImportError:
        return None
    with threadpool_limits(1, "blas"):
        model = implicit.als.AlternatingLeastSquares(factors=factors, iterations=iterations, random_state=0)
        model.fit(sp.csr_matrix(binary, dtype=np.float32), show_progress=False)
        ids, _ = model.recommend(np.arange(binary.shape[0]), sp.csr_matrix(binary, dtype=np.float32), N=k,
                                 filter_already_liked_items=True)
    ids = np.asarray(ids, dtype=np.int64)
    return keep_allowed(np.zeros(ids.shape, np.float32), ids, sp.csr_matrix(binary), k, binary.shape[1])[1]
