"""Publish throughput, the same points in the same run: the embedded store (Qdrant's engine in
process, shards written side by side by Dask workers) against qdrant-client's local mode (the
embedded default before it), or a server with --url.

Items carry the refresh's three named vectors (text 384, blend 98 with HNSW over text only) and a
10-item list; users a 98-dim profile and a 10-item list, as the refresh writes them.

    .venv/bin/python tests/benchmarks/bench_publish.py --points 20000 --workers 2
"""

from __future__ import annotations

import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import numpy as np  # noqa: E402

from common import emit, parser  # noqa: E402


def version(n: int, dim: int, seed: int = 0) -> tuple[dict, dict]:
    from recommend.serving.payloads import item_payloads, user_payloads

    rng = np.random.default_rng(seed)
    ids = np.array([f"i{i}" for i in range(n)], dtype=object)
    text = rng.normal(size=(n, dim)).astype(np.float32)
    text /= np.linalg.norm(text, axis=1, keepdims=True)
    blend = rng.normal(size=(n, 98)).astype(np.float32)
    lists, scores = rng.integers(0, n, (n, 10)), rng.random((n, 10)).astype(np.float32)
    items = {"ids": ids.tolist(), "vectors": {"text": text, "blend": blend, "blend_query": blend[:, :97]},
             "payloads": item_payloads(ids, {"title": [f"title {i}" for i in range(n)]}, scores, lists,
                                       ["similar"] * n)}
    users = {"ids": [f"u{u}" for u in range(n)], "vectors": {"profile": blend},
             "payloads": user_payloads([f"u{u}" for u in range(n)], ids, scores, lists, ["history"] * n)}
    return items, users


def main() -> None:
    args_parser = parser(__doc__)
    args_parser.add_argument("--points", type=int, default=20_000, help="items, and as many users")
    args_parser.add_argument("--dim", type=int, default=384)
    args_parser.add_argument("--workers", type=int, default=2, help="Dask workers writing the embedded shards")
    args_parser.add_argument("--url", default=None, help="a Qdrant server instead of local mode for the baseline")
    args = args_parser.parse_args()
    from distributed import Client, LocalCluster
    from qdrant_client import QdrantClient

    from recommend.serving.publish import publish_version, stage_version
    from recommend.serving.versions import EmbeddedVersions

    items, users = version(args.points, args.dim)
    points = 2 * args.points
    with tempfile.TemporaryDirectory() as tmp:
        with LocalCluster(n_workers=args.workers, threads_per_worker=1, dashboard_address=":0",
                          silence_logs=40) as cluster, Client(cluster) as dask:
            t = time.perf_counter()
            publish_version(EmbeddedVersions(Path(tmp) / "store", "bench"), "a", items, users, metadata={}, dask=dask)
            ours = time.perf_counter() - t
        client = QdrantClient(url=args.url) if args.url else QdrantClient(path=str(Path(tmp) / "local"))
        t = time.perf_counter()
        stage_version(client, "bench", "a", items, users, metadata={})
        baseline = time.perf_counter() - t
        client.close()
    emit("publish_points_per_s", {"points": points, "dim": args.dim, "workers": args.workers,
                                  "embedded_points_per_s": round(points / ours, 1), "embedded_s": round(ours, 2),
                                  "baseline": args.url or "qdrant-client local mode",
                                  "baseline_points_per_s": round(points / baseline, 1), "baseline_s": round(baseline, 2),
                                  "speedup": round(baseline / ours, 2)})


if __name__ == "__main__":
    main()
