"""A text shard carried from night to night against the same shard written whole, in one run
(recommend/serving/text_shards.py): the first night writes it whole (the HNSW graph over every text
vector), each next night changes a share of the items' vectors (--change) and writes the shard twice,
carried from the night before and whole, timing both and measuring each one's recall@10 against
exact search over that night's vectors (the reader's own search: 200 deep, int8 rescored).

The vectors are clustered (--clusters centres and noise, unit length), 384 dims as the model's.

    .venv/bin/python tests/benchmarks/bench_text_shards.py --items 100000 --nights 3
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

from common import emit, parser  # noqa: E402


def catalog(n: int, dim: int, clusters: int, rng) -> np.ndarray:
    centres = rng.normal(size=(clusters, dim)).astype(np.float32)
    vectors = centres[rng.integers(0, clusters, n)] + 0.7 * rng.normal(size=(n, dim)).astype(np.float32)
    return vectors / np.linalg.norm(vectors, axis=1, keepdims=True)


def batches(ids: list[str], vectors: np.ndarray, size: int = 8192):
    for start in range(0, len(ids), size):
        rows = slice(start, start + size)
        yield ids[rows], {"text": vectors[rows]}, [{"item_id": i} for i in ids[rows]]


def recall(folder: Path, vectors: np.ndarray, queries: np.ndarray, k: int = 10) -> float:
    """recall@k of the shard's search (through a reader's private view) against exact search."""
    from recommend.serving.shards import ShardView

    view = ShardView(folder, folder.parent / f"view-{folder.name}")
    try:
        from qdrant_edge import QuantizationSearchParams, Query, QueryRequest, SearchParams

        params = SearchParams(hnsw_ef=200, quantization=QuantizationSearchParams(rescore=True, oversampling=2.0))
        truth = np.argsort(-(queries @ vectors.T), axis=1)[:, :k]
        found = 0
        for q, true in zip(queries, truth):
            hits = view.engine.query(QueryRequest(limit=k, query=Query.Nearest(q.tolist(), using="text"), params=params,
                                                  with_payload=True))
            found += len({h.payload["item_id"] for h in hits} & {f"i{j}" for j in true})
        return found / (k * len(queries))
    finally:
        view.close()


def main() -> None:
    args_parser = parser(__doc__)
    args_parser.add_argument("--items", type=int, default=100_000)
    args_parser.add_argument("--nights", type=int, default=3)
    args_parser.add_argument("--change", type=float, default=0.01, help="share of the items changed each next night")
    args_parser.add_argument("--dim", type=int, default=384)
    args_parser.add_argument("--clusters", type=int, default=200)
    args_parser.add_argument("--queries", type=int, default=200)
    args = args_parser.parse_args()

    from recommend.serving.shards import Graph, VectorSpec
    from recommend.serving.text_shards import write_text_shard

    rng = np.random.default_rng(0)
    vectors = catalog(args.items, args.dim, args.clusters, rng)
    ids = [f"i{j}" for j in range(args.items)]
    spec, graph = VectorSpec(args.dim, indexed=True), Graph(m=16)
    with tempfile.TemporaryDirectory() as tmp:
        root, before = Path(tmp), None
        for night in range(1, args.nights + 1):
            changed = 0
            if night > 1:
                rows = rng.choice(args.items, max(1, int(args.change * args.items)), replace=False)
                vectors[rows] = catalog(len(rows), args.dim, args.clusters, rng)
                changed = len(rows)
            queries = vectors[rng.choice(args.items, min(args.queries, args.items), replace=False)]
            figures = {"items": args.items, "night": night, "items_changed": changed}
            for way in (["carried", "whole"] if before else ["whole"]):
                folder = root / f"{way}-{night}" / "texts-000"
                started = time.perf_counter()
                info = write_text_shard(folder, spec, batches(ids, vectors), (0, 1), graph,
                                        previous=before[0] if way == "carried" else None,
                                        previous_info=before[1] if way == "carried" else None)
                figures[f"{way}_s"] = round(time.perf_counter() - started, 2)
                figures[f"{way}_recall_at_10"] = recall(folder, vectors, queries)
                if way == "carried" and not info["carried"]:
                    sys.exit(f"night {night}: the text shard was not carried")
                if way == "carried" or not before:
                    kept = (folder, info)  # what the next night starts from
                else:
                    shutil.rmtree(folder.parent)  # the night's baseline only
            if before:
                shutil.rmtree(before[0].parent)
                figures["whole_over_carried"] = round(figures["whole_s"] / figures["carried_s"], 2)
            before = kept
            emit("text_shard_night", figures)


if __name__ == "__main__":
    main()
