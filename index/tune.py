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
import time
from typing import Callable, Literal

import numpy as np
from pydantic import BaseModel, Field

from index.build import APPROXIMATE, build_index, ivf_of
from index.norm_head import NormHead
from index.rows import RowSource
from index.settings import IndexSettings
from index.search import exact_search, flat_vectors, is_exact, own_rows, recall_at_k, sample_rows, search_excluding

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
    recall_by_set: dict[str, float] = Field(default_factory=dict)  # "items", "users": each set's recall@k at `value`
    norm_head: int = 0             # rows searched exactly beside the index (index/norm_head.py)
    target: float | None = None
    reached: bool | None = None
    sample: int | None = None      # queries the recall was measured on
    query_sets: int | None = None  # 1: item queries; 2: and user profiles
    tried: dict[int, float] = Field(default_factory=dict)  # depth -> recall@k, in the order tried
    fallback: Literal["exact", "plateau"] | None = None    # the approximate index did not pay: what was done instead
    seconds_per_query: float | None = None  # search time at `value`, measured on the tuning sample
    exact_estimate_s: float | None = None   # exact search of every query, estimated from a timed sample
    approx_estimate_s: float | None = None  # the approximate index's build, tuning and search of every query
    decision: str | None = None             # what was chosen, and why


def _hnsw(index):
    """The HNSW graph of `index` (also inside a padding IndexPreTransform or a NormHead), or None."""
    import faiss

    index = getattr(index, "body", index)
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


TUNE_SAMPLE = 500  # queries of each set the depth is tuned on


def tuning_sets(queries: RowSource, other_queries: RowSource | None = None, other_rows: np.ndarray | None = None,
                sample: int = TUNE_SAMPLE, seed: int = 1) -> list[tuple[np.ndarray, object]]:
    """The query sets a depth is tuned on, each (queries, rows to exclude): a sample of `queries`
    (each query's own row excluded, as in the item lists) and, when given, a sample of `other_queries`
    (user profiles, from `other_rows`, no exclusion). Both matter: a user's profile is a sum over items
    and falls in other cells than any one item does, so a depth tuned on items alone can leave the
    user lists near random."""
    rows = sample_rows(len(queries), sample, seed)
    sets = [(np.ascontiguousarray(queries[rows], dtype=np.float32), own_rows(rows))]
    if other_queries is not None:
        pool = np.arange(len(other_queries)) if other_rows is None else np.asarray(other_rows)
        if len(pool):
            picked = pool[sample_rows(len(pool), sample, seed)]
            sets.append((np.ascontiguousarray(other_queries[picked], dtype=np.float32), None))
    return sets


def tune_depth(index, vectors: RowSource, sets: list[tuple[np.ndarray, object]], k: int, target: float, *,
               progress: Callable[[int], None] | None = None, slowest: float | None = None) -> Tuning:
    """Set the smallest search depth whose recall@k reaches `target` on every one of the query `sets`
    (`tuning_sets`). When none does, the smallest depth within PLATEAU of the best recall tried.
    `progress(1)` ticks per depth tried. `slowest`: seconds per query beyond which deeper depths are
    not tried (exact search's): the index would only be slower than exact search."""
    knob = depth_knob(index)
    if is_exact(index) or knob is None:
        return Tuning(exact=is_exact(index))
    name, candidates = knob
    truths = [exact_search(vectors, q, k, exclude)[1] for q, exclude in sets]
    tried: dict[int, float] = {}
    by_set: dict[int, list[float]] = {}
    seconds: dict[int, float] = {}
    n_sample = sum(len(q) for q, _ in sets)
    for value in candidates:
        set_depth(index, value)
        start = time.perf_counter()
        found = [search_excluding(index, q, k, exclude)[1] for q, exclude in sets]
        seconds[value] = (time.perf_counter() - start) / max(n_sample, 1)
        by_set[value] = [round(recall_at_k(got, truth), 4) for got, truth in zip(found, truths)]
        tried[value] = min(by_set[value])
        if progress:
            progress(1)
        if tried[value] >= target or (slowest is not None and seconds[value] > slowest):
            break
    if tried[value] < target:  # not reached: deeper than the plateau costs time and buys almost nothing
        best = max(tried.values())
        value = min(v for v, r in tried.items() if r >= best - PLATEAU)
        set_depth(index, value)
    return Tuning(knob=name, value=value, recall=tried[value], target=target, reached=tried[value] >= target,
                  sample=int(n_sample), query_sets=len(sets), tried=tried, seconds_per_query=seconds[value],
                  recall_by_set=dict(zip(("items", "users"), by_set[value])),
                  norm_head=len(getattr(index, "rows", ())))


EXACT_SAMPLE = 2048   # queries timed to estimate what exact search of all of them costs
BUILD_SAMPLE = 20_000  # vectors an approximate index is built on first, to estimate its full build
HEADROOM = 3.0  # an approximate index is tried only where exact search costs this many times its build:
# its tuning and its own search must fit in what is left


def build_tuned(vectors: RowSource, queries: RowSource | None, k: int, settings: IndexSettings = IndexSettings(),
                other_queries: RowSource | None = None, other_rows: np.ndarray | None = None,
                progress: Callable[[str, int], Callable[[int], None]] | None = None,
                n_searches: int | None = None):
    """The index the lists will be searched with, exact or approximate, decided by measuring.

    Exact search (a flat index) is built first and timed on a sample of the real queries; its cost for
    all `n_searches` queries (default: every item query and every user profile) is the baseline. With
    `kind: auto` an approximate index (HNSW32 over bfloat16) is built only when its estimated build
    alone costs less than exact search would, and kept only when it reaches `target_recall` and its
    build, tuning and search together cost less. When no depth reaches the target, exact search is
    used if it fits `exact_budget_s`; otherwise the depth where recall stops growing stays, with a
    warning. A factory string in `kind` is built and tuned the same way. `queries` are the item->item
    queries (row i is item i's); `other_queries` (rows `other_rows`) the user profiles: the recall is
    the lower of the two. `progress(description, total)` makes a progress callback for each step.
    Returns ``(index, Tuning)``; `Tuning.decision` says what was chosen and why."""
    bar = progress or (lambda description, total: None)
    n_other = len(other_rows) if other_rows is not None else (len(other_queries) if other_queries is not None else 0)
    n_searches = n_searches if n_searches is not None else (len(queries) if queries is not None else 0) + n_other
    flat = build_index(vectors, "exact", progress=bar("building", len(vectors)))
    if settings.kind == "exact":
        return flat, Tuning(exact=True, decision="exact: index.kind is exact")
    exact_s = _exact_seconds(flat, queries, other_queries, other_rows, k) * n_searches
    factory = APPROXIMATE if settings.kind == "auto" else settings.kind
    stored = flat_vectors(flat)
    if settings.kind == "auto":
        build_estimate = _build_seconds(stored, factory)
        if HEADROOM * build_estimate >= exact_s:
            return flat, Tuning(exact=True, exact_estimate_s=round(exact_s, 1), decision=(
                f"exact: searching all {n_searches} queries exactly (about {exact_s:.0f} s) costs less than "
                f"{HEADROOM:g} times building {factory} (about {build_estimate:.0f} s)"))
    started = time.perf_counter()
    index = build_index(stored, factory)
    if settings.norm_head and not is_exact(index):  # the longest documents searched exactly beside it
        index = NormHead.around(index, stored, settings.norm_head)
        factory = f"{factory} with the {len(index.rows)} longest items searched exactly"
    if settings.target_recall is None or depth_knob(index) is None:
        if settings.search_depth is not None:
            set_depth(index, settings.search_depth)
        del flat
        return index, Tuning(knob=(depth_knob(index) or (None,))[0], value=settings.search_depth, exact=is_exact(index),
                             norm_head=len(getattr(index, "rows", ())),
                             decision=f"{factory} at a fixed depth (index.target_recall is null)")
    name, candidates = depth_knob(index)
    tuning = tune_depth(index, stored, tuning_sets(queries, other_queries, other_rows), k, settings.target_recall,
                        progress=bar(f"tuning {name}", len(candidates)),
                        slowest=exact_s / max(n_searches, 1) if settings.kind == "auto" else None)
    approx_s = time.perf_counter() - started + tuning.seconds_per_query * n_searches
    tuning.exact_estimate_s, tuning.approx_estimate_s = round(exact_s, 1), round(approx_s, 1)
    if tuning.reached and (approx_s < exact_s or settings.kind != "auto"):
        del flat
        tuning.decision = (f"{factory} at {name}={tuning.value}: recall {tuning.recall} for about {approx_s:.0f} s "
                           f"with its build, against about {exact_s:.0f} s exactly")
        return index, tuning
    if exact_s <= settings.exact_budget_s:
        tuning.fallback = "exact"
        tuning.decision = ("exact: " + (f"{factory} reached recall {tuning.recall}, short of {settings.target_recall}" if not tuning.reached
                                        else f"{factory} would cost about {approx_s:.0f} s") +
                           f"; exact search costs about {exact_s:.0f} s, within index.exact_budget_s")
        return flat, tuning
    del flat  # exact search of every query would take longer than the budget allows
    tuning.fallback = "plateau"
    tuning.decision = (f"{factory} at {name}={tuning.value}, recall {tuning.recall} (target {settings.target_recall}): exact "
                       f"search would cost about {exact_s:.0f} s, over index.exact_budget_s {settings.exact_budget_s:.0f}")
    log.warning("index: %s", tuning.decision)
    return index, tuning


def _exact_seconds(flat, queries, other_queries, other_rows, k: int) -> float:
    """Seconds per query of exact search, timed on a sample of the real queries (items' and users')."""
    parts = []
    if queries is not None and len(queries):
        parts.append(np.ascontiguousarray(queries[sample_rows(len(queries), EXACT_SAMPLE // 2, 2)], dtype=np.float32))
    if other_queries is not None:
        pool = np.arange(len(other_queries)) if other_rows is None else np.asarray(other_rows)
        if len(pool):
            parts.append(np.ascontiguousarray(other_queries[pool[sample_rows(len(pool), EXACT_SAMPLE // 2, 2)]],
                                              dtype=np.float32))
    sample = np.concatenate(parts) if parts else np.zeros((1, flat.d), np.float32)
    search_excluding(flat, sample[:8], k + 1)  # a GPU copies the vectors over and starts its libraries once
    start = time.perf_counter()
    search_excluding(flat, sample, k + 1)  # on the GPU where one is visible, as the lists will be
    return (time.perf_counter() - start) / len(sample)


def _build_seconds(vectors: np.ndarray, factory: str) -> float:
    """The full build's cost, from a build on a sample of a quarter of the vectors (at most
    BUILD_SAMPLE), scaled as HNSW's grows: n log n."""
    n = len(vectors)
    m = max(2, min(BUILD_SAMPLE, n // 4))
    start = time.perf_counter()
    build_index(np.ascontiguousarray(vectors[sample_rows(n, m, 3)]), factory)
    return (time.perf_counter() - start) * n / m * np.log(n) / np.log(m)
