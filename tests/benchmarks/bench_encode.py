"""Encode throughput: the pipeline's embed step (Dask LocalCluster, cold cache) against raw
`model.encode` in one process with all cores, on the same texts in the same run; and the default
precision against fp32 (speed and cosine).

    .venv/bin/python tests/benchmarks/bench_encode.py --texts 2000
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402

from common import emit, parser, texts, timed  # noqa: E402


def raw_encode(batch: list[str], precision: str) -> tuple[np.ndarray, float]:
    import os

    import torch

    from embedder.encode import encode_chunk
    from embedder.model import resolve_model_path

    torch.set_num_threads(os.cpu_count() or 1)
    path = str(resolve_model_path("all-MiniLM-L6-v2"))
    encode_chunk(batch[:8], path, "cpu", precision=precision)  # load and warm up outside the clock
    t = {}
    with timed(t, "s"):
        vectors = encode_chunk(batch, path, "cpu", batch_size=64, precision=precision)
    return vectors, t["s"]


def pipeline_encode(batch: list[str], precision: str, keep_malloc_trim: bool) -> tuple[np.ndarray, float, dict]:
    from embedder.encode import embed_items, encode_chunk
    from embedder.model import resolve_model_path
    from recommend.cluster import dask_client

    path = str(resolve_model_path("all-MiniLM-L6-v2"))
    items = pd.DataFrame({"item_id": [str(i) for i in range(len(batch))], "text": batch})
    with dask_client(None, None, 1, keep_malloc_trim=keep_malloc_trim) as client, tempfile.TemporaryDirectory() as cache:
        n_workers = len(client.scheduler_info()["workers"])
        client.run(encode_chunk, ["warm up"], path, "cpu", 64, 1)  # each worker loads the model once, as in a refresh
        t = {}
        with timed(t, "s"):
            result = embed_items(items, "all-MiniLM-L6-v2", cache, client, "cpu", 64, 1024, 1, precision=precision)
    return result.vectors, t["s"], {"workers": n_workers, **result.counts}


def main() -> None:
    args_parser = parser(__doc__)
    args_parser.add_argument("--texts", type=int, default=2000)
    args_parser.add_argument("--skip-trim", action="store_true", help="skip the run with Dask's MALLOC_TRIM_THRESHOLD_")
    args = args_parser.parse_args()
    batch = texts(args.texts)
    from embedder.precision import resolve_precision

    default = resolve_precision("auto", "cpu")
    raw32, raw32_s = raw_encode(batch, "fp32")
    pipe32, pipe32_s, counts32 = pipeline_encode(batch, "fp32", keep_malloc_trim=False)
    n = len(batch)
    emit("encode_fp32_pipeline_vs_raw", {
        "texts": n, "raw_texts_per_s": round(n / raw32_s, 1), "pipeline_texts_per_s": round(n / pipe32_s, 1),
        "ratio": round(raw32_s / pipe32_s, 3), "workers": counts32["workers"],
        "max_abs_diff": float(np.abs(pipe32 - raw32).max())})
    if not args.skip_trim:
        _, trim_s, _ = pipeline_encode(batch, "fp32", keep_malloc_trim=True)
        emit("encode_fp32_dask_malloc_trim_vs_ours", {"texts": n, "ours_s": pipe32_s, "with_dask_trim_s": trim_s,
                                                       "ratio": round(trim_s / pipe32_s, 3)})
    if default != "fp32":
        rawlo, rawlo_s = raw_encode(batch, default)
        pipelo, pipelo_s, countslo = pipeline_encode(batch, default, keep_malloc_trim=False)
        cos = (raw32 * pipelo).sum(axis=1) / np.linalg.norm(raw32, axis=1) / np.linalg.norm(pipelo, axis=1)
        emit(f"encode_{default}_pipeline_vs_raw_fp32", {
            "texts": n, "precision": default, "raw_fp32_texts_per_s": round(n / raw32_s, 1),
            "raw_texts_per_s": round(n / rawlo_s, 1), "pipeline_texts_per_s": round(n / pipelo_s, 1),
            "ratio_vs_raw_fp32": round(raw32_s / pipelo_s, 3), "raw_ratio_vs_fp32": round(raw32_s / rawlo_s, 3),
            "mean_cosine_to_fp32": round(float(cos.mean()), 6), "min_cosine_to_fp32": round(float(cos.min()), 6),
            "check": countslo.get("precision")})
    else:
        emit("encode_default_precision", {"precision": "fp32", "note": "no bf16 instructions on this CPU, no GPU"})


if __name__ == "__main__":
    main()
