"""The lists stage's blocks (recommend/run/tasks/list_tasks.py): in this process, then on a LocalCluster of
1 and of 2 single-threaded workers, over the same space and index, in one run.

bench_scale's generator (seed 0) writes the files; the behaviour fit, the blended space and the index
are built once (outside the clock), then every item block and user block runs three times, one after
the other in the same run folder (its lists read and removed after each): in this process (the
baseline: what the driver did before; FAISS and BLAS on every core), on one worker, on two. It
prints the seconds of each, the ratios, the sum of the blocks' own seconds (the rest is the
cluster's overhead), and whether the three wrote the same lists.

    .venv/bin/python tests/benchmarks/bench_list_blocks.py --size 300000
"""

from __future__ import annotations

import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402

from common import emit, parser  # noqa: E402


def main() -> None:
    p = parser(__doc__)
    p.add_argument("--size", type=int, default=300_000, help="items = users, 10 events each")
    args = p.parse_args()
    from contextlib import nullcontext

    from bench_lists import load
    from bench_scale import generate
    from embedder.encoder import load_encoder
    from embedder.event_blocks import blocks_from_frame, read_user_ids
    from embedder.run_folder import RunFolder
    from embedder.standin import NAME
    from index.build import save_index
    from index.search import sample_rows
    from index.settings import IndexSettings
    from index.tune import build_tuned
    from recommend.ranking.blend import build_space
    from recommend.ranking.settings import BlendSettings, RankingSettings
    from recommend.config import DaskSettings
    from recommend.run.infra.cluster import dask_client
    from recommend.run.tasks.item_tasks import save_item_side
    from recommend.run.tasks.list_tasks import ListJob, list_blocks

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        generate(tmp / "data", args.size, args.size, 10.0, 8)
        events, items = load(tmp / "data")
        text = load_encoder(NAME).encode((items["title"] + ". " + items["description"]).tolist()).astype(np.float16)
        item_ids = items["item_id"].tolist()
        run = RunFolder(tmp / "run")
        blocks = blocks_from_frame(run, events[["user_id", "item_id", "ts", "event_type"]], item_ids,
                                   block_size=8192)  # the user blocks ingest writes
        user_ids = read_user_ids(run, blocks.n)
        blend = BlendSettings()
        settings = RankingSettings(weights={"view": 1.0, "cart": 3.0, "purchase": 5.0}, half_life_days=14.0, blend=blend)
        space = build_space(events, item_ids=item_ids, text=text, user_ids=user_ids, settings=settings)
        index, tuning = build_tuned(space.item_docs, space.item_queries, 10, IndexSettings(), space.users,
                                    np.flatnonzero(space.has_history), n_searches=len(user_ids) + len(item_ids))
        job = ListJob(10, blend.new_item_slots, blend.new_item_boost)
        sample = sample_rows(len(item_ids), 1000, 0)
        figures: dict = {"items": args.size, "users": len(user_ids), "events": len(events),
                         "index": "exact" if tuning.exact or tuning.fallback == "exact" else f"{tuning.knob}={tuning.value}"}
        written, seconds = {}, {}
        save_index(index, run.index)  # the blocks read the index and the item side from their run folder
        save_item_side(run, space.items, np.asarray(item_ids, dtype=object))
        for mode in ("in_process", "workers_1", "workers_2"):
            n = 0 if mode == "in_process" else int(mode[-1])
            with (dask_client(DaskSettings(n_workers=n, threads_per_worker=1)) if n else nullcontext()) as client:
                start, cpu = time.perf_counter(), time.process_time()  # the workers are up: their start is not counted
                parts = list_blocks(client, len(item_ids), blocks, settings, job, sample=sample)
                seconds[mode] = time.perf_counter() - start
                figures[f"{mode}_s"] = round(seconds[mode], 1)
                figures[f"{mode}_driver_cpu_s"] = round(time.process_time() - cpu, 1)
                figures[f"{mode}_blocks_s"] = round(sum(part.seconds for part in parts), 1)
            written[mode] = pd.read_parquet(run.lists)
            shutil.rmtree(run.lists)  # the next mode writes its own parts into the same run folder
            shutil.rmtree(run.parts)
        figures["blocks"] = len(parts)
        base = written["in_process"]  # the same lists; scores may differ in the last bits (BLAS on 1 thread or 2)
        figures["same_lists"] = all(base.drop(columns="score").equals(w.drop(columns="score")) for w in written.values())
        figures["max_score_difference"] = float(max((base.score - w.score).abs().max() for w in written.values()))
        figures["one_worker_over_two"] = round(seconds["workers_1"] / seconds["workers_2"], 2)  # unrounded: small runs too
        figures["in_process_over_two_workers"] = round(seconds["in_process"] / seconds["workers_2"], 2)
        emit("list_blocks", figures)


if __name__ == "__main__":
    main()
