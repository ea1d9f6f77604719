"""Exact top-k on a GPU: a block of queries times every vector, exclusions masked, then `topk`.

This is the exact search wherever a GPU is visible: `index.search` sends its exact searches here
(flat indexes, `ExactIndex`, the timing that decides exact against approximate). FAISS's GPU build
is one way to put search on a GPU, but its wheel and CUDA libraries are too large to carry to every
machine; torch is already there for the encoder. The answer is FAISS's exact answer: ``(scores, ids)``,
fp32 products (no TF32), ``-inf``/``-1`` where fewer than k remain (tests/test_device_search.py checks
it against faiss's `knn`, here on the CPU; tests/benchmarks/bench_gpu.py on the GPU).

The vectors are copied to the device once and stay there while the same array is searched (one
resident copy per process); each block of queries takes at most `BLOCK_BYTES` of scores.

`RECS_SEARCH_DEVICE=cpu` keeps exact search on faiss's CPU code even where a GPU is visible.

Example:
    scores, ids = device_top_k(item_vectors, user_vectors, 10, exclude=seen_csr, device="cuda")
"""

from __future__ import annotations

import os
from glob import glob
from typing import Callable

import numpy as np
import scipy.sparse as sp
import xxhash

BLOCK_BYTES = 1 << 30  # fp32 scores of one block of queries against every vector (CPU)
GPU_BLOCK_BYTES = 4 << 30  # on a GPU, at most a quarter of its free memory
_VISIBLE: list[bool] = []
_RESIDENT: dict = {}


def search_device() -> str | None:
    """'cuda' when exact search should run on a GPU (torch sees one, and RECS_SEARCH_DEVICE is not
    'cpu'), else None. A machine without NVIDIA device files never imports torch for this."""
    choice = os.environ.get("RECS_SEARCH_DEVICE", "auto")
    if choice == "cpu":
        return None
    if not _VISIBLE:
        visible = False
        if choice == "cuda" or glob("/dev/nvidia[0-9]*"):
            try:
                import torch

                visible = torch.cuda.is_available()
            except ImportError:
                visible = False
        _VISIBLE.append(visible)
    return "cuda" if _VISIBLE[0] else None


def _fingerprint(vectors) -> tuple:
    """Identity of an array's content, cheaply: its address, shape and a hash of 64 spread rows (an
    array changed in place, or another one at the same address, gets another copy on the device)."""
    rows = np.unique(np.linspace(0, len(vectors) - 1, min(64, len(vectors))).astype(np.int64)) if len(vectors) else []
    sample = np.ascontiguousarray(vectors[rows]).tobytes() if len(rows) else b""
    address = vectors.__array_interface__["data"][0] if isinstance(vectors, np.ndarray) else id(vectors)
    return address, tuple(vectors.shape), xxhash.xxh3_64_hexdigest(sample)


def resident(vectors, device: str):
    """`vectors` as an fp32 tensor on `device`, copied once and reused while the same array is searched."""
    import torch

    key = (_fingerprint(vectors), device)
    if key not in _RESIDENT:
        _RESIDENT.clear()  # one resident array per process: the previous one is freed
        block = 1 << 18
        copy = torch.empty((len(vectors), int(vectors.shape[1])), dtype=torch.float32, device=device)
        for start in range(0, len(vectors), block):  # a row source is read a block at a time
            copy[start:start + block] = torch.from_numpy(np.ascontiguousarray(vectors[start:start + block], np.float32))
        _RESIDENT[key] = copy
    return _RESIDENT[key]


def device_top_k(vectors, queries, k: int, exclude: sp.csr_matrix | None = None, *, device: str = "cuda",
                 progress: Callable[[int], None] | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Exact top-k by inner product of each query (row source) over `vectors` (row source), with
    `exclude` (CSR, row i: the ids query i must not get) masked out. Returns ``(scores, ids)`` as
    numpy, (n_queries, k), best first; ``-inf`` and ``-1`` where fewer than k ids remain."""
    import torch

    if device.startswith("cuda"):  # the exact answer: fp32 products, whatever a caller set for matmuls
        torch.backends.cuda.matmul.allow_tf32 = False
    matrix = resident(vectors, device)
    n, nq = matrix.shape[0], len(queries)
    scores = np.full((nq, k), -np.inf, dtype=np.float32)
    ids = np.full((nq, k), -1, dtype=np.int64)
    take = min(k, n)
    if take == 0 or nq == 0:
        return scores, ids
    budget = BLOCK_BYTES
    if matrix.is_cuda:
        budget = min(GPU_BLOCK_BYTES, torch.cuda.mem_get_info(matrix.device)[0] // 4)
    rows = max(1, min(nq, budget // (4 * n)))
    for start in range(0, nq, rows):
        stop = min(start + rows, nq)
        q = torch.from_numpy(np.ascontiguousarray(queries[start:stop], dtype=np.float32)).to(device)
        sims = q @ matrix.T
        if exclude is not None:
            block = exclude[start:stop]
            if block.nnz:
                who = np.repeat(np.arange(stop - start, dtype=np.int64), np.diff(block.indptr))
                sims[torch.from_numpy(who).to(device), torch.from_numpy(block.indices.astype(np.int64)).to(device)] = -np.inf
        top, where = torch.topk(sims, take, dim=1)  # one pass: two (per 4,096 columns, then over those)
        # were slower on a GPU (docs/performance.md, "GPU")
        top, where = top.cpu().numpy(), where.cpu().numpy()
        scores[start:stop, :take] = top
        ids[start:stop, :take] = np.where(np.isfinite(top), where, -1)
        if progress:
            progress(stop - start)
    return scores, ids

