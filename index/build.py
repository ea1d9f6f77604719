"""Build a FAISS inner-product index: exact while it is cheap, approximate above a size threshold."""

from __future__ import annotations

import os
import uuid
from pathlib import Path

import faiss
import numpy as np

EXACT = "Flat"
APPROXIMATE = "HNSW32"


def choose_factory(n_items: int, kind: str = "auto", exact_below: int = 50_000) -> str:
    """The FAISS factory string to build: 'exact' -> Flat; 'auto' -> Flat below `exact_below` items,
    HNSW32 above; anything else is taken as a factory string (e.g. 'IVF1024,Flat')."""
    if kind == "exact":
        return EXACT
    if kind == "auto":
        return EXACT if n_items < exact_below else APPROXIMATE
    return kind


def gpu_count() -> int:
    """GPUs this faiss build can use (0 for faiss-cpu)."""
    return faiss.get_num_gpus() if hasattr(faiss, "get_num_gpus") else 0


def build_index(vectors: np.ndarray, kind: str = "auto", exact_below: int = 50_000, use_gpu: bool | None = None,
                hnsw_ef_search: int = 64):
    """Index `vectors` (n, d) for inner-product search; row i of `vectors` is id i.

    `use_gpu=None` moves a flat index to the GPUs when faiss has any. Example:
        index = build_index(item_vectors)                  # exact for small catalogs
        index = build_index(item_vectors, kind="HNSW32")   # approximate, any size
    """
    vectors = np.ascontiguousarray(vectors, dtype=np.float32)
    factory = choose_factory(len(vectors), kind, exact_below)
    index = faiss.index_factory(vectors.shape[1], factory, faiss.METRIC_INNER_PRODUCT)
    if not index.is_trained:
        index.train(vectors)
    index.add(vectors)
    if hasattr(index, "hnsw"):
        index.hnsw.efSearch = hnsw_ef_search
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
