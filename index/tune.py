"""Tune an approximate index's search depth to a recall target, measured against exact search.

An IVF index looks in `nprobe` of its cells and an HNSW graph keeps `efSearch` candidates: deeper is
slower and finds more of the true neighbours. How deep is enough depends on the data and on the
queries (user profiles, sums over items, need more than item queries), so each run measures it: the
smallest depth whose recall@k on a seeded sample of queries reaches the target. The sample is not the
one `sampled_recall` reports on, so the reported recall is unbiased.

Example:
    index, tuning = build_tuned(docs, queries, k=20, settings=IndexSettings(target_recall=0.95))
    tuning.knob, tuning.value, tuning.recall, tuning.reached    # "efSearch", 64, 0.958, True
"""

from __future__ import annotations

import logging
from typing import Callable, Literal

import numpy as np
from pydantic import BaseModel, Field

from index.build import build_index, ivf_of
from index.rows import RowSource
from index.settings import IndexSettings
from index.search import exact_search, is_exact, own_rows, recall_at_k, sample_rows, search_excluding

log = logging.getLogger("recs")

IVF_DEPTHS = (1, 2, 4, 6, 8, 12, 16, 24, 32, 48, 64, 96, 128, 192, 256, 384, 512)
HNSW_DEPTHS = (16, 24, 32, 48, 64, 96, 128, 192, 256, 384, 512)
# No depth reaches the target: the smallest depth within this much recall@k of the best one tried
# (searching every item and user at the deepest depth costs far more than the last hundredth buys).
PLATEAU = 0.01


class Tuning(BaseModel):
    """How deep an index is searched, and why. `knob` is None for an exact index or a kind without one."""

    knob: Literal["nprobe", "efSearch"] | None = None
    value: int | None = None       # the depth set (None: faiss's default)
    exact: bool = False            # the index searches exactly
    recall: float | None = None    # recall@k at `value`, the lower of the query sets
    target: float | None = None
    reached: bool | None = None
    sample: int | None = None      # queries the recall was measured on
    query_sets: int | None = None  # 1: item queries; 2: and user profiles
    tried: dict[int, float] = Field(default_factory=dict)  # depth -> recall@k, in the order tried
    fallback: Literal["exact", "plateau"] | None = None    # the target was not reached: what was done instead


def _hnsw(index):
    """The HNSW graph of `index` (also inside a padding IndexPreTransform), or None."""
    import faiss

    if isinstance(index, faiss.IndexPreTransform):
        index = faiss.downcast_index(index.index)
    return getattr(index, "hnsw", None)


def depth_knob(index) -> tuple[str, tuple[int, ...]] | None:
    """('nprobe', candidates) for IVF, ('efSearch', candidates) for HNSW, None for others. IVF stops
    at a 16th of its cells: deeper, a scan of that many vectors one query at a time is no faster than
    exact search by matrix products."""
    ivf = ivf_of(index)
    if ivf is not None:
        return "nprobe", tuple(v for v in IVF_DEPTHS if v <= max(1, ivf.nlist // 16))
    if _hnsw(index) is not None:
        return "efSearch", HNSW_DEPTHS
    return None


def set_depth(index, value: int) -> None:
    ivf = ivf_of(index)
    if ivf is not None:
        ivf.nprobe = int(value)
    elif _hnsw(index) is not None:
        _hnsw(index).efSearch = int(value)


def tune_depth(index, vectors: RowSource, queries: RowSource, k: int, target: float, sample: int = 500, seed: int = 1,
               other_queries: RowSource | None = None, other_rows: np.ndarray | None = None,
               progress: Callable[[int], None] | None = None) -> Tuning:
    """Set the smallest search depth whose recall@k reaches `target` on a sample of `queries` (each
    query's own row excluded, as in the item lists) and, when given, on a sample of `other_queries`
    (user profiles, from `other_rows`, no exclusion). When none does, the smallest depth within
    PLATEAU of the best recall tried. Both query sets matter: a user's profile is a sum over items and
    falls in other cells than any one item does, so a depth tuned on items alone can leave the user
    lists near random. `progress(1)` ticks per depth tried."""
    knob = depth_knob(index)
    if is_exact(index) or knob is None:
        return Tuning(exact=is_exact(index))
    name, candidates = knob
    rows = sample_rows(len(queries), sample, seed)
    sets = [(np.ascontiguousarray(queries[rows], dtype=np.float32), own_rows(rows))]
    if other_queries is not None:
        pool = np.arange(len(other_queries)) if other_rows is None else np.asarray(other_rows)
        if len(pool):
            picked = pool[sample_rows(len(pool), sample, seed)]
            sets.append((np.ascontiguousarray(other_queries[picked], dtype=np.float32), None))
    truths = [exact_search(vectors, q, k, exclude)[1] for q, exclude in sets]
    tried: dict[int, float] = {}
    for value in candidates:
        set_depth(index, value)
        tried[value] = round(min(recall_at_k(search_excluding(index, q, k, exclude)[1], truth)
                                 for (q, exclude), truth in zip(sets, truths)), 4)
        if progress:
            progress(1)
        if tried[value] >= target:
            break
    if tried[value] < target:  # not reached: deeper than the plateau costs time and buys almost nothing
        best = max(tried.values())
        value = min(v for v, r in tried.items() if r >= best - PLATEAU)
        set_depth(index, value)
    return Tuning(knob=name, value=value, recall=tried[value], target=target, reached=tried[value] >= target,
                  sample=int(sum(len(q) for q, _ in sets)), query_sets=len(sets), tried=tried)


def build_tuned(vectors: RowSource, queries: RowSource | None, k: int, settings: IndexSettings = IndexSettings(),
                other_queries: RowSource | None = None, other_rows: np.ndarray | None = None,
                progress: Callable[[str, int], Callable[[int], None]] | None = None):
    """`build_index`, then its search depth: tuned to `settings.target_recall` at k, or fixed. When
    no depth worth searching reaches the target (data with little structure), the index is exact
    instead below `exact_fallback_below` items; above it the depth where recall stops growing (within
    PLATEAU of the best tried) stays, with a warning. `queries` are the item->item queries (row i is
    item i's); `other_queries` (rows `other_rows`), the user profiles, are tuned for too: the recall
    is the lower of the two. `progress(description, total)` makes a progress callback for each step.
    Returns ``(index, Tuning)``."""
    bar = progress or (lambda description, total: None)
    index = build_index(vectors, settings.kind, settings.exact_below, progress=bar("building", len(vectors)))
    if settings.target_recall is None or depth_knob(index) is None:
        if settings.search_depth is not None:
            set_depth(index, settings.search_depth)
        return index, Tuning(knob=(depth_knob(index) or (None,))[0], value=settings.search_depth, exact=is_exact(index))
    name, candidates = depth_knob(index)
    tuning = tune_depth(index, vectors, queries, k, settings.target_recall, other_queries=other_queries,
                        other_rows=other_rows, progress=bar(f"tuning {name}", len(candidates)))
    if not tuning.reached and len(vectors) < settings.exact_fallback_below:
        del index  # no depth that pays reaches the target on this data: search exactly instead
        index = build_index(vectors, "exact")
        tuning.fallback = "exact"
    elif not tuning.reached:  # exact search of every item against every item would take hours
        tuning.fallback = "plateau"
        log.warning("index: recall@%d reached %.3f at %s=%s, below the target %.2f; exact search is not used "
                    "above %d items (index.exact_fallback_below)", k, tuning.recall, tuning.knob,
                    tuning.value, settings.target_recall, settings.exact_fallback_below)
    return index, tuning
