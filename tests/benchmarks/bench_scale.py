"""Out-of-core check: a synthetic catalog and event log (default 1,000,000 items and 1,000,000 users)
through the whole refresh, with the peak memory (RSS) of the driver and of each Dask worker.

For this scale test only, items are encoded by the clearly named stand-in `stand-in:hashing-384`
(feature hashing, not a language model; see embedder/standin.py): the data path is what is measured
here, the model's encode rate is measured by bench_encode.py. Publishing is off unless --publish
(into the embedded store, Qdrant's engine in-process, as the default config does).

    .venv/bin/python tests/benchmarks/bench_scale.py --items 1000000 --users 1000000
    .venv/bin/python tests/benchmarks/bench_scale.py --items 100000 --users 100000 --parts 8 --publish --nights 2
    .venv/bin/python tests/benchmarks/bench_scale.py --stage generate --dir D --users 3000000 --parts 48  # then:
    .venv/bin/python tests/benchmarks/bench_scale.py --stage run --dir D

`--nights 2` refreshes twice on one workdir, 1% of the items' texts changed before the second (`--change`):
the second night's publish starts its text shards from the first's (recommend/serving/text_shards.py).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402

from common import WORDS, emit, parser  # noqa: E402


def generate(out: Path, n_items: int, n_users: int, events_per_user: float, parts: int, seed: int = 0) -> dict:
    """Parquet parts of items (id, title, description, category) and events (user, item, ts, type)."""
    rng = np.random.default_rng(seed)
    out.mkdir(parents=True, exist_ok=True)
    categories = 50
    words = np.array(WORDS)
    for p, rows in enumerate(np.array_split(np.arange(n_items), parts)):
        cat = rows % categories
        title = pd.Series(words[rng.integers(0, len(words), len(rows))]).str.cat(
            [pd.Series(words[rng.integers(0, len(words), len(rows))]), pd.Series(words[cat])], sep=" ")
        desc = pd.Series(words[rng.integers(0, len(words), len(rows))])
        for _ in range(11):
            desc = desc.str.cat(pd.Series(words[rng.integers(0, len(words), len(rows))]), sep=" ")
        pd.DataFrame({"item_id": [f"I{r:07d}" for r in rows], "title": title, "description": desc,
                      "category": [f"c{c}" for c in cat]}).to_parquet(out / f"items-{p:03d}.parquet", index=False)
    start = pd.Timestamp("2026-10-01", tz="UTC").value // 10**9
    per_cat = n_items // categories
    for p, users in enumerate(np.array_split(np.arange(n_users), parts)):
        counts = 1 + rng.poisson(events_per_user - 1, len(users))
        user = np.repeat(users, counts)
        taste = user % categories
        in_taste = rng.random(len(user)) < 0.8
        item = np.where(in_taste, taste + categories * rng.integers(0, per_cat, len(user)),
                        np.minimum(rng.zipf(1.3, len(user)) - 1, n_items - 1))
        kind = np.where(rng.random(len(user)) < 0.85, "view", np.where(rng.random(len(user)) < 0.7, "cart", "purchase"))
        pd.DataFrame({"user_id": [f"U{u:07d}" for u in user], "item_id": [f"I{i:07d}" for i in item],
                      "timestamp": start + rng.integers(0, 30 * 86400, len(user)), "event_type": kind}
                     ).to_parquet(out / f"events-{p:03d}.parquet", index=False)
    return {"items": n_items, "users": n_users}


def settings(pairs: list[str]) -> dict:
    """`--set index.exact_budget_s=1` pairs as a nested dict of config sections (values read as YAML)."""
    import yaml

    out: dict = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or "." not in key:
            raise ValueError(f"--set {pair!r}: expected section.key=value, e.g. index.exact_budget_s=1")
        section, name = key.split(".", 1)
        out.setdefault(section, {})[name] = yaml.safe_load(value)
    return out


def run(data: Path, work: Path, publish: bool, workers: int | None = None, extra: dict | None = None) -> dict:
    """The refresh in this process, with a sampler of the RSS of this process and its children.
    `workers`: local Dask workers (default: one per core); `extra`: config sections to add (`settings`)."""
    import psutil
    import yaml

    from recommend.config import load_config
    from recommend.run.pipeline import refresh

    config = work / "config.yaml"
    work.mkdir(parents=True, exist_ok=True)
    config.write_text(yaml.safe_dump({
        "workdir": str(work / "work"),
        "items": {"path": str(data / "items-*.parquet"), "text": "{title}. {description}", "metadata": ["category"]},
        "events": {"path": str(data / "events-*.parquet")},
        "embed": {"model": "stand-in:hashing-384"},
        "publish": {"enabled": publish}, **({"dask": {"n_workers": workers}} if workers else {}), **(extra or {})}))
    me = psutil.Process()
    peaks: dict[int, int] = {}
    done = threading.Event()
    # the driver's and the largest worker's peak per stage: which stage to shrink next ("after ingest": the
    # stage after ingest's line, i.e. embed)
    stage = {"name": "start", "peaks": {}, "worker_peaks": {}, "ends": {}}

    from recommend.run.infra.progress import Reporter

    say = Reporter.say

    def tracking_say(self, text: str) -> None:  # stage lines end a stage: "[embed] ..."
        if text.startswith("["):
            name = text[1:text.index("]")]
            stage["name"] = "after " + name
            stage["ends"][name] = me.memory_info().rss  # what the stage left held (or not given back)
        say(self, text)

    Reporter.say = tracking_say

    def sample() -> None:
        while not done.is_set():
            for proc in [me, *me.children(recursive=True)]:
                try:
                    rss = proc.memory_info().rss
                except psutil.Error:
                    continue
                peaks[proc.pid] = max(peaks.get(proc.pid, 0), rss)
                kind = "peaks" if proc.pid == me.pid else "worker_peaks"
                stage[kind][stage["name"]] = max(stage[kind].get(stage["name"], 0), rss)
            time.sleep(0.2)

    thread = threading.Thread(target=sample, daemon=True)
    thread.start()
    try:
        report = refresh(load_config(config), quiet=True).model_dump(mode="json")
        error = None
    except Exception as exc:  # the figure to report is how far it got and with what memory
        report, error = {}, f"{type(exc).__name__}: {exc}"[:500]
    done.set()
    thread.join()
    driver = peaks.pop(me.pid, 0)
    return {"driver_peak_rss_mb": round(driver / 2**20),
            "driver_peak_rss_mb_by_stage": {k: round(v / 2**20) for k, v in stage["peaks"].items()},
            "driver_rss_mb_at_stage_end": {k: round(v / 2**20) for k, v in stage["ends"].items()},
            "max_worker_peak_rss_mb": round(max(peaks.values(), default=0) / 2**20),
            "worker_peak_rss_mb_by_stage": {k: round(v / 2**20) for k, v in stage["worker_peaks"].items()},
            "seconds": report.get("seconds"), "items_encoded": (report.get("embed") or {}).get("items_encoded"),
            "users": (report.get("index") or {}).get("users"), "events_read": (report.get("events") or {}).get("rows_read"),
            "item_lists_recall": (report.get("index") or {}).get("item_lists_recall"),
            "user_search_recall": (report.get("index") or {}).get("user_search_recall"),
            "search_depth": {k: v for k, v in ((report.get("index") or {}).get("search_depth") or {}).items() if k != "tried"},
            "gate_ndcg": (report.get("gate") or {}).get("ndcg"), "text_graph": report.get("text_graph"), "error": error}


def change_items(data: Path, fraction: float, night: int) -> int:
    """The next night's catalog: a `fraction` of the items (drawn by `night`) get a new word in their
    description, so their text vectors change. Returns how many."""
    rng, changed = np.random.default_rng(1000 + night), 0
    for path in sorted(data.glob("items-*.parquet")):
        frame = pd.read_parquet(path)
        rows = rng.random(len(frame)) < fraction
        frame.loc[rows, "description"] = frame.loc[rows, "description"] + f" night{night}"
        frame.to_parquet(path, index=False)
        changed += int(rows.sum())
    return changed


def published(work: Path) -> dict:
    """The live version's shards from its version.json: each shard's wall time, and what the text
    shards carried from the version before (recommend/serving/text_shards.py)."""
    store = work / "work" / "store" / "recs"
    try:
        run_id = json.loads((store / "LIVE").read_text())["run_id"]
        shards = json.loads((store / "versions" / run_id / "version.json").read_text())["shards"]
    except (OSError, ValueError, KeyError):
        return {}
    carried = [s["carried"] for n, s in shards.items() if n.startswith("texts-") and s.get("carried")]
    return {"shard_wall_s": {n: round(s["ran"][1] - s["ran"][0], 1) for n, s in sorted(shards.items()) if "ran" in s},
            "text_shards_carried": len(carried), "text_points_upserted": sum(c["upserted"] for c in carried),
            "text_points_removed": sum(c["removed"] for c in carried)}


def main() -> None:
    args_parser = parser(__doc__)
    args_parser.add_argument("--items", type=int, default=1_000_000)
    args_parser.add_argument("--users", type=int, default=1_000_000)
    args_parser.add_argument("--events-per-user", type=float, default=10.0)
    args_parser.add_argument("--parts", type=int, default=16)
    args_parser.add_argument("--publish", action="store_true")
    args_parser.add_argument("--workers", default="", help="e.g. 1,2: a refresh with each count of local workers on "
                             "the same data, each from a cold workdir (strong scaling); default: one per core")
    args_parser.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE",
                             help="a config setting for the refresh, e.g. index.exact_budget_s=1 (repeatable)")
    args_parser.add_argument("--nights", type=int, default=1, help="refreshes on the same workdir, each after the "
                             "first with --change of the items' texts changed (the text shards carried: with --publish)")
    args_parser.add_argument("--change", type=float, default=0.01, help="share of the items changed before each next night")
    args_parser.add_argument("--stage", choices=["all", "generate", "run", "change"], default="all",
                             help="one step alone, on the data kept in --dir: generate it once, then run refreshes on it "
                             "(performance.md's figures were made so); default: all, in a temporary folder")
    args_parser.add_argument("--night", type=int, default=2, help=argparse.SUPPRESS)
    args_parser.add_argument("--dir", default=None, help="the folder of --stage's data (DIR/data) and work")
    args = args_parser.parse_args()
    try:
        extra = settings(args.set)  # a malformed --set stops here (exit 2), before any data is made
    except ValueError as exc:
        args_parser.error(str(exc))
    if args.stage != "all" and not args.dir:
        args_parser.error(f"--stage {args.stage} needs --dir: the folder its data is kept in")
    if args.stage == "generate":
        generate(Path(args.dir) / "data", args.items, args.users, args.events_per_user, args.parts)
        return
    if args.stage == "change":
        print(json.dumps({"night": args.night, "items_changed": change_items(Path(args.dir) / "data", args.change, args.night)}))
        return
    counts = [int(w) for w in args.workers.split(",") if w] or [None]
    if args.stage == "run":
        workers = counts[0]
        work = Path(args.dir) / (f"workers-{workers}" if workers else "")
        figures = run(Path(args.dir) / "data", work, args.publish, workers, extra)
        print(json.dumps({"workers": workers, **figures, **(published(work) if args.publish else {})}))
        return
    with tempfile.TemporaryDirectory() as tmp:  # each step in a fresh process: the driver's peak is the refresh's own
        t = time.perf_counter()
        subprocess.run([sys.executable, __file__, "--stage", "generate", "--dir", tmp, "--items", str(args.items),
                        "--users", str(args.users), "--events-per-user", str(args.events_per_user),
                        "--parts", str(args.parts)], check=True)
        generate_s = time.perf_counter() - t
        runs = []
        for workers in counts:
            for night in range(1, args.nights + 1):
                changed = 0
                if night > 1:  # the next night: a share of the items changed, the same workdir (cache, live version)
                    proc = subprocess.run([sys.executable, __file__, "--stage", "change", "--dir", tmp, "--night", str(night),
                                           "--change", str(args.change)], check=True, stdout=subprocess.PIPE, text=True)
                    changed = json.loads(proc.stdout.strip().splitlines()[-1])["items_changed"]
                proc = subprocess.run([sys.executable, __file__, "--stage", "run", "--dir", tmp, "--workers", str(workers or "")]
                                      + (["--publish"] if args.publish else []) + [f"--set={s}" for s in args.set],
                                      check=True, stdout=subprocess.PIPE, text=True)  # its errors show
                runs.append(json.loads(proc.stdout.strip().splitlines()[-1]))
                emit("scale_out_of_core", {"items": args.items, "users": args.users, "events_per_user": args.events_per_user,
                                           "encoder": "stand-in:hashing-384", "published": args.publish, "night": night,
                                           "items_changed": changed, "generate_s": round(generate_s, 1),
                                           "target_peak_rss_mb": 4096, **runs[-1]})
    totals = [(r.get("seconds") or {}).get("total") for r in runs]
    if len(counts) > 1 and args.nights == 1 and all(totals):
        emit("scale_strong_scaling", {"items": args.items, "users": args.users, "workers": counts, "total_s": totals,
                                      "seconds_by_stage": [r["seconds"] for r in runs],
                                      "speedup_vs_first": [round(totals[0] / t, 2) for t in totals]})
    failed = [r["error"] for r in runs if r.get("error")]
    if failed:  # its figures are printed above (how far it got, with what memory); the run still failed
        sys.exit(f"bench_scale.py: {len(failed)} of {len(runs)} refresh(es) failed: {failed[0]}")


if __name__ == "__main__":
    main()
