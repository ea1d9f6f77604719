"""Every user's top-10, this project beside implicit's ALS and Spark's ALS, on the same generated files, in one run.

The work compared is the same for every system: from the events already in memory (read from the
files before the clock), prepare what the system needs (its matrix, its blocks, its DataFrame), fit,
then list every user's top 10. Preparation is on the clock for all of them (`prep_s` where it can
be told apart from the fit). Searches are exact by default (`--index exact`), as implicit's
`recommend` is: `--index auto` lets this project choose HNSW by measuring, and the ratio line then
names the recall it searched at. Each system runs in its own process (its peak memory is its own):
- this project (`ours`): the behaviour fit and the blended space (`recommend.ranking.blend.build_space`:
  its interaction matrix is its preparation), the index (`index.tune.build_tuned`) and every user's
  top-10 with seen items excluded (`recommend.ranking.lists.recommended_items`). Item texts are
  encoded by the stand-in beforehand, outside the clock (a nightly run reads them from the cache).
- this project on its workers (`workers`), as the refresh runs it (`recommend.run.stages.lists`):
  the events written in user blocks (its preparation), the fit over them, the index and the lists in
  blocks on a LocalCluster of 2 workers. The refresh lists every item's similar items too: here the
  user blocks run first and the item blocks after them (the same stage, its blocks in that order), so
  `total_s` is the users' work alone (blocks, fit and index, user lists) and `item_lists_s` and
  `refresh_stage_s` are reported beside it. Peak memory for the driver and the largest worker.
- Spark ML's ALS (`spark`; needs pyspark and a Java 17 runtime), local[2]: fit, then
  recommendForAllUsers (seen items NOT left out: Spark has no such option, an easier question);
- implicit 0.7.3's AlternatingLeastSquares (64 factors, 15 iterations, 2 threads, BLAS on 1 thread as
  its docs advise): fit, then `recommend` for all users with already-liked items filtered (exact).
- exact search and ScaNN on the vectors the `workers` run left (`exact`, `scann`:
  tests/benchmarks/lists_peers.py), every user's and item's list; `lists_index_stage` then sets the
  refresh's index stage (with `--index auto`: its search chosen by measuring, its held-out recall)
  beside exact search's time and ScaNN's recall and time at a few depths.
It prints one JSON line per system and size (with the true number of events), and one with each
system's total over ours on the workers (users' lists only, preparation included), naming any
difference left in the work.

    .venv/bin/pip install -e ".[bench]"      # implicit and pyspark: benchmark-only dependencies
    .venv/bin/python tests/benchmarks/bench_lists.py --sizes 100000 300000 --systems ours workers implicit spark
    .venv/bin/python tests/benchmarks/bench_lists.py --sizes 1000000 --index auto --systems workers exact scann implicit \
        --exact-share 0.1     # the lists at a million: the index stage against exact search, ScaNN, implicit's ALS
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
from lists_peers import exact_search, scann_search  # noqa: E402


def load(data: Path) -> tuple[pd.DataFrame, pd.DataFrame]:
    events = pd.concat([pd.read_parquet(p) for p in sorted(data.glob("events-*.parquet"))], ignore_index=True)
    events["ts"] = pd.to_datetime(events.pop("timestamp"), unit="s", utc=True)
    items = pd.concat([pd.read_parquet(p) for p in sorted(data.glob("items-*.parquet"))], ignore_index=True)
    return events.astype({c: "category" for c in ("user_id", "item_id", "event_type")}), items


def _index_figures(tuning) -> dict:
    """How the lists were searched: exact, or an approximate index at the recall it measured."""
    if tuning.exact or tuning.fallback == "exact":
        return {"index": "exact", "recall": 1.0}
    return {"index": f"{tuning.knob}={tuning.value}", "recall": tuning.recall}


def ours(data: Path, index_kind: str) -> dict:
    from embedder.encoder import load_encoder
    from embedder.standin import NAME
    from index.settings import IndexSettings
    from index.tune import build_tuned
    from recommend.ranking.blend import build_space
    from recommend.ranking.lists import Candidates, recommended_items
    from recommend.ranking.settings import BlendSettings, RankingSettings

    events, items = load(data)
    text = load_encoder(NAME).encode((items["title"] + ". " + items["description"]).tolist()).astype(np.float16)
    item_ids, user_ids = items["item_id"].tolist(), sorted(events["user_id"].unique())
    settings = RankingSettings(weights={"view": 1.0, "cart": 3.0, "purchase": 5.0}, half_life_days=14.0, blend=BlendSettings())
    start = time.perf_counter()  # the events' matrix (its preparation) is built inside build_space
    space = build_space(events, item_ids=item_ids, text=text, user_ids=user_ids, settings=settings)
    fit = time.perf_counter() - start
    index, tuning = build_tuned(space.item_docs, space.item_queries, 10, IndexSettings(kind=index_kind), space.users,
                                np.flatnonzero(space.has_history), n_searches=len(user_ids))
    candidates = Candidates(space.item_docs, space.popularity, new_items=np.flatnonzero(~space.warm),
                            new_slots=settings.blend.new_item_slots, new_boost=settings.blend.new_item_boost)
    _, ids, _ = recommended_items(index, space.users, space.has_history, space.seen, 10, candidates)
    total = time.perf_counter() - start
    return {"prep_and_fit_s": round(fit, 1), "lists_s": round(total - fit, 1), "total_s": round(total, 1),
            "dims": int(space.item_docs.shape[1]), "rank": space.layout.behaviour_dim, **_index_figures(tuning),
            "decision": tuning.decision, "users_listed": int((ids >= 0).any(axis=1).sum()), "seen_items_filtered": True}


PHASES: dict[str, float] = {}  # the workers' list blocks: wall seconds of each kind's blocks, and when they began


def _users_then_items(original):
    """recommend.run.tasks.list_tasks._run with its calls in two phases, every user block before any
    item block, each phase timed: the same blocks, the same parts, the same stage around them."""
    def run(client, call, n):
        kinds = [call(i)[0].__name__ for i in range(n)]  # user_block or item_block
        PHASES["start"] = time.perf_counter()
        for kind in ("user_block", "item_block"):
            chosen = [i for i in range(n) if kinds[i] == kind]
            started = time.perf_counter()
            for j, part in original(client, lambda j, chosen=chosen: call(chosen[j]), len(chosen)):
                yield chosen[j], part
            PHASES[kind] = time.perf_counter() - started
    return run


def workers(data: Path, index_kind: str) -> dict:
    """This project as the refresh runs it: the events written in user blocks, the behaviour fit over
    them, the item side and the index, and the lists in blocks, on a LocalCluster of 2 workers (1
    thread each) (`recommend.run.stages.lists`). The user blocks run before the item blocks, each
    kind timed: `total_s` counts the users' lists only, as the other systems make."""
    import yaml
    from types import SimpleNamespace

    from distributed import Client, LocalCluster

    from embedder.encoder import load_encoder
    from embedder.event_blocks import blocks_from_frame
    from embedder.run_folder import RunFolder
    from embedder.standin import NAME
    from recommend.config import load_config
    from recommend.run.plans import plan_run
    from recommend.run.infra.progress import Reporter
    from recommend.run.report import RefreshReport
    from recommend.run.stages import Run, lists
    from recommend.run.tasks import list_tasks

    events, items = load(data)
    text = load_encoder(NAME).encode((items["title"] + ". " + items["description"]).tolist()).astype(np.float16)
    item_ids = items["item_id"].tolist()
    work = data / "workers"
    work.mkdir()
    (work / "config.yaml").write_text(yaml.safe_dump({
        "workdir": str(work / "work"), "items": {"path": str(data / "items-*.parquet")},
        "events": {"path": str(data / "events-*.parquet"), "weights": {"view": 1.0, "cart": 3.0, "purchase": 5.0}},
        "lists": {"k": 10, "half_life_days": 14.0}, "embed": {"model": NAME}, "index": {"kind": index_kind},
        "publish": {"enabled": False}}))
    config = load_config(work / "config.yaml")
    plan = plan_run(config).lists  # what the refresh gives the lists stage
    run_dir = RunFolder(work / "run")
    list_tasks._run = _users_then_items(list_tasks._run)
    with LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=None) as cluster, \
            Client(cluster) as client:
        start = time.perf_counter()
        blocks = blocks_from_frame(run_dir, events[["user_id", "item_id", "ts", "event_type"]], item_ids,
                                   block_size=config.lists.block_size, client=client)
        written = time.perf_counter() - start
        del events
        run = Run(folder=run_dir, out=Reporter(True), report=RefreshReport(run_id="bench", run_dir=str(run_dir)), client=client)
        out = lists(run, plan, blocks, SimpleNamespace(item_ids=item_ids, vectors=text))
        total = time.perf_counter() - start
        worker_peaks = client.run(lambda: resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)
    fit_and_index = PHASES["start"] - start - written
    users_only = written + fit_and_index + PHASES["user_block"]
    return {"prep_s": round(written, 1), "fit_and_index_s": round(fit_and_index, 1),
            "lists_s": round(PHASES["user_block"], 1), "total_s": round(users_only, 1),
            "item_lists_s": round(PHASES["item_block"], 1), "refresh_stage_s": round(total, 1),
            "user_blocks": blocks.n, "rank": out.layout.behaviour_dim, **_index_figures(out.summary.search_depth),
            "held_out_recall": {"users": getattr(out.summary.user_search_recall, "recall", 1.0),
                                "items": out.summary.item_lists_recall.recall},
            "users_listed": out.summary.users - out.summary.users_short_of_k, "seen_items_filtered": True,
            "worker_peak_mb": round(max(worker_peaks.values()))}


def implicit_als(data: Path, share: float = 1.0) -> dict:
    """implicit's ALS: fit, then every user's top 10 with seen items left out (`recommend`). `share` < 1
    lists that share of the users, chosen at random, and scales the lists' time to every user, saying so
    (at 1M x 1M its exact top 10 for every user takes about an hour here)."""
    import implicit
    import scipy.sparse as sp
    from threadpoolctl import threadpool_limits

    events, _ = load(data)
    start = time.perf_counter()  # its preparation, the user x item matrix, on the clock as the others' is
    matrix = sp.csr_matrix((np.ones(len(events), np.float32), (events["user_id"].cat.codes, events["item_id"].cat.codes)),
                           shape=(len(events["user_id"].cat.categories), len(events["item_id"].cat.categories)))
    matrix.sum_duplicates()
    matrix.data[:] = 1.0
    prep = time.perf_counter() - start
    with threadpool_limits(1, "blas"):
        model = implicit.als.AlternatingLeastSquares(factors=64, iterations=15, num_threads=2, random_state=0)
        model.fit(matrix, show_progress=False)
        fit = time.perf_counter() - start - prep
        n_users = matrix.shape[0]
        users = np.arange(n_users) if share >= 1 else np.sort(
            np.random.default_rng(1).choice(n_users, max(1, int(n_users * share)), replace=False))
        ids, _ = model.recommend(users, matrix[users], N=10, filter_already_liked_items=True)
        lists = (time.perf_counter() - start - prep - fit) * n_users / len(users)
    out = {"prep_s": round(prep, 1), "fit_s": round(fit, 1), "lists_s": round(lists, 1),
           "total_s": round(prep + fit + lists, 1), "implicit": implicit.__version__, "index": "exact", "recall": 1.0,
           "users_listed": int((ids >= 0).any(axis=1).sum()), "seen_items_filtered": True}
    if share < 1:
        out["lists_sampled"] = (f"{len(users):,} of {n_users:,} users listed; lists_s and total_s scale "
                                f"that time to every user")
    return out


def spark_als(data: Path) -> dict:
    """Spark ML's ALS (implicit preferences, rank 64, 15 iterations, local[2]): fit, then
    `recommendForAllUsers(10)`, which does not leave out seen items (Spark has no such option), so it
    answers an easier question than the other two. Peak memory: the JVM's RSS, sampled."""
    import threading

    import psutil
    from pyspark.ml.recommendation import ALS
    from pyspark.sql import SparkSession

    events, _ = load(data)
    spark = (SparkSession.builder.master("local[2]").config("spark.driver.memory", "6g")
             .config("spark.ui.enabled", "false").config("spark.sql.execution.arrow.pyspark.enabled", "true")
             .config("spark.sql.shuffle.partitions", "8").getOrCreate())  # the JVM's start: off the clock
    spark.sparkContext.setLogLevel("ERROR")
    start = time.perf_counter()  # its preparation (pairs, the cached DataFrame) on the clock as the others' is
    pairs = pd.DataFrame({"user": events["user_id"].cat.codes.astype(np.int32),
                          "item": events["item_id"].cat.codes.astype(np.int32)}).drop_duplicates()
    pairs["rating"] = np.float32(1.0)
    del events
    peak, done = {"jvm": 0}, threading.Event()

    def sample() -> None:
        while not done.is_set():
            for child in psutil.Process().children(recursive=True):
                try:
                    peak["jvm"] = max(peak["jvm"], child.memory_info().rss)
                except psutil.Error:
                    pass
            time.sleep(0.2)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    frame = spark.createDataFrame(pairs).cache()
    frame.count()
    prep = time.perf_counter() - start
    model = ALS(rank=64, maxIter=15, implicitPrefs=True, userCol="user", itemCol="item", ratingCol="rating",
                seed=0).fit(frame)
    model.itemFactors.count()
    fit = time.perf_counter() - start - prep
    listed = model.recommendForAllUsers(10).count()
    total = time.perf_counter() - start
    done.set()
    sampler.join()
    version = spark.version
    spark.stop()
    return {"prep_s": round(prep, 1), "fit_s": round(fit, 1), "lists_s": round(total - prep - fit, 1),
            "total_s": round(total, 1), "spark": version, "index": "exact", "recall": 1.0,
            "users_listed": int(listed), "seen_items_filtered": False, "jvm_peak_mb": round(peak["jvm"] / 2**20)}


def unequal(results: dict[str, dict]) -> dict[str, str]:
    """What still differs from the others' work, per system: a search short of exact, seen items left in."""
    out = {}
    for name, r in results.items():
        notes = []
        if r.get("index") != "exact":
            notes.append(f"approximate search ({r.get('index')}, recall@10 {r.get('recall')})")
        if not r.get("seen_items_filtered", True):
            notes.append("seen items not filtered (an easier question)")
        if notes:
            out[name] = "; ".join(notes)
    return out


SYSTEMS = ["ours", "workers", "exact", "scann", "implicit", "spark"]


def index_stage_figures(size: int, events: int, results: dict[str, dict]) -> dict:
    """The refresh's index stage (every item's and user's list, its search chosen by measuring) beside
    exact search of the same lists on the same vectors, and ScaNN's where it ran."""
    ours, exact = results["workers"], results["exact"]
    out = {"items": size, "users": size, "events": events,
           "index_stage_s": ours["refresh_stage_s"], "search": ours["index"], "held_out_recall": ours["held_out_recall"],
           "exact_search_s": exact["all_lists_s"], "exact": exact["all_lists"],
           "index_stage_over_exact": round(ours["refresh_stage_s"] / exact["all_lists_s"], 3),
           "work": "index stage: the fit, the index and its tuning, every user's and item's list; exact: the search alone"}
    if "scann" in results:
        out["scann"] = [{"leaves": d["leaves_searched"], "users_recall": d["users_recall"], "items_recall": d["items_recall"],
                         "all_lists_s": round(results["scann"]["build_s"] + d["users_all_lists_s"] + d["items_all_lists_s"], 1)}
                        for d in results["scann"]["depths"]]
    if "implicit" in results:  # implicit lists users only; the index stage lists items as well
        out["implicit_users_only_s"] = results["implicit"]["total_s"]
        out["index_stage_over_implicit"] = round(ours["refresh_stage_s"] / results["implicit"]["total_s"], 3)
    return out


def main() -> None:
    p = parser(__doc__)
    p.add_argument("--sizes", type=int, nargs="+", default=[100_000, 300_000], help="items = users, 10 events each")
    p.add_argument("--system", choices=SYSTEMS, help="(internal: run one system)")
    p.add_argument("--systems", nargs="+", default=["ours", "workers", "implicit", "spark"], choices=SYSTEMS,
                   help="which to run, in this order (spark: pip install pyspark and a Java 17 runtime; exact and "
                        "scann search the vectors `workers` left, so run after it)")
    p.add_argument("--index", choices=["exact", "auto"], default="exact",
                   help="this project's search: exact (the default: the same answers' work as implicit's recommend), "
                        "or auto (exact or HNSW, chosen by measuring: the ratio line names the recall)")
    p.add_argument("--exact-share", type=float, default=1.0,
                   help="exact, scann and implicit's lists: the share of users (and items) searched, the time "
                        "scaled to every list; 1: all")
    p.add_argument("--data", type=Path, help="(internal)")
    args = p.parse_args()
    if args.system:  # one system, in its own process: its figures and its peak RSS
        run = {"ours": ours, "workers": workers, "implicit": implicit_als, "spark": spark_als,
               "exact": lambda d: exact_search(d / "workers" / "run", args.exact_share, d / "exact-sample.npz"),
               "scann": lambda d: scann_search(d / "workers" / "run", d / "exact-sample.npz")}[args.system]
        figures = (run(args.data, args.index) if args.system in ("ours", "workers")
                   else run(args.data, args.exact_share) if args.system == "implicit" else run(args.data))
        figures["peak_mb"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)
        print(json.dumps(figures))
        return
    import pyarrow.parquet as pq

    from bench_scale import generate

    for size in args.sizes:
        with tempfile.TemporaryDirectory() as tmp:
            generate(Path(tmp), size, size, 10.0, 8)
            events = sum(pq.read_metadata(f).num_rows for f in Path(tmp).glob("events-*.parquet"))
            results = {}
            for system in args.systems:
                out = subprocess.run([sys.executable, __file__, "--system", system, "--data", tmp, "--index", args.index,
                                      "--exact-share", str(args.exact_share)],
                                     stdout=subprocess.PIPE, text=True, check=True)  # its errors show
                results[system] = json.loads(out.stdout.strip().splitlines()[-1])
                emit(f"lists_{system}", {"items": size, "users": size, "events": events, **results[system]})
            if "workers" in results and "exact" in results:
                emit("lists_index_stage", index_stage_figures(size, events, results))
            results = {name: r for name, r in results.items() if "total_s" in r}  # exact, scann: search alone
            base = "workers" if "workers" in results else "ours" if "ours" in results else None
            if base:  # each system's time over ours (as the refresh runs it, on the workers, when it ran)
                emit("lists_ratio", {
                    "items": size, "users": size, "events": events,
                    "work": "every user's top 10 from the events in memory, preparation and fit included; "
                            "item lists not counted",
                    **{f"{name}_total_over_{base}": round(r["total_s"] / results[base]["total_s"], 2)
                       for name, r in results.items() if name != base},
                    "search": {name: r.get("index") for name, r in results.items()},
                    "unequal": unequal(results)})

if __name__ == "__main__":
    main()
