"""The GPU path in one short call: encode texts/s and exact search throughput, each against its
baseline in the same run, and each answer checked.

Encode (texts like the sample shop's, made unique): sentence-transformers' own `model.encode` (fp32,
and under fp16 autocast), the GPU encoder (embedder/token_batches.py) alone, then the pipeline: a
refresh's embed step as the refresh runs it (each worker's encode threads, the vectors written to an
embeddings.parquet on a worker) through a Dask GPU worker with a cold content-hash cache, then again
with every text cached; the pipeline's rate against the GPU encoder's alone, in the same precision.
Cosines to fp32 on the CPU come from `--reference` (vectors of the first texts, made on a CPU).

Search (unit vectors from a seeded generator that numpy keeps stable across versions): every item's
top-k (itself excluded) and every user's top-k (seen items excluded) by exact search on the GPU
(index/device_search.py), against exact search on the CPU on a sample of the same queries (faiss's
where faiss is installed, torch's on every core otherwise). The GPU's answers are compared with
faiss's: computed here when faiss is there, and from `--expected` (made by `--write-expected` on a
machine with faiss) otherwise.

    python tests/benchmarks/bench_gpu.py --texts 200000 --items 1000000 --reference ref.npy --expected expected.npz
    .venv/bin/python tests/benchmarks/bench_gpu.py --write-expected expected.npz --items 1000000   # on a CPU
    .venv/bin/python tests/benchmarks/bench_gpu.py --device cpu --texts 2000 --items 20000          # a dry run
"""

from __future__ import annotations

import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402

from common import emit, parser  # noqa: E402

K = 10
SEEN = 20  # items each user has seen (excluded from their list)


def sample_texts(n: int) -> list[str]:
    """Texts as the sample shop makes them (config.yaml's template, about 29 tokens), each made
    unique by its number (the pipeline encodes a repeated text once)."""
    from recommend.run.commands.sample import make_items

    items = make_items(n, np.random.default_rng(0))
    return [f"{t}. {d} Category: {c}. No. {i}" for i, (t, d, c) in
            enumerate(zip(items["title"], items["description"], items["category"]))]


def unit_rows(n: int, d: int, seed: int) -> np.ndarray:
    """Seeded unit vectors, the same bits on any machine (PCG64's float32 stream is kept stable)."""
    x = np.random.Generator(np.random.PCG64(seed)).random((n, d), dtype=np.float32) - np.float32(0.5)
    return x / np.sqrt((x * x).sum(axis=1, keepdims=True))


def seen_items(n_users: int, n_items: int, seed: int):
    """SEEN seeded item ids per user, as CSR."""
    import scipy.sparse as sp

    cols = (np.random.Generator(np.random.PCG64(seed)).random((n_users, SEEN)) * n_items).astype(np.int64)
    indptr = np.arange(0, n_users * SEEN + 1, SEEN, dtype=np.int64)
    return sp.csr_matrix((np.ones(cols.size, dtype=np.int8), cols.ravel(), indptr), shape=(n_users, n_items))


def search_sets(n_items: int, d: int):
    """(item vectors, [(name, queries, exclusions)]): items against themselves, users against items."""
    import scipy.sparse as sp

    items = unit_rows(n_items, d, 1)
    own = sp.csr_matrix((np.ones(n_items, np.int8), np.arange(n_items), np.arange(n_items + 1)), shape=(n_items, n_items))
    return items, [("item_to_item", items, own), ("user_to_item", unit_rows(n_items, d, 2), seen_items(n_items, n_items, 3))]


def sample_of(n: int, m: int) -> np.ndarray:
    return np.arange(0, n, max(1, n // m))[:m]


def faiss_answer(items, queries, exclude, rows):
    """faiss's exact search (flat index on the CPU) for `rows` of the queries."""
    from index.build import build_index
    from index.search import search_excluding

    os.environ["RECS_SEARCH_DEVICE"] = "cpu"
    try:
        return search_excluding(build_index(items, "exact"), queries[rows], K, exclude[rows])
    finally:
        os.environ.pop("RECS_SEARCH_DEVICE")


def write_expected(path: str, n_items: int, d: int, m: int) -> None:
    items, sets = search_sets(n_items, d)
    rows = sample_of(n_items, m)
    out = {"rows": rows, "n_items": n_items, "d": d}
    for name, queries, exclude in sets:
        out[f"{name}_scores"], out[f"{name}_ids"] = faiss_answer(items, queries, exclude, rows)
    np.savez_compressed(path, **out)
    print(f"wrote {path}: faiss's answers for {len(rows)} queries of each set at {n_items} x {d}")


def agreement(got, expected, tol: float = 1e-4) -> dict:
    """How the GPU's answers match faiss's: rows with the same ids in the same order, the largest
    score difference, and rows where an id is missing that no tie explains."""
    (gs, gi), (es, ei) = got, expected
    same = (gi == ei).all(axis=1)
    unexplained = 0
    for row in np.flatnonzero(~same):
        clear = es[row] > es[row][np.isfinite(es[row])].min() + tol
        unexplained += not set(ei[row][clear]) <= set(gi[row])
    finite = np.isfinite(es)
    return {"rows": int(len(gi)), "rows_identical": int(same.sum()), "rows_differing_only_in_ties": int((~same).sum() - unexplained),
            "rows_wrong": int(unexplained), "max_score_diff": float(np.abs(gs[finite] - es[finite]).max())}


def bench_search(device: str, n_items: int, dims: list[int], cpu_sample: int, expected: str | None) -> None:
    import torch

    from index.device_search import device_top_k

    try:
        import faiss

        have_faiss = True
        emit("faiss", {"installed": True, "gpus": faiss.get_num_gpus() if hasattr(faiss, "get_num_gpus") else 0})
    except ImportError:
        have_faiss = False
        emit("faiss", {"installed": False, "gpus": None, "note": "no faiss on this machine"})
    reference = np.load(expected) if expected else None
    for d in dims:
        items, sets = search_sets(n_items, d)
        rows = sample_of(n_items, cpu_sample)
        for name, queries, exclude in sets:
            device_top_k(items, queries[:64], K, exclude[:64], device=device)  # the copy to the GPU, cuBLAS started
            if device == "cuda":
                torch.cuda.synchronize()
            start = time.perf_counter()
            got = device_top_k(items, queries, K, exclude, device=device)
            gpu_s = time.perf_counter() - start
            figures = {"set": name, "items": n_items, "queries": n_items, "dim": d, "k": K, "device": device,
                       "gpu_seconds": round(gpu_s, 2), "gpu_queries_per_s": round(n_items / gpu_s)}
            torch.set_num_threads(os.cpu_count() or 1)
            start = time.perf_counter()
            device_top_k(items, queries[rows], K, exclude[rows], device="cpu")
            cpu_torch_s = time.perf_counter() - start
            figures.update(cpu_torch_sample=len(rows), cpu_torch_queries_per_s=round(len(rows) / cpu_torch_s),
                           gpu_vs_cpu_torch=round((n_items / gpu_s) / (len(rows) / cpu_torch_s), 1))
            sampled = (got[0][rows], got[1][rows])
            if have_faiss:
                start = time.perf_counter()
                truth = faiss_answer(items, queries, exclude, rows)
                faiss_s = time.perf_counter() - start
                figures.update(cpu_faiss_queries_per_s=round(len(rows) / faiss_s),
                               gpu_vs_cpu_faiss=round((n_items / gpu_s) / (len(rows) / faiss_s), 1),
                               vs_faiss_here=agreement(sampled, truth))
            if reference is not None and int(reference["d"]) == d and int(reference["n_items"]) == n_items:
                r = reference["rows"]
                figures["vs_faiss_expected"] = agreement((got[0][r], got[1][r]),
                                                         (reference[f"{name}_scores"], reference[f"{name}_ids"]))
            emit("search_exact_gpu", figures)
            del got


def bench_encode(device: str, n: int, model: str, reference_path: str | None, st_texts: int,
                 threads_per_worker: list[int | None]) -> None:
    import torch

    from embedder.encoder import TorchEncoder
    from embedder.model import load_model, resolve_model_path
    from embedder.precision import cosine_report
    from embedder.settings import EmbedSettings
    from embedder.token_batches import TokenBatchEncoder

    texts = sample_texts(n)
    path = str(resolve_model_path(model))
    model_ = load_model(path, device)
    tokens = [len(t) for t in model_.tokenizer(texts[:5000])["input_ids"]]
    emit("encode_setup", {"device": device, "texts": n, "mean_tokens": round(float(np.mean(tokens)), 1),
                          "gpu": torch.cuda.get_device_name(0) if device == "cuda" else None,
                          "torch": torch.__version__, "cpus": os.cpu_count()})
    reference = np.load(reference_path) if reference_path else None

    def to_cpu_fp32(vectors):
        if reference is None:
            return {}
        m = min(len(reference), len(vectors))
        report = cosine_report(reference[:m], vectors[:m])
        return {"mean_cosine_to_cpu_fp32": report["mean_cosine"], "min_cosine_to_cpu_fp32": report["min_cosine"]}

    def timed(encode, batch):
        encode(batch[:2048])  # kernels compiled, memory pools filled: outside the clock
        if device == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        vectors = encode(batch)
        return vectors, time.perf_counter() - start

    few = texts[:st_texts]
    raw = {}
    for precision in ("fp32", "fp16") if device == "cuda" else ("fp32",):
        st = TorchEncoder(model_, device, precision)
        vectors, seconds = timed(lambda b: st.encode(b, batch_size=256), few)
        raw[precision] = len(few) / seconds
        emit("encode_raw_sentence_transformers", {"precision": precision + (" autocast" if precision != "fp32" else ""),
                                                  "batch_size": 256, "texts": len(few), "texts_per_s": round(raw[precision]),
                                                  **to_cpu_fp32(vectors)})
    baseline = max(raw.values())
    alone = {}  # the GPU encoder's texts/s by precision: the pipeline's ceiling
    for precision in ("fp16", "bf16", "fp32") if device == "cuda" else ("fp32", "bf16"):
        fast = TokenBatchEncoder.from_model(model_, device, precision)
        if fast is None:
            emit("failed", {"part": "token batches", "why": "this model's layout is not one TokenBatchEncoder runs"})
            break
        vectors, seconds = timed(lambda b: np.concatenate([fast.encode(b[i:i + 4096]) for i in range(0, len(b), 4096)]), texts)
        alone[precision] = n / seconds
        emit("encode_raw_token_batches", {"precision": precision, "texts": n, "chunk": 4096, "texts_per_s": round(n / seconds),
                                          "vs_best_sentence_transformers": round(n / seconds / baseline, 2), **to_cpu_fp32(vectors)})
    items = pd.DataFrame({"item_id": [str(i) for i in range(n)], "text": texts})
    settings = EmbedSettings(model=path, device=device)
    for threads in threads_per_worker:
        survive(pipeline, items, settings, device, threads, baseline, alone, to_cpu_fp32)


def pipeline(items, settings, device, threads, baseline, alone, to_cpu_fp32) -> None:
    """The embed step as a refresh runs it (recommend/run/stages.py: `encode_threads`, `out=` the run's
    embeddings.parquet) through a Dask cluster (one worker per GPU), cold cache, then every text cached."""
    from embedder.encode import embed_items
    from index.rows import parquet_rows
    from recommend.config import DaskSettings
    from recommend.run.infra.cluster import dask_client
    from recommend.run.infra.preflight import encode_threads

    n = len(items)
    with dask_client(DaskSettings(threads_per_worker=threads), device=device) as client, \
            tempfile.TemporaryDirectory() as folder:
        workers = client.scheduler_info()["workers"]
        cache, torch_threads = os.path.join(folder, "cache"), encode_threads(client)

        def embed(frame, name):
            return embed_items(frame, settings, cache_root=cache, client=client, threads=torch_threads,
                               out=os.path.join(folder, f"{name}.parquet"))

        warm = items.iloc[:2048].assign(item_id=lambda f: "warm-" + f["item_id"], text=lambda f: "warm up " + f["text"])
        embed(warm, "warm-up")  # each worker loads the model once, as in a refresh
        start = time.perf_counter()
        cold = embed(items, "cold")
        cold_s = time.perf_counter() - start
        start = time.perf_counter()
        again = embed(items, "cached")
        cached_s = time.perf_counter() - start
        chosen = cold.counts.precision.chosen
        emit("encode_pipeline", {
            "texts": n, "workers": len(workers), "threads_per_worker": [w["nthreads"] for w in workers.values()],
            "torch_threads": sorted(set(torch_threads.values())),
            "precision": chosen, "precision_check_mean_cosine": cold.counts.precision.mean_cosine,
            "cold_seconds": round(cold_s, 2), "cold_texts_per_s": round(n / cold_s),
            "encoded": cold.counts.items_encoded, "encode_seconds": cold.counts.encode_seconds,
            "vs_best_sentence_transformers": round(n / cold_s / baseline, 2),
            "vs_gpu_encoder_alone": round(n / cold_s / alone[chosen], 2) if chosen in alone else None,
            "cached_seconds": round(cached_s, 3), "cached_from_cache": again.counts.items_from_cache,
            "cached_encoded": again.counts.items_encoded, "cached_share_of_cold": round(cached_s / cold_s, 3),
            **to_cpu_fp32(parquet_rows(os.path.join(folder, "cold.parquet"), dtype=np.float32)[:4096])})


def main() -> None:
    args = parser(__doc__)
    args.add_argument("--device", choices=("cuda", "cpu"), default="cuda", help="cpu: a dry run of this script")
    args.add_argument("--texts", type=int, default=200_000)
    args.add_argument("--st-texts", type=int, default=40_000, help="texts for sentence-transformers' own encode")
    args.add_argument("--model", default="all-MiniLM-L6-v2")
    args.add_argument("--reference", help=".npy of fp32 CPU vectors of the first texts (see --write-reference)")
    args.add_argument("--write-reference", type=int, metavar="N", help="write fp32 CPU vectors of the first N texts to --reference")
    args.add_argument("--items", type=int, default=1_000_000, help="items (and users) for the search")
    args.add_argument("--dims", default="64,384")
    args.add_argument("--cpu-sample", type=int, default=4096, help="queries searched on the CPU, and compared")
    args.add_argument("--expected", help="faiss's answers for the sample (see --write-expected)")
    args.add_argument("--write-expected", metavar="PATH")
    args.add_argument("--gpu-threads", default="2,4", help="threads per Dask GPU worker, a pipeline run each")
    args.add_argument("--skip", default="", help="encode or search")
    a = args.parse_args()
    dims = [int(d) for d in a.dims.split(",")]
    if a.write_expected:
        return write_expected(a.write_expected, a.items, dims[0], a.cpu_sample)
    if a.write_reference:
        from embedder.encoder import TorchEncoder
        from embedder.model import load_model, resolve_model_path

        model = load_model(str(resolve_model_path(a.model)), "cpu")
        np.save(a.reference, TorchEncoder(model, "cpu", "fp32").encode(sample_texts(a.write_reference), batch_size=64))
        return print(f"wrote {a.reference}")
    if "encode" not in a.skip:
        threads = [int(t) for t in a.gpu_threads.split(",")] if a.device == "cuda" else [None]
        survive(bench_encode, a.device, a.texts, a.model, a.reference, min(a.st_texts, a.texts), threads)
    if "search" not in a.skip:
        survive(bench_search, a.device, a.items, dims, a.cpu_sample, a.expected)

def survive(part, *args) -> None:
    """Run one part; a failure is printed and the next part still runs (one call on a lent machine)."""
    import traceback

    try:
        part(*args)
    except Exception:
        traceback.print_exc()
        emit("failed", {"part": part.__name__})


if __name__ == "__main__":
    main()
