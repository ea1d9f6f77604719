"""Build a FAISS inner-product index: exact while it is cheap, approximate above a size threshold.

The approximate default is HNSW32 over vectors stored in bfloat16 (`HNSW32,SQbf16`): half the memory
of float32 with float32's range. float16 has the precision but not the range: EASE's document side of a
few very popular items reaches 1e5 times the typical norm at a low rank (96,108 times the 99th
percentile at 300k items, rank 111), which float16 stores as infinite (at 1M items such an index made
the user lists near random and the quality gate stopped the run; build_index refuses such values for
SQfp16). Capping those norms instead cut the 300k gate's nDCG@10 from 0.084 to 0.001: they are how the
model ranks popular items. On 100k synthetic items (bench_index.py, 10k queries, k=20) bfloat16 was
tuned to the same efSearch as float32 (48) with recall@20 0.981 against 0.982, searched 1.34x faster
and built and tuned in 7.5 s against 10.4 s.
IVF (e.g. `IVF1024,SQfp16`) searched item->item queries faster (15x exact at recall 0.96-0.97 on 100k synthetic items, against 2-5x for HNSW), but user profiles,
which are sums over items, fall between its cells: on 60k synthetic items with a heavy popularity
tail, IVF1024 found 18% of users' true top 10 at nprobe 64, HNSW32 81% at efSearch 64 and 94% at
256. How deep to search is tuned per run on both kinds of query (index/tune.py).
"""

from __future__ import annotations

import os
import uuid
from pathlib import Path

import faiss
import numpy as np

EXACT = "Flat"
APPROXIMATE = "HNSW32,SQbf16"
FLOAT16_MAX = 65504.0
# k-means for IVF cells (an IVF factory string): up to 256 points per cell (faiss's default) and 10 iterations instead of 25.
# On 100k overlapping synthetic topics, 64 points per cell needed nprobe 32 for recall 0.95 where 256
# needed 2; 25 iterations gained 0.009 recall at the same nprobe for twice the training time.
TRAIN_POINTS_PER_CELL = 256
TRAIN_ITERATIONS = 10
TRAIN_SAMPLE = 262_144   # rows trained on at most (all of them up to 1024 cells; 64 per cell at 4096)
ADD_BLOCK = 32_768       # rows added at a time: the vectors may be computed on demand (recommend.ranking.blend.Rows)


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
    """The IVF part of `index` (also inside an IndexPreTransform), or None for other kinds."""
    try:
        return faiss.extract_index_ivf(index)
    except (RuntimeError, AttributeError):
        return None


def build_index(vectors, kind: str = "auto", exact_below: int = 50_000, use_gpu: bool | None = None,
                seed: int = 0):
    """Index `vectors` (n, d) for inner-product search; row i of `vectors` is id i. `vectors` may be
    an array or rows computed on demand (recommend.ranking.blend.Rows): it is read a block at a time, and
    trained on a seeded sample of at most TRAIN_SAMPLE rows, so that the index is the only full copy.

    `use_gpu=None` moves a flat index to the GPUs when faiss has any. Example:
        index = build_index(item_vectors)                  # exact for small catalogs
        index = build_index(item_vectors, kind="HNSW32")   # approximate, any size (index/tune.py sets its depth)
    """
    n, d = len(vectors), int(vectors.shape[1])
    factory = choose_factory(n, kind, exact_below)
    padded = -(-d // 8) * 8
    if "SQ" in factory and padded != d:
        # faiss's scalar quantizer codes are vectorised for 8 dimensions at a time: at 641 dimensions an
        # HNSW32,SQfp16 build of 20k vectors took 91 s, at 640 it took 7.6 s. Zero dimensions pad the
        # vectors (and each query, inside the index) to a multiple of 8 without changing any score.
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
