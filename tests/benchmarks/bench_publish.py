"""Qdrant publish throughput (local mode unless --url): `stage_version` as the refresh calls it against
qdrant-client's own `upload_points` with its defaults, the same points, in the same run.

    .venv/bin/python tests/benchmarks/bench_publish.py --points 20000
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


def main() -> None:
    args_parser = parser(__doc__)
    args_parser.add_argument("--points", type=int, default=20_000)
    args_parser.add_argument("--dim", type=int, default=384)
    args_parser.add_argument("--batch-size", type=int, default=256)
    args_parser.add_argument("--url", default=None, help="a Qdrant server; default: local mode in a temp folder")
    args = args_parser.parse_args()
    from qdrant_client import QdrantClient, models

    from recommend.serving.publish import item_payloads, point_id, stage_version

    rng = np.random.default_rng(0)
    vectors = rng.normal(size=(args.points, args.dim)).astype(np.float32)
    ids = [f"i{i}" for i in range(args.points)]
    neighbours = rng.integers(0, args.points, (args.points, 10))
    payloads = item_payloads(np.array(ids, dtype=object), {}, rng.random((args.points, 10)).astype(np.float32),
                             neighbours, "bench", ["similar"] * args.points)
    users = {"ids": ["u0"], "vectors": vectors[:1], "payloads": [{"user_id": "u0"}]}
    with tempfile.TemporaryDirectory() as tmp:
        client = QdrantClient(url=args.url) if args.url else QdrantClient(path=tmp)
        t = time.perf_counter()
        stage_version(client, "bench", "a", {"ids": ids, "vectors": vectors, "payloads": payloads}, users, metadata={},
                      batch_size=args.batch_size)
        ours = time.perf_counter() - t
        client.create_collection("baseline", vectors_config={"text": models.VectorParams(size=args.dim, distance=models.Distance.DOT)})
        t = time.perf_counter()
        client.upload_points("baseline", points=[models.PointStruct(id=point_id("item", i), vector={"text": v.tolist()}, payload=p)
                                                 for i, v, p in zip(ids, vectors, payloads)])
        assert client.count("baseline", exact=True).count == args.points
        baseline = time.perf_counter() - t
        client.close()
    emit("publish_points_per_s", {"points": args.points, "dim": args.dim, "target": args.url or "local mode",
                                  "batch_size": args.batch_size, "ours_points_per_s": round(args.points / ours, 1),
                                  "upload_points_default_per_s": round(args.points / baseline, 1),
                                  "ratio": round(baseline / ours, 3)})


if __name__ == "__main__":
    main()
