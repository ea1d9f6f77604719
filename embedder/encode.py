"""Encode item texts: cache hits are read, misses are encoded in length-sorted chunks on Dask workers.

Sorting all misses by length *before* cutting them into chunks keeps each batch's padding small even
though the work is spread over workers (a partition that sorts only itself pads more). Chunks are
small enough that every worker has about eight, and the longest go first, so no worker idles at the end.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
from pydantic import BaseModel

from embedder.cache import STORED_DTYPE, EmbeddingCache, arrow_strings, content_hashes
from embedder.embeddings_file import write_embeddings
from embedder.encoder import load_encoder
from embedder.model import model_fingerprint, pick_device, resolve_model_path
from embedder.precision import MIN_MEAN_COSINE, cosine_report, resolve_precision
from embedder.settings import EmbedSettings
from embedder.standin import is_standin
from embedder.task_window import in_window, one_task, task_slots


GPU_CHUNK = 4096  # texts per task at least, on a GPU (fewer, larger tasks keep it fed)
HASH_CHUNK = 1 << 16  # texts per hashing task


class PrecisionCheck(BaseModel):
    """The precision a run asked for and the one it encoded in, with its check against fp32."""

    requested: str
    chosen: str
    mean_cosine: float | None = None
    min_cosine: float | None = None
    sample: int | None = None
    ok: bool | None = None
    fallback: str | None = None  # why fp32 was chosen instead


class EmbedCounts(BaseModel):
    items_encoded: int
    items_from_cache: int
    cache_lookup_seconds: float
    encode_seconds: float
    texts_per_second: float | None
    precision: PrecisionCheck
    cache_files_set_aside: list[str] = []  # damaged cache files moved aside (their items were encoded again)


@dataclass
class EmbedResult:
    """Vectors aligned with the input items, and what it took."""

    item_ids: list[str]
    content_hashes: list[str] | None  # None once the refresh has written them to embeddings.parquet
    vectors: np.ndarray | None  # (n, dim) L2-normalised, float16 as stored in the cache (cast where needed); None: in `out`
    model_fingerprint: str
    counts: EmbedCounts


def encode_chunk(texts: list[str], model_path: str, *, precision: str = "fp32", device: str = "auto",
                 batch_size: int = 64, threads: int | dict[str, int] | None = None, dtype=np.float32) -> np.ndarray:
    """Encode one chunk in the current process (a Dask worker or the caller) with the encoder
    `load_encoder` makes once per process. `precision`: resolved (embedder/precision.py). `threads`:
    a count, or a count per worker address (the worker this task runs on looks up its own).
    `dtype`: of the rows returned (cast here, on the worker: half the bytes travel for float16)."""
    if isinstance(threads, dict):
        from distributed import get_worker

        threads = threads.get(get_worker().address)
    vectors = load_encoder(model_path, precision=precision, device=device, threads=threads).encode(texts, batch_size)
    return vectors.astype(dtype, copy=False)


@dataclass(frozen=True)
class EncodePlan:
    """How texts are encoded: the model (its resolved path), the precision (resolved, embedder/precision.py),
    the device, texts per batch and per task (a chunk), each worker's threads (a count, or a count per
    worker address) and the dtype of the rows returned."""

    model_path: str
    precision: str = "fp32"
    device: str = "auto"
    batch_size: int = 64
    chunk_size: int = 1024
    threads: int | dict[str, int] | None = None
    dtype: type = np.float32

    def chunk_options(self) -> dict:
        """`encode_chunk`'s keyword arguments."""
        return {"precision": self.precision, "device": self.device, "batch_size": self.batch_size,
                "threads": self.threads, "dtype": self.dtype}


def encode_texts(texts: list[str] | pd.Series | pa.Array, plan: EncodePlan, *, client=None,
                 progress: Callable[[int], None] | None = None, rows: np.ndarray | None = None,
                 keys: pa.Array | None = None, cache_root: str | None = None, collect: bool = True) -> np.ndarray | None:
    """Encode `texts` (order kept) into an (n, dim) array of `plan.dtype`. With a Dask `client` the
    length-sorted chunks run on its workers; without one, in this process. Each chunk is written into
    the result as it arrives. `progress(n)` is called as each chunk of n texts finishes.
    With `rows` (positions), only those texts are encoded, each into its own row of the (n, dim)
    result (the other rows are left unset): a caller that fills the rest from elsewhere gets one array,
    and neither the texts nor their keys are copied for the selection.
    With `keys` (text i's cache key) and `cache_root`, each chunk's task also adds its vectors to the
    embedding cache, where it runs (a worker), before it returns: a crash loses only unfinished chunks.
    `collect` False (with `keys` and `cache_root`): the vectors stay in the cache, none come back
    (returns None)."""
    options, model_path, dtype, chunk_size = plan.chunk_options(), plan.model_path, plan.dtype, plan.chunk_size
    if not collect:
        if keys is None or cache_root is None:
            raise ValueError("encode_texts(collect=False) needs keys and cache_root: the vectors go to the cache only")
        options["collect"] = False
    rows = np.arange(len(texts)) if rows is None else np.asarray(rows, dtype=np.int64)
    if len(rows) == 0:
        dim = load_encoder(model_path, precision=plan.precision, device=plan.device).dim
        return np.zeros((len(texts), dim), dtype=dtype) if collect else None
    texts = arrow_strings(texts)  # chunks travel as Arrow arrays and become Python strings on the worker
    keys = None if keys is None else arrow_strings(keys)
    lengths = pc.utf8_length(texts).to_numpy(zero_copy_only=False)
    order = rows[np.argsort(lengths[rows], kind="stable")]
    if pick_device(plan.device).startswith("cuda"):
        chunk_size = max(chunk_size, GPU_CHUNK)
    if client is not None:  # enough chunks to keep every worker busy to the end (sorted first, so no padding is lost)
        chunk_size = max(64, min(chunk_size, -(-len(rows) // (task_slots(client) * 8))))
    chunks = [order[i:i + chunk_size] for i in range(0, len(order), chunk_size)][::-1]  # longest first
    vectors: np.ndarray | None = None

    def place(chunk: np.ndarray, block: np.ndarray | None) -> None:
        nonlocal vectors
        if block is not None:  # None: not collected, in the cache
            if vectors is None:
                vectors = np.empty((len(texts), block.shape[1]), dtype=dtype)
            vectors[chunk] = block
        if progress:
            progress(len(chunk))

    def arguments(rows: np.ndarray) -> tuple:  # taken, not sliced: a pickled slice carries its whole buffers
        return texts.take(rows), None if keys is None else keys.take(rows)

    if client is None:
        for rows in chunks:
            place(rows, encode_and_store(*arguments(rows), model_path, cache_root, **options))
        return vectors

    stamp = time.time_ns()
    for i, block in in_window(client, len(chunks), lambda i: client.submit(
            encode_and_store, *arguments(chunks[i]), model_path, cache_root, **options, pure=False,
            key=f"encode-{i}-{stamp}")):
        place(chunks[i], block)
    return vectors


def encode_and_store(texts: pa.Array | list[str], keys, model_path: str, cache_root: str | None, collect: bool = True,
                     **options) -> np.ndarray | None:
    """One chunk's task: `encode_chunk`, then, with `keys` and `cache_root`, its vectors added to the
    embedding cache from here (the worker), as float16, under those keys. Returns them, or None
    without `collect` (they are in the cache)."""
    texts = texts.to_pylist() if isinstance(texts, (pa.Array, pa.ChunkedArray)) else texts
    vectors = encode_chunk(texts, model_path, **options)
    if keys is not None and cache_root is not None:
        EmbeddingCache(cache_root).add(keys, vectors)
    return vectors if collect else None


def check_precision(precision: str, device: str, model_path: str, sample: list[str],
                    threads: int | dict[str, int] | None = None) -> dict:
    """Compare `precision` with fp32 on `sample`, encoded in the calling process (a Dask worker in a
    refresh): mean and min cosine. The caller accepts the precision when the mean reaches 0.99."""
    reference = encode_chunk(sample, model_path, precision="fp32", device=device, threads=threads)
    return cosine_report(reference, encode_chunk(sample, model_path, precision=precision, device=device, threads=threads))


def _judge(check: dict, report: PrecisionCheck) -> bool:
    """Record a precision check in `report`; on a failed one, fp32 becomes the chosen precision."""
    ok = check["mean_cosine"] >= MIN_MEAN_COSINE
    report.mean_cosine, report.min_cosine, report.sample, report.ok = (check["mean_cosine"], check["min_cosine"],
                                                                       check["sample"], ok)
    if not ok:
        report.chosen = "fp32"
        report.fallback = f"mean cosine {check['mean_cosine']} to fp32 is below {MIN_MEAN_COSINE}"
    return ok


@dataclass(frozen=True)
class ResolvedModel:
    """A run's model, resolved once from its settings: the model's folder, its fingerprint (the cache
    keys' prefix) and the precision chosen for the device. `resolve_model` raises ModelNotFound for
    a model that is not there and ValueError for a precision the device cannot run."""

    settings: EmbedSettings
    path: str
    fingerprint: str
    precision: str


def resolve_model(settings: EmbedSettings) -> ResolvedModel:
    path = resolve_model_path(settings.model)
    precision = "fp32" if is_standin(path) else resolve_precision(settings.precision, pick_device(settings.device))
    return ResolvedModel(settings, str(path), model_fingerprint(path), precision)


def embed_items(items: pd.DataFrame, settings: EmbedSettings | ResolvedModel = EmbedSettings(), *, cache_root: str, client=None,
                threads: int | dict[str, int] | None = None, progress: Callable[[int, int], None] | None = None,
                check_sample: int = 64, out: str | Path | None = None) -> EmbedResult:
    """Vectors for every item (`item_id`, `text` columns): from the cache where the content hash is
    known, otherwise encoded and added to the cache. `settings`: the embed settings, or the model
    already resolved from them (`resolve_model`). `progress(done, total)` reports encoding.
    A precision other than fp32 is first checked against fp32 on `check_sample` of the texts it will
    encode (on a worker when there is a Dask `client`); below a mean cosine of 0.99 the texts are encoded
    in fp32 instead. Each chunk's task adds its vectors to the cache where it runs, as it finishes, so a
    crash keeps the work done and the driver writes no cache file; damaged cache files are moved aside
    and their items encoded again (`counts.cache_files_set_aside`).

    With `out` (a run's embeddings.parquet) no vector comes to this process: the lookup brings back
    which hashes the cache holds, the encode tasks keep their vectors in the cache, and one task on a
    worker (`write_embeddings`) reads them all back from the cache, in item order, into `out`;
    `result.vectors` is then None (read `out`).

    Example:
        result = embed_items(items, EmbedSettings(), cache_root=".recs/cache")
        result.vectors.shape                  # (len(items), 384)
        result.counts.items_encoded           # 12 (the other 2,988 came from the cache)
    """
    model = settings if isinstance(settings, ResolvedModel) else resolve_model(settings)
    settings, path, fingerprint, chosen = model.settings, model.path, model.fingerprint, model.precision
    device = settings.device
    report = PrecisionCheck(requested=settings.precision, chosen=chosen)
    cache = EmbeddingCache(cache_root)
    texts = arrow_strings(items["text"])  # hashed and encoded on the workers: here they stay Arrow buffers
    set_aside: list[str] = []
    while True:
        t0 = time.perf_counter()
        # vectors made in another precision are other vectors: they get their own cache keys
        hashes = text_hashes(fingerprint if chosen == "fp32" else f"{fingerprint}:{chosen}", texts, client)
        lookup = cache.lookup(hashes, client, vectors=out is None)
        set_aside += lookup.set_aside
        held = pc.is_in(hashes, value_set=lookup.keys).to_numpy(zero_copy_only=False)
        missing = np.flatnonzero(~held)
        # a text repeated in the catalog is encoded once: codes number the missing hashes in the order
        # they first appear, and np.unique's return_index gives each code's first position
        codes = pc.dictionary_encode(hashes.take(missing)).indices.to_numpy(zero_copy_only=False)
        first = missing[np.unique(codes, return_index=True)[1]]  # the item row of each text to encode
        if chosen != "fp32" and len(first) and report.mean_cosine is None:
            # texts to encode in reduced precision: compared with fp32 on a sample of them first (on a
            # worker when there is a client: the driver loads no model), so that only vectors of an
            # accepted precision are made and cached
            spread = np.linspace(0, len(first) - 1, min(check_sample, len(first))).astype(int)
            sample = texts.take(first[spread]).to_pylist()
            check = (client.submit(check_precision, chosen, device, str(path), sample, threads, pure=False).result()
                     if client is not None else check_precision(chosen, device, str(path), sample))
            if not _judge(check, report):
                chosen = "fp32"
                continue  # look the texts up again under fp32 keys, and encode the misses in fp32
        lookup_s = time.perf_counter() - t0
        t1 = time.perf_counter()
        plan = EncodePlan(str(path), chosen, device, settings.batch_size, settings.chunk_size, threads, STORED_DTYPE)
        if len(first):
            vectors = _encode_misses(texts, first, plan, client=client, progress=progress, keys=hashes,
                                     cache_root=cache.root, collect=out is None)
        else:  # all from the cache
            dim = len(next(iter(lookup.found.values()))) if lookup.found else 0
            vectors = np.empty((len(texts), dim), dtype=STORED_DTYPE) if out is None else None
        encode_s = time.perf_counter() - t1
        break
    cache.compact(client=client)
    counts = EmbedCounts(items_encoded=len(first), items_from_cache=int(held.sum()),
                         cache_lookup_seconds=round(lookup_s, 3), encode_seconds=round(encode_s, 3),
                         texts_per_second=round(len(first) / encode_s, 1) if len(first) and encode_s > 0 else None,
                         precision=report, cache_files_set_aside=set_aside)
    if out is not None:
        # as Arrow arrays: two buffers each, not 2M Python strings pickled (and held by the scheduler)
        one_task(client, write_embeddings, str(out), arrow_strings(items["item_id"]), hashes, cache.root)
        return EmbedResult(items["item_id"].tolist(), None, None, fingerprint, counts)
    source = first[codes]  # the row each missing row's vector was encoded for
    copies = source != missing  # a text that repeats an encoded one: its vector copied
    vectors[missing[copies]] = vectors[source[copies]]
    cached = np.flatnonzero(held)
    for start in range(0, len(cached), 1 << 16):  # from the cache: a block of rows at a time
        rows = cached[start:start + (1 << 16)]
        vectors[rows] = np.stack([lookup.found[key] for key in hashes.take(rows).to_pylist()])
    return EmbedResult(items["item_id"].tolist(), hashes.to_pylist(), vectors, fingerprint, counts)


def hash_texts(key_prefix: str, texts: pa.Array | pa.ChunkedArray) -> pa.Array:
    """The cache keys of `texts` under `key_prefix` (the model's fingerprint, and the precision when
    not fp32), as an Arrow array: one hashing task's work on a worker."""
    return content_hashes(key_prefix, texts)


def text_hashes(key_prefix: str, texts: pa.Array | pa.ChunkedArray, client=None) -> pa.Array:
    """Every text's cache key, in text order: hashed on the workers of a Dask `client`, HASH_CHUNK
    texts per task, a window of them in flight (in this process without a client)."""
    if client is None:
        return hash_texts(key_prefix, texts)
    starts = range(0, len(texts), HASH_CHUNK)
    parts: list[pa.Array] = [pa.array([], pa.string())] * len(starts)
    stamp = time.time_ns()

    def submit(i: int):  # taken, not sliced: a pickled slice carries its whole buffers
        rows = np.arange(starts[i], min(starts[i] + HASH_CHUNK, len(texts)))
        return client.submit(hash_texts, key_prefix, texts.take(rows), pure=False, key=f"hash-texts-{i}-{stamp}")

    for i, hashed in in_window(client, len(starts), submit):
        parts[i] = hashed
    return pa.concat_arrays(parts) if parts else pa.array([], pa.string())


def _encode_misses(texts: pa.Array, rows: np.ndarray, plan: EncodePlan, *, client,
                   progress: Callable[[int, int], None] | None, keys: pa.Array, cache_root: str,
                   collect: bool = True) -> np.ndarray | None:
    """An (n, dim) array of `plan.dtype` (float16 as the cache stores it: a fresh run and a rerun from
    the cache rank with the same numbers) with `texts[rows]` encoded into `rows` (the other rows left
    unset), written straight into the items' array (no second items x dim copy)."""
    done = 0

    def tick(n: int) -> None:
        nonlocal done
        done += n
        if progress:
            progress(done, len(rows))

    return encode_texts(texts, plan, client=client, progress=tick, rows=rows, keys=keys, cache_root=cache_root,
                        collect=collect)
