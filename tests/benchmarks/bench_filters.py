"""Filters on the stored lists (`lists.keep`): for each filter, how many cold users' filtered lists
the stored list answers alone (no vector query) and the time a request takes, with the lists k deep
(the baseline) and kept deeper, on one sample in one run: each keep is a refresh of the same shop,
then the facade in this process, warm, one thread, the same users for every keep.

    .venv/bin/python tests/benchmarks/bench_filters.py          # the sample, 3,000 items x 5,000 users, real model
    .venv/bin/python tests/benchmarks/bench_filters.py --keeps 30,100 --filters "price<146;price<73;category=Running"
"""

from __future__ import annotations

import os
import random
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import yaml  # noqa: E402

from common import emit, parser  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]


def timed_filters(config: Path, filters: list[list[str]], users: list[str]) -> dict:
    """{filter text: (ms a request, answered by the stored list alone)} on the live version."""
    from recommend.serving import facade
    from recommend.serving.facade import Recommender

    snap = Recommender.from_config(str(config), poll_s=1e9).live.current()
    out = {}
    for where in filters:
        found = facade.where_of(snap, where)
        for u in users[:20]:  # warm
            facade.user_answer(snap, u, 10, None, found)
        started, paths = time.perf_counter(), Counter()
        for u in users:
            try:
                facade.user_answer(snap, u, 10, None, found, vector_query=False)
                paths["list"] += 1
            except facade.NeedsQuery as needs:
                needs.then()
                paths["query"] += 1
        out["&".join(where)] = ((time.perf_counter() - started) / len(users) * 1000, paths["list"])
    return out


def main() -> None:
    ap = parser(__doc__)
    ap.add_argument("--items", type=int, default=3000)
    ap.add_argument("--users", type=int, default=5000)
    ap.add_argument("--asked", type=int, default=400, help="cold users asked per filter")
    ap.add_argument("--keeps", default="30,100", help="lists.keep values beside the baseline (k)")
    ap.add_argument("--filters", default="price<146;price<73;category=Running", help="';' between filters, '&' within one")
    ap.add_argument("--model", default="all-MiniLM-L6-v2")
    args = ap.parse_args()
    recs, env = [sys.executable, "-m", "recommend.cli"], {**os.environ, "PYTHONPATH": str(ROOT)}
    filters = [f.split("&") for f in args.filters.split(";")]
    with tempfile.TemporaryDirectory(prefix="bench-filters-") as folder:
        folder = Path(folder)
        subprocess.run([*recs, "sample", str(folder / "data" / "sample"), "--items", str(args.items), "--users", str(args.users)],
                       check=True, env=env, stdout=subprocess.DEVNULL)
        data = yaml.safe_load((ROOT / "config.yaml").read_text())
        data["embed"]["model"] = args.model
        users = random.Random(3).sample([f"U{u:05d}" for u in range(args.users)], min(args.asked, args.users))
        baseline = None
        for keep in [None, *(int(k) for k in args.keeps.split(",") if k.strip())]:
            data["lists"]["keep"] = keep
            config = folder / "config.yaml"
            config.write_text(yaml.safe_dump(data))
            subprocess.run([*recs, "refresh", "-q", "-c", str(config)], check=True, env=env, stdout=subprocess.DEVNULL)
            figures = timed_filters(config, filters, users)
            baseline = baseline or figures
            for name, (ms, from_list) in figures.items():
                emit("filters_keep", {"keep": keep or data["lists"]["k"], "filter": name, "ms_per_request": round(ms, 3),
                                      "from_list": from_list, "asked": len(users),
                                      "speedup_vs_k_deep": round(baseline[name][0] / ms, 2), "items": args.items,
                                      "users": args.users, "model": args.model})


if __name__ == "__main__":
    main()
