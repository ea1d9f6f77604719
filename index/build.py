"""Build a FAISS inner-product index: exact while it is cheap, approximate above a size threshold.

The approximate default is HNSW32 over vectors stored in bfloat16 (`HNSW32,SQbf16`): half the memory
of float32 with float32's range. float16 has the precision but not the range: the behaviour model's
document side of a few very popular items can reach 1e5 times the typical norm, which float16 stores
as infinite (build_index refuses such values for SQfp16). Capping those norms is no way out: they are
how the model ranks popular items. IVF (e.g. `IVF1024,SQfp16`) is faster for item->item queries, but
user profiles, which are sums over items, fall between its cells. How deep to search is tuned per run
on both kinds of query (index/tune.py); docs/performance.md has the measurements.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable

import faiss
import numpy as np

from embedder.artifacts import atomic_path
from index.norm_head import NormHead, head_path, with_saved_head
from index.rows import RowSource

EXACT = "Flat"
APPROXIMATE = "HNSW32,SQbf16"
FLOAT16_MAX = 65504.0
# k-means for IVF cells (an IVF factory string): up to 256 points per cell (faiss's default; fewer
# trained cells that needed a far deeper nprobe for the same recall) and 10 iterations instead of 25
# (the training time grows with the iterations, the recall almost not).
TRAIN_POINTS_PER_CELL = 256
TRAIN_ITERATIONS = 10
TRAIN_SAMPLE = 262_144   # rows trained on at most (all of them up to 1024 cells; 64 per cell at 4096)
ADD_BLOCK = 32_768       # rows added at a time: the vectors may be computed on demand (index.rows.Rows)


def choose_factory(n_items: int, kind: str = "auto", exact_below: int = 50_000) -> str:
    """The FAISS factory string to build: 'exact' -> Flat; 'auto' -> Flat below `exact_below` items,
    APPROXIMATE (HNSW32 over bfloat16) above; anything else is taken as a factory string (e.g. 'IVF1024,SQfp16')."""
    if kind == "exact":
        return EXACT
    if kind == "auto":
        return EXACT if n_items < exact_below else APPROXIMATE
    return kind


def gpu_count() -> int:
    """GPUs this faiss build can use (0 for faiss-cpu)."""
    return faiss.get_num_gpus() if hasattr(faiss, "get_num_gpus") else 0


def ivf_of(index):
    """The IVF part of `index` (also inside an IndexPreTransform or a NormHead), or None for other kinds."""
    index = getattr(index, "body", index)
    try:
        return faiss.extract_index_ivf(index)
    except (RuntimeError, AttributeError):
        return None


def build_index(vectors: RowSource, kind: str = "auto", exact_below: int = 50_000, use_gpu: bool | None = None,
                seed: int = 0, progress: Callable[[int], None] | None = None):
    """Index `vectors` (n, d) for inner-product search; row i of `vectors` is id i. `vectors` is a row
    source (index/rows.py): it is read a block at a time, and trained on a seeded sample of at most
    TRAIN_SAMPLE rows, so that the index is the only full copy. `progress(n)` ticks per block added.

    `use_gpu=None` moves a flat index to the GPUs when faiss has any. Example:
        index = build_index(item_vectors)                  # exact for small catalogs
        index = build_index(item_vectors, kind="HNSW32")   # approximate, any size (index/tune.py sets its depth)
    """
    n, d = len(vectors), int(vectors.shape[1])
    factory = choose_factory(n, kind, exact_below)
    padded = -(-d // 8) * 8
    if "SQ" in factory and padded != d:
        # faiss's scalar quantizer codes are vectorised for 8 dimensions at a time: at an odd dimension
        # that vectorised path is lost and a build is far slower. Zero dimensions pad the vectors (and
        # each query, inside the index) to a multiple of 8 without changing any score.
        inner = faiss.index_factory(padded, factory, faiss.METRIC_INNER_PRODUCT)
        index = faiss.IndexPreTransform(faiss.RemapDimensionsTransform(d, padded, False), inner)
    else:
        index = faiss.index_factory(d, factory, faiss.METRIC_INNER_PRODUCT)
    if not index.is_trained:
        ivf = ivf_of(index)
        if ivf is not None:
            ivf.cp.max_points_per_centroid, ivf.cp.niter, ivf.cp.seed = TRAIN_POINTS_PER_CELL, TRAIN_ITERATIONS, seed
        rows = np.sort(np.random.default_rng(seed).choice(n, TRAIN_SAMPLE, replace=False)) if n > TRAIN_SAMPLE else slice(None)
        index.train(np.ascontiguousarray(vectors[rows], dtype=np.float32))
    for start in range(0, n, ADD_BLOCK):
        block = np.ascontiguousarray(vectors[start:start + ADD_BLOCK], dtype=np.float32)
        if "SQfp16" in factory and len(block) and np.abs(block).max() > FLOAT16_MAX:
            raise ValueError(f"index {factory}: a vector value {np.abs(block).max():.3g} is beyond float16's range "
                             f"({FLOAT16_MAX:g}) and would score as infinite; use HNSW32,SQbf16 (float32's range) or HNSW32")
        index.add(block)
        if progress:
            progress(len(block))
    if factory == EXACT and (use_gpu if use_gpu is not None else gpu_count() > 0) and gpu_count() > 0:
        index = faiss.index_cpu_to_all_gpus(index)
    return index


def save_index(index, path: Path | str) -> Path:
    """Write the index (moved back to CPU if needed) to a temporary name, then rename; a `NormHead`
    writes its head beside it (index/norm_head.py), any other index removes a head left there."""
    path = Path(path)
    if isinstance(index, NormHead):
        index.save_head(path)
        index = index.body
    else:
        head_path(path).unlink(missing_ok=True)
    if hasattr(faiss, "index_gpu_to_cpu") and gpu_count() > 0:
        try:
            index = faiss.index_gpu_to_cpu(index)
        except (RuntimeError, AttributeError):
            pass  # already a CPU index
    with atomic_path(path) as tmp:
        faiss.write_index(index, tmp)
    return path


def load_index(path: Path | str, mmap: bool = False):
    """The index saved at `path`. `mmap`: its vectors (codes) are mapped from the file, not copied, so
    that processes on one host share one copy in the page cache (the lists' blocks on the workers read
    and hold the index once per host, not once per worker); the file must then stay as it is. With
    the head saved beside it, a `NormHead`."""
    return with_saved_head(faiss.read_index(str(path), faiss.IO_FLAG_MMAP_IFC if mmap else 0), path)
