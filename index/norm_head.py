"""An approximate index beside exact search of the head: the documents of largest norm.

The lists search the blended item vectors by inner product, and their norms span about 3,000,000 : 1
(popular items carry long behaviour vectors). Most of every user's list comes from the few longest
documents: at 100k items x 100k users (bench_scale's data), 97.5% of the users' true top 10 were among
the 0.1% longest items. A graph index finds them poorly from a user's profile, a sum over items that
sits far from the items it scores highest (HNSW32 at efSearch 16: users' recall@10 0.81 there, and at
1M no depth reached 0.95). So `NormHead` searches the head exactly and the index for the rest, and
merges the two: the head's exact scores replace whatever the index found of it. The head is a small
share of the items (`index.norm_head`), so its exact search costs that share of exact search's time.

Example:
    index = NormHead.around(build_index(docs, "HNSW32,SQbf16"), docs, share=0.001)
    scores, ids = index.search(queries, 10)     # like a FAISS index: ids are rows of `docs`
"""

from __future__ import annotations

from pathlib import Path

import faiss
import numpy as np

from embedder.artifacts import atomic_path
from index.rows import RowSource

HEAD_SUFFIX = ".head.npz"  # beside the saved index: the head's rows and vectors
NORM_BLOCK = 65_536        # rows whose norms are computed at a time


def head_rows(vectors: RowSource, size: int) -> np.ndarray:
    """The rows of the `size` longest vectors, in row order (norms computed a block at a time)."""
    norms = np.concatenate([np.linalg.norm(np.asarray(vectors[s:s + NORM_BLOCK], dtype=np.float32), axis=1)
                            for s in range(0, len(vectors), NORM_BLOCK)]) if len(vectors) else np.zeros(0, np.float32)
    size = min(size, len(norms))
    return np.sort(np.argpartition(-norms, size - 1)[:size]) if size else np.zeros(0, np.int64)


class NormHead:
    """`body` (a FAISS index over every row, or anything with `search`) and an exact search of the
    rows `rows` (their `vectors`), answering `search(queries, k)` like a FAISS index."""

    def __init__(self, body, rows: np.ndarray, vectors: np.ndarray):
        self.body, self.rows = body, np.asarray(rows, dtype=np.int64)
        self.vectors = np.ascontiguousarray(vectors, dtype=np.float32)
        self.ntotal, self.d = body.ntotal, body.d
        self.in_head = np.zeros(self.ntotal, dtype=bool)
        self.in_head[self.rows] = True

    @classmethod
    def around(cls, body, vectors: RowSource, share: float) -> "NormHead":
        """`body` with the longest `share` of `vectors` (at least one row) searched exactly."""
        rows = head_rows(vectors, max(1, int(round(share * len(vectors)))))
        return cls(body, rows, np.asarray(vectors[rows], dtype=np.float32))

    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        queries = np.ascontiguousarray(queries, dtype=np.float32)
        scores, ids = self.body.search(queries, k)
        scores = np.where((ids >= 0) & self.in_head[np.maximum(ids, 0)], -np.inf, scores)  # the head's come exact
        take = min(k, len(self.rows))
        head_scores, head_ids = faiss.knn(queries, self.vectors, take, metric=faiss.METRIC_INNER_PRODUCT)
        scores = np.hstack([scores, head_scores])
        ids = np.hstack([ids, np.where(head_ids >= 0, self.rows[np.maximum(head_ids, 0)], -1)])
        order = np.argsort(-scores, axis=1, kind="stable")[:, :k]
        scores, ids = np.take_along_axis(scores, order, 1), np.take_along_axis(ids, order, 1)
        return scores, np.where(np.isfinite(scores), ids, -1)

    def save_head(self, index_path: Path | str) -> Path:
        """Write the head beside the body's file (`index_path` + HEAD_SUFFIX)."""
        path = head_path(index_path)
        with atomic_path(path) as tmp:
            with open(tmp, "wb") as fh:
                np.savez(fh, rows=self.rows, vectors=self.vectors)
        return path


def head_path(index_path: Path | str) -> Path:
    return Path(str(index_path) + HEAD_SUFFIX)


def with_saved_head(body, index_path: Path | str):
    """`body` as saved at `index_path`, wrapped in its head when one was saved beside it."""
    path = head_path(index_path)
    if not path.exists():
        return body
    with np.load(path) as saved:
        return NormHead(body, saved["rows"], saved["vectors"])
