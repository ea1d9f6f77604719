"""Encode throughput: the pipeline's embed step (Dask LocalCluster, cold cache) against raw
`model.encode` in one process with all cores, on the same texts in the same run; and the default
precision, and int8 where the onnx extra is installed, against fp32 (speed and cosine). On a GPU machine the same comparison runs on the GPU
(one Dask worker per GPU), over more texts and at each of --batch-sizes.

    .venv/bin/python tests/benchmarks/bench_encode.py --texts 2000
    python tests/benchmarks/bench_encode.py --device cuda --texts 40000 --batch-sizes 64,256,1024
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


def raw_encode(batch: list[str], precision: str, device: str = "cpu", batch_size: int = 64,
               model: str = "all-MiniLM-L6-v2") -> tuple[np.ndarray, float]:
    import os

    import torch

    from embedder.encode import encode_chunk
    from embedder.model import resolve_model_path

    torch.set_num_threads(os.cpu_count() or 1)
    path = str(resolve_model_path(model))
    warm = batch[:8] if device == "cpu" else batch[:256]  # a GPU also compiles its kernels on first use
    encode_chunk(warm, path, device=device, precision=precision)  # load and warm up outside the clock
    t = {}
    with timed(t, "s"):
        vectors = encode_chunk(batch, path, device=device, batch_size=batch_size, precision=precision)
    return vectors, t["s"]


def pipeline_encode(batch: list[str], precision: str, keep_malloc_trim: bool, device: str = "cpu",
                    batch_size: int = 64, model: str = "all-MiniLM-L6-v2",
                    threads_per_worker: int = 1) -> tuple[np.ndarray, float, dict]:
    from embedder.encode import embed_items, encode_chunk
    from embedder.model import resolve_model_path
    from embedder.settings import EmbedSettings
    from recommend.config import DaskSettings
    from recommend.run.infra.cluster import dask_client, worker_layout

    path = str(resolve_model_path(model))
    items = pd.DataFrame({"item_id": [str(i) for i in range(len(batch))], "text": batch})
    torch_threads = 1 if device == "cpu" else None
    with dask_client(DaskSettings(threads_per_worker=threads_per_worker), keep_malloc_trim=keep_malloc_trim, device=device) as client, \
            tempfile.TemporaryDirectory() as cache:
        n_workers = len(client.scheduler_info()["workers"])
        # each worker loads the model once, as in a refresh
        client.run(encode_chunk, batch[:8] if device == "cpu" else batch[:256], path, device=device,
                   batch_size=batch_size, threads=torch_threads)
        t = {}
        with timed(t, "s"):
            result = embed_items(items, EmbedSettings(model=model, device=device, batch_size=batch_size, precision=precision),
                                 cache_root=cache, client=client, threads=torch_threads)
    layout = worker_layout(device, None, threads_per_worker)
    return result.vectors, t["s"], {"workers": n_workers, "layout": layout["kind"],
                                    "threads_per_worker": layout["threads_per_worker"], **result.counts.model_dump()}


def cosines(reference: np.ndarray, other: np.ndarray) -> dict:
    from embedder.precision import cosine_report

    report = cosine_report(reference, other)
    return {"mean_cosine_to_fp32": report["mean_cosine"], "min_cosine_to_fp32": report["min_cosine"]}


def gpu(batch: list[str], model: str, batch_sizes: list[int], reference: np.ndarray | None,
        threads: list[int]) -> None:
    """The GPU comparison: raw `model.encode` at each precision and batch size, then the pipeline
    (one Dask worker per GPU), in fp32 and the default precision, each at its fastest raw batch size."""
    import torch

    from embedder.precision import resolve_precision

    n = len(batch)
    emit("encode_gpu_device", {"gpu": torch.cuda.get_device_name(0), "gpus": torch.cuda.device_count(),
                               "torch": torch.__version__, "texts": n})
    default = resolve_precision("auto", "cuda")
    raw: dict[tuple[str, int], tuple[np.ndarray, float]] = {}
    for size in batch_sizes:
        for precision in ("fp32", "fp16", "bf16"):
            raw[precision, size] = raw_encode(batch, precision, "cuda", size, model)
            vectors, seconds = raw[precision, size]
            figures = {"texts": n, "precision": precision, "batch_size": size,
                       "raw_texts_per_s": round(n / seconds, 1),
                       "ratio_vs_raw_fp32": round(raw["fp32", size][1] / seconds, 3)}
            figures.update(cosines(raw["fp32", size][0], vectors))
            if reference is not None:  # fp32 on the CPU, with the original weights, for the first texts
                m = min(len(reference), n)
                figures["mean_cosine_to_cpu_fp32"] = cosines(reference[:m], vectors[:m])["mean_cosine_to_fp32"]
            emit("encode_gpu_raw", figures)
    for per_worker in threads:
        for precision in ("fp32", default):
            best = min(batch_sizes, key=lambda size: raw[precision, size][1])
            vectors, seconds, counts = pipeline_encode(batch, precision, False, "cuda", best, model, per_worker)
            emit("encode_gpu_pipeline_vs_raw", {
                "texts": n, "precision": precision, "batch_size": best, "threads_per_worker": per_worker,
                "pipeline_texts_per_s": round(n / seconds, 1),
                "raw_texts_per_s": round(n / raw[precision, best][1], 1),
                "ratio_vs_raw_same_precision": round(raw[precision, best][1] / seconds, 3),
                "ratio_vs_raw_fp32": round(raw["fp32", best][1] / seconds, 3),
                "workers": counts["workers"], "layout": counts["layout"], "check": counts.get("precision"),
                "encode_seconds": counts["encode_seconds"], "cache_lookup_seconds": counts["cache_lookup_seconds"],
                **cosines(raw["fp32", best][0], vectors)})


def main() -> None:
    args_parser = parser(__doc__)
    args_parser.add_argument("--texts", type=int, default=2000)
    args_parser.add_argument("--skip-trim", action="store_true", help="skip the run with Dask's MALLOC_TRIM_THRESHOLD_")
    args_parser.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto",
                             help="auto: the GPU comparison when torch sees a GPU, else the CPU one")
    args_parser.add_argument("--model", default="all-MiniLM-L6-v2",
                             help="the packaged model, a local folder, or stand-in:hashing-384 (run.py --smoke: the code path only)")
    args_parser.add_argument("--batch-sizes", default="64,256,1024", help="GPU only: raw encode at each")
    args_parser.add_argument("--gpu-threads", default="1,2", help="GPU only: threads per Dask worker to try")
    args_parser.add_argument("--reference", help="GPU only: a .npy of CPU fp32 vectors for the first texts")
    args = args_parser.parse_args()
    batch = texts(args.texts)
    from embedder.model import pick_device

    if pick_device(args.device) == "cuda":
        reference = np.load(args.reference) if args.reference else None
        gpu(batch, args.model, [int(b) for b in args.batch_sizes.split(",")], reference,
            [int(t) for t in args.gpu_threads.split(",")])
        return
    from embedder.precision import resolve_precision

    default = resolve_precision("auto", "cpu")
    raw32, raw32_s = raw_encode(batch, "fp32", model=args.model)
    pipe32, pipe32_s, counts32 = pipeline_encode(batch, "fp32", keep_malloc_trim=False, model=args.model)
    n = len(batch)
    emit("encode_fp32_pipeline_vs_raw", {
        "texts": n, "raw_texts_per_s": round(n / raw32_s, 1), "pipeline_texts_per_s": round(n / pipe32_s, 1),
        "ratio": round(raw32_s / pipe32_s, 3), "workers": counts32["workers"],
        "max_abs_diff": float(np.abs(pipe32 - raw32).max())})
    if not args.skip_trim:
        _, trim_s, _ = pipeline_encode(batch, "fp32", keep_malloc_trim=True, model=args.model)
        emit("encode_fp32_dask_malloc_trim_vs_ours", {"texts": n, "ours_s": round(pipe32_s, 3), "with_dask_trim_s": round(trim_s, 3),
                                                       "ratio": round(trim_s / pipe32_s, 3)})
    from embedder.quantized import available

    reduced = [p for p in dict.fromkeys([default, "int8" if available() else None]) if p not in (None, "fp32")]
    for precision in reduced:  # each against the same raw fp32 run
        rawlo, rawlo_s = raw_encode(batch, precision, model=args.model)
        pipelo, pipelo_s, countslo = pipeline_encode(batch, precision, keep_malloc_trim=False, model=args.model)
        cos = (raw32 * pipelo).sum(axis=1) / np.linalg.norm(raw32, axis=1) / np.linalg.norm(pipelo, axis=1)
        emit(f"encode_{precision}_pipeline_vs_raw_fp32", {
            "texts": n, "precision": precision, "default": precision == default,
            "raw_fp32_texts_per_s": round(n / raw32_s, 1),
            "raw_texts_per_s": round(n / rawlo_s, 1), "pipeline_texts_per_s": round(n / pipelo_s, 1),
            "ratio_vs_raw_fp32": round(raw32_s / pipelo_s, 3), "raw_ratio_vs_fp32": round(raw32_s / rawlo_s, 3),
            "mean_cosine_to_fp32": round(float(cos.mean()), 6), "min_cosine_to_fp32": round(float(cos.min()), 6),
            "check": countslo.get("precision")})
    if not reduced:
        emit("encode_default_precision", {"precision": "fp32", "note": "no bf16 instructions on this CPU, no GPU, no onnx extra"})


if __name__ == "__main__":
    main()
