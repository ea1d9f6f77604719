"""All-user top-10 lists, this project beside implicit's ALS, on the same generated files, in one run.

bench_scale's generator (seed 0) writes items and events; each system then runs in its own process
(so that its peak memory is its own), from the events already loaded into memory:
- this project: the behaviour fit and the blended space (`recommend.ranking.blend.build_space`), the
  index (`index.tune.build_tuned`: exact or approximate, decided by measuring) and every user's
  top-10 with seen items excluded (`recommend.ranking.lists.recommended_items`). Item texts are
  encoded by the stand-in beforehand, outside the clock (a nightly run reads them from the cache).
- implicit 0.7.3's AlternatingLeastSquares (64 factors, 15 iterations, 2 threads, BLAS on 1 thread as
  its docs advise): fit, then `recommend` for all users with already-liked items filtered.
It prints one JSON line per system and size, and one with the ratio.

    .venv/bin/pip install -e ".[bench]"      # implicit: a benchmark-only dependency
    .venv/bin/python tests/benchmarks/bench_lists.py --sizes 100000 300000
"""

from __future__ import annotations

import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402

from common import emit, parser  # noqa: E402


def load(data: Path) -> tuple[pd.DataFrame, pd.DataFrame]:
    events = pd.concat([pd.read_parquet(p) for p in sorted(data.glob("events-*.parquet"))], ignore_index=True)
    events["ts"] = pd.to_datetime(events.pop("timestamp"), unit="s", utc=True)
    items = pd.concat([pd.read_parquet(p) for p in sorted(data.glob("items-*.parquet"))], ignore_index=True)
    return events.astype({c: "category" for c in ("user_id", "item_id", "event_type")}), items


def ours(data: Path) -> dict:
    from embedder.encoder import load_encoder
    from embedder.standin import NAME
    from index.settings import IndexSettings
    from index.tune import build_tuned
    from recommend.ranking.blend import build_space
    from recommend.ranking.lists import recommended_items
    from recommend.ranking.settings import BlendSettings, RankingSettings

    events, items = load(data)
    text = load_encoder(NAME).encode((items["title"] + ". " + items["description"]).tolist()).astype(np.float16)
    item_ids, user_ids = items["item_id"].tolist(), sorted(events["user_id"].unique())
    settings = RankingSettings(weights={"view": 1.0, "cart": 3.0, "purchase": 5.0}, half_life_days=14.0, blend=BlendSettings())
    start = time.perf_counter()
    space = build_space(events, item_ids=item_ids, text=text, user_ids=user_ids, settings=settings)
    fit = time.perf_counter() - start
    index, tuning = build_tuned(space.item_docs, space.item_queries, 10, IndexSettings(), space.users,
                                np.flatnonzero(space.has_history), n_searches=len(user_ids))
    _, ids, _ = recommended_items(index, space.users, space.has_history, space.seen, 10, space.item_docs,
                                  space.popularity, new_items=np.flatnonzero(~space.warm),
                                  new_slots=settings.blend.new_item_slots, new_boost=settings.blend.new_item_boost)
    total = time.perf_counter() - start
    return {"fit_s": round(fit, 1), "lists_s": round(total - fit, 1), "total_s": round(total, 1),
            "dims": int(space.item_docs.shape[1]), "rank": space.layout.behaviour_dim,
            "index": "exact" if tuning.exact or tuning.fallback == "exact" else f"{tuning.knob}={tuning.value}",
            "decision": tuning.decision, "users_listed": int((ids >= 0).any(axis=1).sum())}


def implicit_als(data: Path) -> dict:
    import implicit
    import scipy.sparse as sp
    from threadpoolctl import threadpool_limits

    events, _ = load(data)
    matrix = sp.csr_matrix((np.ones(len(events), np.float32), (events["user_id"].cat.codes, events["item_id"].cat.codes)),
                           shape=(len(events["user_id"].cat.categories), len(events["item_id"].cat.categories)))
    matrix.sum_duplicates()
    matrix.data[:] = 1.0
    with threadpool_limits(1, "blas"):
        model = implicit.als.AlternatingLeastSquares(factors=64, iterations=15, num_threads=2, random_state=0)
        start = time.perf_counter()
        model.fit(matrix, show_progress=False)
        fit = time.perf_counter() - start
        ids, _ = model.recommend(np.arange(matrix.shape[0]), matrix, N=10, filter_already_liked_items=True)
        total = time.perf_counter() - start
    return {"fit_s": round(fit, 1), "lists_s": round(total - fit, 1), "total_s": round(total, 1),
            "implicit": implicit.__version__, "users_listed": int((ids >= 0).any(axis=1).sum())}


def main() -> None:
    p = parser(__doc__)
    p.add_argument("--sizes", type=int, nargs="+", default=[100_000, 300_000], help="items = users, 10 events each")
    p.add_argument("--system", choices=["ours", "implicit"], help="(internal: run one system)")
    p.add_argument("--data", type=Path, help="(internal)")
    args = p.parse_args()
    if args.system:  # one system, in its own process: its figures and its peak RSS
        figures = (ours if args.system == "ours" else implicit_als)(args.data)
        figures["peak_mb"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)
        print(json.dumps(figures))
        return
    from bench_scale import generate

    for size in args.sizes:
        with tempfile.TemporaryDirectory() as tmp:
            generate(Path(tmp), size, size, 10.0, 8)
            results = {}
            for system in ("ours", "implicit"):
                out = subprocess.run([sys.executable, __file__, "--system", system, "--data", tmp],
                                     capture_output=True, text=True, check=True)
                results[system] = json.loads(out.stdout.strip().splitlines()[-1])
                emit(f"lists_{system}", {"items": size, "users": size, "events": size * 10, **results[system]})
            emit("lists_ratio", {"items": size, "users": size,
                                 "implicit_over_ours_total": round(results["implicit"]["total_s"] / results["ours"]["total_s"], 2),
                                 "implicit_over_ours_peak": round(results["implicit"]["peak_mb"] / results["ours"]["peak_mb"], 2)})


if __name__ == "__main__":
    main()
