"""Build a FAISS inner-product index: exact while it is cheap, approximate above a size threshold.

The approximate default is IVF (inverted lists over k-means cells) with about 4·sqrt(n) cells. The
lists are made in large batches of queries, where IVF ran faster than HNSW at the same recall on our
synthetic 100k items: at recall@20 >= 0.95 on overlapping topics, IVF1024 ran 5.4x exact search and
HNSW32 3.4x (tests/benchmarks/bench_index.py). How deep to search is tuned per run (index/tune.py).
"""

from __future__ import annotations

import os
import uuid
from pathlib import Path

import faiss
import numpy as np

EXACT = "Flat"
# k-means for the IVF cells: a sample of this many points per cell and this many iterations (faiss's
# defaults, 256 and 25, took minutes at a million items for no gain in recall that we could measure)
TRAIN_POINTS_PER_CELL = 64
TRAIN_ITERATIONS = 10


def ivf_cells(n_items: int) -> int:
    """The power of two nearest 4·sqrt(n), at least 64: 1024 cells at 100k items, 4096 at a million."""
    return max(64, 2 ** int(round(np.log2(4 * np.sqrt(max(n_items, 1))))))


def choose_factory(n_items: int, kind: str = "auto", exact_below: int = 50_000) -> str:
    """The FAISS factory string to build: 'exact' -> Flat; 'auto' -> Flat below `exact_below` items,
    IVF<cells>,Flat above; anything else is taken as a factory string (e.g. 'HNSW32')."""
    if kind == "exact":
        return EXACT
    if kind == "auto":
        return EXACT if n_items < exact_below else f"IVF{ivf_cells(n_items)},Flat"
    return kind


def gpu_count() -> int:
    """GPUs this faiss build can use (0 for faiss-cpu)."""
    return faiss.get_num_gpus() if hasattr(faiss, "get_num_gpus") else 0


def build_index(vectors: np.ndarray, kind: str = "auto", exact_below: int = 50_000, use_gpu: bool | None = None,
                seed: int = 0):
    """Index `vectors` (n, d) for inner-product search; row i of `vectors` is id i.

    `use_gpu=None` moves a flat index to the GPUs when faiss has any. Example:
        index = build_index(item_vectors)                  # exact for small catalogs
        index = build_index(item_vectors, kind="HNSW32")   # approximate, any size (index/tune.py sets its depth)
    """
    vectors = np.ascontiguousarray(vectors, dtype=np.float32)
    factory = choose_factory(len(vectors), kind, exact_below)
    index = faiss.index_factory(vectors.shape[1], factory, faiss.METRIC_INNER_PRODUCT)
    if not index.is_trained:
        try:
            ivf = faiss.extract_index_ivf(index)
            ivf.cp.max_points_per_centroid, ivf.cp.niter, ivf.cp.seed = TRAIN_POINTS_PER_CELL, TRAIN_ITERATIONS, seed
        except (RuntimeError, AttributeError):
            pass  # not an IVF index
        index.train(vectors)
    index.add(vectors)
    if factory == EXACT and (use_gpu if use_gpu is not None else gpu_count() > 0) and gpu_count() > 0:
        index = faiss.index_cpu_to_all_gpus(index)
    return index


def save_index(index, path: Path | str) -> Path:
    """Write the index (moved back to CPU if needed) to a temporary name, then rename."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if hasattr(faiss, "index_gpu_to_cpu") and gpu_count() > 0:
        try:
            index = faiss.index_gpu_to_cpu(index)
        except (RuntimeError, AttributeError):
            pass  # already a CPU index
    tmp = path.with_name(f"{path.name}.{uuid.uuid4().hex[:8]}.tmp")
    faiss.write_index(index, str(tmp))
    os.replace(tmp, path)
    return path


def load_index(path: Path | str):
    return faiss.read_index(str(path))
