"""Incremental refresh: a rerun with 1% of item texts changed against the cold first run (same data,
same machine), with the real model. Each is `recs refresh --json` in a fresh process, as a night
starts one: both start their own Dask cluster and load the model on its workers, and only the cold one
finds the embedding cache empty. Figures for the whole refresh (the report's total, and the command's
wall time with Python's start) and for its embed stage, and how many of the published lists the
change touched (their items, or only their scores): what a publish of changed points only could save.

    .venv/bin/python tests/benchmarks/bench_incremental.py --items 3000
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import pandas as pd  # noqa: E402
import yaml  # noqa: E402

from common import emit, parser  # noqa: E402


def lists_changed(before: Path, after: Path) -> dict:
    """Per kind of list, the share of subjects whose list differs between two runs' lists.parquet:
    in its items (ids in rank order) or in anything published (ids, or scores to 5 decimals)."""
    frames = [pd.read_parquet(run / "lists.parquet") for run in (before, after)]
    out = {}
    for kind in ("item", "user"):
        keyed = []
        for frame in frames:
            rows = frame[frame["subject_kind"] == kind].sort_values(["subject_id", "rank"])
            rows = rows.assign(score=rows["score"].round(5))
            keyed.append(rows.groupby("subject_id", observed=True).agg(ids=("item_id", tuple), scores=("score", tuple)))
        both = keyed[0].merge(keyed[1], left_index=True, right_index=True, how="outer", suffixes=("_before", "_after"))
        ids = both["ids_before"] != both["ids_after"]
        out[kind] = {"lists": len(both), "items_changed": round(float(ids.mean()), 4),
                     "published_changed": round(float((ids | (both["scores_before"] != both["scores_after"])).mean()), 4)}
    return out


ROOT = Path(__file__).resolve().parents[2]


def refresh_in_new_process(config: Path) -> tuple[dict, float]:
    """`recs refresh --config CONFIG --json` in a fresh Python process: its report, and the command's
    wall seconds (Python's start and imports included)."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), *filter(None, [os.environ.get("PYTHONPATH")])])}
    started = time.perf_counter()
    done = subprocess.run([sys.executable, "-m", "recommend.cli", "refresh", "--config", str(config), "--json", "--quiet"],
                          stdout=subprocess.PIPE, text=True, env=env, cwd=ROOT)  # its stderr shows
    seconds = time.perf_counter() - started
    if done.returncode:
        sys.exit(f"bench_incremental.py: recs refresh exited {done.returncode}")
    return json.loads(done.stdout.strip().splitlines()[-1]), seconds


def main() -> None:
    args_parser = parser(__doc__)
    args_parser.add_argument("--items", type=int, default=3000)
    args_parser.add_argument("--changed", type=float, default=0.01)
    args_parser.add_argument("--model", default="all-MiniLM-L6-v2",
                             help="the packaged model, a local folder, or stand-in:hashing-384 (run.py --smoke: the code path only)")
    args = args_parser.parse_args()
    from recommend.run.commands.sample import write_sample

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        paths = write_sample(tmp / "data", n_items=args.items, n_users=max(100, args.items // 2))
        config_path = tmp / "config.yaml"
        config_path.write_text(yaml.safe_dump({
            "workdir": str(tmp / "work"),
            "items": {"path": str(paths["items"]), "text": "{title}. {description} Category: {category}.",
                      "metadata": ["title", "category"]},
            "events": {"path": str(paths["events"])}, "lists": {"k": 10}, "embed": {"model": args.model},
            "dask": {"threads_per_worker": 1}}))
        cold, cold_wall = refresh_in_new_process(config_path)
        items = pd.read_parquet(paths["items"])
        n = max(1, int(len(items) * args.changed))
        items.loc[items.index[:n], "description"] = items["description"].iloc[:n] + " Now in a new colour."
        items.to_parquet(paths["items"], index=False)
        warm, warm_wall = refresh_in_new_process(config_path)
        changed = lists_changed(Path(cold["run_dir"]), Path(warm["run_dir"]))
    emit("incremental_vs_cold", {
        "items": args.items, "changed": n, "encoded_cold": cold["embed"]["items_encoded"], "encoded_incremental": warm["embed"]["items_encoded"],
        "cold_s": cold["seconds"]["total"], "incremental_s": warm["seconds"]["total"],
        "ratio_total": round(cold["seconds"]["total"] / warm["seconds"]["total"], 2),
        "cold_embed_s": cold["seconds"]["embed"], "incremental_embed_s": warm["seconds"]["embed"],
        "ratio_embed": round(cold["seconds"]["embed"] / warm["seconds"]["embed"], 2),
        "cold_command_s": round(cold_wall, 1), "incremental_command_s": round(warm_wall, 1),
        "ratio_command": round(cold_wall / warm_wall, 2), "processes": "one fresh process per refresh",
        "incremental_stages_s": warm["seconds"], "lists_changed": changed, "model": args.model})


if __name__ == "__main__":
    main()
