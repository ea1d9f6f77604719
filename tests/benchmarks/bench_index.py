"""Approximate against exact lists: FAISS indexes on N clustered synthetic vectors (like text
embeddings: topics with spread), item->item top-K for a sample of queries, recall@K against the exact
(Flat) search in the same run, and the search speed ratio.

Each of --kinds is FACTORY:DEPTH (a fixed nprobe / efSearch), FACTORY:tuned (the depth tuned to
--target recall on a sample, as the refresh does), or auto (the refresh's default index, tuned). The
default tunes every kind to the same target, so that their speeds compare at about equal recall; a
fixed depth gives whatever recall it gives. The tuning sample is kept out of the measured queries.
Exact search is warmed up (on the tuning sample) before it is timed, as every approximate index is
by its tuning. Each line carries its kind's measured recall beside its speed ratio, and a last line
sets the kinds side by side with the spread of their recalls: a ratio at a lower recall buys less.

    .venv/bin/python tests/benchmarks/bench_index.py --items 100000 --queries 10000
    .venv/bin/python tests/benchmarks/bench_index.py --spread 2.0 --kinds auto,HNSW32:tuned,HNSW32:64
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import numpy as np  # noqa: E402

from common import emit, parser  # noqa: E402


def clustered(n: int, d: int, topics: int, spread: float, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    centers = rng.normal(size=(topics, d)).astype(np.float32)
    x = centers[rng.integers(0, topics, n)] + spread * rng.normal(size=(n, d)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def main() -> None:
    args_parser = parser(__doc__)
    args_parser.add_argument("--items", type=int, default=100_000)
    args_parser.add_argument("--queries", type=int, default=10_000)
    args_parser.add_argument("--dim", type=int, default=384)
    args_parser.add_argument("--k", type=int, default=20)
    args_parser.add_argument("--kinds", default="auto,IVF1024,SQfp16:tuned,HNSW32:tuned")
    args_parser.add_argument("--target", type=float, default=0.95, help="recall target for tuned depths")
    args_parser.add_argument("--spread", type=float, default=0.8, help="noise around each topic: higher is harder")
    args_parser.add_argument("--per-topic", type=int, default=100, help="items per topic (100: about one topic per IVF "
                             "cell at the default cell count; 10: ten topics per cell)")
    args = args_parser.parse_args()
    from index.build import build_index, choose_factory
    from index.search import sample_rows, search_excluding
    from index.settings import IndexSettings
    from index.tune import build_tuned

    x = clustered(args.items, args.dim, topics=max(10, args.items // args.per_topic), spread=args.spread)
    tuning_rows = sample_rows(args.items, 500, 1)  # what build_tuned samples: kept out of the measured queries
    rows = np.random.default_rng(1).choice(np.setdiff1d(np.arange(args.items), tuning_rows),
                                           min(args.queries, args.items - len(tuning_rows)), replace=False)
    exclude = [np.array([r]) for r in rows]
    t = time.perf_counter()
    exact = build_index(x, kind="exact")
    build_exact = time.perf_counter() - t
    search_excluding(exact, x[tuning_rows], args.k, [np.array([r]) for r in tuning_rows])  # warm-up, off the clock
    t = time.perf_counter()
    _, truth = search_excluding(exact, x[rows], args.k, exclude)
    exact_s = time.perf_counter() - t
    specs = [s.rsplit(":", 1) if ":" in s else (s, "tuned") for s in _split_specs(args.kinds)]
    side_by_side = {}
    for kind, knob in specs:
        factory = choose_factory(args.items, kind, exact_below=1)
        settings = IndexSettings(kind=kind, target_recall=args.target if knob == "tuned" else None,
                                 search_depth=None if knob == "tuned" else int(knob))
        t = time.perf_counter()
        index, tuning = build_tuned(x, x, args.k, settings)
        build_s = time.perf_counter() - t
        t = time.perf_counter()
        _, got = search_excluding(index, x[rows], args.k, exclude)
        search_s = time.perf_counter() - t
        recall = np.mean([len(np.intersect1d(a, b)) / args.k for a, b in zip(got, truth)])
        searched = "exact" if tuning.exact or tuning.fallback == "exact" else f"{tuning.knob}={tuning.value}"
        side_by_side[kind] = {"searched": searched, f"recall_at_{args.k}": round(float(recall), 4),
                              "speed_ratio": round(exact_s / search_s, 2), "tuned_to": args.target if knob == "tuned" else None}
        emit("index_approx_vs_exact", {
            "items": args.items, "queries": len(rows), "k": args.k, "kind": kind, "factory": factory,
            "spread": args.spread, "per_topic": args.per_topic, "depth": f"{tuning.knob}={tuning.value}",
            "searched": searched, "tuned_to": args.target if knob == "tuned" else None,
            "tuned": {key: getattr(tuning, key) for key in ("target", "recall", "reached", "decision")},
            f"recall_at_{args.k}": round(float(recall), 4), "exact_search_s": round(exact_s, 2),
            "search_s": round(search_s, 2), "speed_ratio": round(exact_s / search_s, 2),
            "speed_ratio_is": f"exact search's time over this kind's, at recall@{args.k} {round(float(recall), 4)} (exact: 1.0)",
            "build_and_tune_s": round(build_s, 2),
            "exact_build_s": round(build_exact, 2),
            "all_items_estimate": {"exact_s": round(exact_s * args.items / len(rows), 1),
                                   "approx_s_with_build": round(build_s + search_s * args.items / len(rows), 1)}})
    recalls = [v[f"recall_at_{args.k}"] for v in side_by_side.values()]
    emit("index_kinds_side_by_side", {
        "items": args.items, "queries": len(rows), "k": args.k, "spread": args.spread, "per_topic": args.per_topic,
        "kinds": side_by_side, "recall_spread": round(max(recalls) - min(recalls), 4),
        "speeds_compare": "at about equal recall" if max(recalls) - min(recalls) <= 0.01 else
                          "at unequal recall: compare each speed ratio with its recall, not with the others'"})


def _split_specs(text: str) -> list[str]:
    """'auto,HNSW32:64,IVF1024,Flat:16' -> ['auto', 'HNSW32:64', 'IVF1024,Flat:16'] (factory strings
    hold commas; a spec ends at its ':DEPTH', or is 'auto')."""
    out, current = [], []
    for part in text.split(","):
        current.append(part)
        if ":" in part or part == "auto":
            out.append(",".join(current))
            current = []
    return out


if __name__ == "__main__":
    main()
