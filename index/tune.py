"""Tune an approximate index's search depth to a recall target, measured against exact search.

An IVF index looks in `nprobe` of its cells and an HNSW graph keeps `efSearch` candidates: deeper is
slower and finds more of the true neighbours. How deep is enough depends on the data and on the
queries (on synthetic 100k items, IVF1024 needed nprobe 1 for item queries on well-separated topics
and 2 on overlapping ones; user profiles need more), so the refresh measures it: the smallest depth whose recall@k on a seeded sample of queries reaches
the target. The sample is not the one `sampled_recall` reports on, so the reported recall is unbiased.

Example:
    index, tuning = build_tuned(docs, queries, k=20, settings=IndexSettings(target_recall=0.95))
    tuning   # {"knob": "efSearch", "value": 64, "recall": 0.958, "reached": True, ...}
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np

from index.build import build_index, ivf_of
from index.search import exact_top_k, is_exact, recall_at_k, sample_rows, search_excluding

log = logging.getLogger("recs")

IVF_DEPTHS = (1, 2, 4, 6, 8, 12, 16, 24, 32, 48, 64, 96, 128, 192, 256, 384, 512)
HNSW_DEPTHS = (16, 24, 32, 48, 64, 96, 128, 192, 256, 384, 512)
# No depth reaches the target: the smallest depth within this much recall@k of the best one tried.
# Searching all items and all users at the deepest depth (efSearch 512) took over 45 minutes at 1M
# items on 2 cores, for the last hundredth of recall.
PLATEAU = 0.01


def _hnsw(index):
    """The HNSW graph of `index` (also inside a padding IndexPreTransform), or None."""
    import faiss

    if isinstance(index, faiss.IndexPreTransform):
        index = faiss.downcast_index(index.index)
    return getattr(index, "hnsw", None)


def depth_knob(index) -> tuple[str, tuple[int, ...]] | None:
    """('nprobe', candidates) for IVF, ('efSearch', candidates) for HNSW, None for others. IVF stops
    at a 16th of its cells: deeper, a scan of that many vectors one query at a time is no faster than
    exact search by matrix products (nprobe 512 of 1024 ran at 0.37x exact on 100k items)."""
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


def tune_depth(index, vectors, queries, k: int, target: float, sample: int = 500, seed: int = 1,
               other_queries=None, other_rows: np.ndarray | None = None) -> dict:
    """Set the smallest search depth whose recall@k reaches `target` on a sample of `queries` (each
    query's own row excluded, as in the item lists) and, when given, on a sample of `other_queries`
    (user profiles, from `other_rows`, no exclusion). When none does, the smallest depth within
    PLATEAU of the best recall tried.
    Both matter: on 300k synthetic items a depth tuned on item queries alone left the user lists
    near random (nDCG@10 0.0008 against 0.084 for exact search), because a user's profile is a
    sum over items and falls in other cells than any one item does."""
    knob = depth_knob(index)
    if is_exact(index) or knob is None:
        return {"knob": None, "exact": is_exact(index)}
    name, candidates = knob
    rows = sample_rows(len(queries), sample, seed)
    sets = [(np.ascontiguousarray(queries[rows], dtype=np.float32), rows, [np.array([r]) for r in rows])]
    if other_queries is not None:
        pool = np.arange(len(other_queries)) if other_rows is None else np.asarray(other_rows)
        if len(pool):
            picked = pool[sample_rows(len(pool), sample, seed)]
            sets.append((np.ascontiguousarray(other_queries[picked], dtype=np.float32), None, None))
    truths = [exact_top_k(vectors, q, k, own_rows) for q, own_rows, _ in sets]
    tried: dict[int, float] = {}
    for value in candidates:
        set_depth(index, value)
        tried[value] = round(min(recall_at_k(search_excluding(index, q, k, exclude)[1], truth)
                                 for (q, _, exclude), truth in zip(sets, truths)), 4)
        if tried[value] >= target:
            break
    if tried[value] < target:  # not reached: deeper than the plateau costs time and buys almost nothing
        best = max(tried.values())
        value = min(v for v, r in tried.items() if r >= best - PLATEAU)
        set_depth(index, value)
    return {"knob": name, "value": value, "recall": tried[value], "target": target, "reached": tried[value] >= target,
            "sample": int(sum(len(q) for q, _, _ in sets)), "query_sets": len(sets), "tried": tried}


@dataclass(frozen=True)
class IndexSettings:
    """Which index to build and how deep to search it (config: the index section)."""

    kind: str = "auto"               # auto | exact | a FAISS factory string
    exact_below: int = 50_000        # auto: exact search below this many items
    target_recall: float | None = 0.95  # tune the depth to this recall@k; None: use `depth`
    depth: int | None = None         # a fixed nprobe / efSearch when target_recall is None
    exact_fallback_below: int = 100_000  # target not reached: exact search below this many items, else the plateau depth


EXACT_INDEX = IndexSettings(kind="exact")


def build_tuned(vectors, queries, k: int, settings: IndexSettings = IndexSettings(), other_queries=None,
                other_rows: np.ndarray | None = None):
    """`build_index`, then its search depth: tuned to `settings.target_recall` at k, or fixed. When
    no depth worth searching reaches the target (data with little structure), the index is exact
    instead below `exact_fallback_below` items; above it the depth where recall stops growing (within
    PLATEAU of the best tried) stays, with a warning. `tuning["fallback"]` says which. `queries` are the item->item queries (row i is item
    i's); `other_queries` (rows `other_rows`), the user profiles, are tuned for too: the recall is the
    lower of the two. Returns ``(index, tuning)``."""
    index = build_index(vectors, settings.kind, settings.exact_below)
    if settings.target_recall is None or depth_knob(index) is None:
        if settings.depth is not None:
            set_depth(index, settings.depth)
        return index, {"knob": (depth_knob(index) or (None,))[0], "value": settings.depth, "exact": is_exact(index)}
    tuning = tune_depth(index, vectors, queries, k, settings.target_recall, other_queries=other_queries,
                        other_rows=other_rows)
    if not tuning["reached"] and len(vectors) < settings.exact_fallback_below:
        del index  # no depth that pays reaches the target on this data: search exactly instead
        index = build_index(vectors, "exact")
        tuning["fallback"] = "exact"
    elif not tuning["reached"]:  # exact search of every item against every item would take hours
        tuning["fallback"] = "plateau"
        log.warning("index: recall@%d reached %.3f at %s=%s, below the target %.2f; exact search is not used "
                    "above %d items (index.exact_fallback_below)", k, tuning["recall"], tuning["knob"],
                    tuning["value"], settings.target_recall, settings.exact_fallback_below)
    return index, tuning
