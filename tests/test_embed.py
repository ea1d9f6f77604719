"""Embedding: the content-hash cache (rerun encodes 0, N edits encode N, a new model encodes all),
and encoding spread over Dask workers equals encoding in one process."""

import numpy as np
import pandas as pd
import pytest

from conftest import build_tiny_model
import pyarrow.parquet as pq

from embedder.cache import STORED_DTYPE, EmbeddingCache, content_hash
from embedder.encode import EncodePlan, embed_items, encode_texts
from embedder.settings import EmbedSettings
from embedder.model import model_fingerprint


def _embed(items, model, cache, client=None, check_sample=64, precision="fp32"):
    return embed_items(items, EmbedSettings(model=str(model), device="cpu", precision=precision), cache_root=cache,
                       client=client, check_sample=check_sample)


def _unit_rows(x):
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def _items(n=50):
    return pd.DataFrame({"item_id": [f"i{i}" for i in range(n)],
                         "text": [f"item number {i} " + "word " * (i % 13) for i in range(n)]})


def test_cache_counts_rerun_and_edits(tmp_path, tiny_model):
    items = _items()
    cache = str(tmp_path / "cache")
    first = _embed(items, tiny_model, cache)
    assert first.counts.items_encoded == 50 and first.counts.items_from_cache == 0
    again = _embed(items, tiny_model, cache)
    assert again.counts.items_encoded == 0 and again.counts.items_from_cache == 50
    np.testing.assert_allclose(again.vectors, first.vectors, atol=1e-6)

    edited = items.copy()
    # item 20 repeats item 3's new text: encoded once, both rows get the vector
    edited.loc[[3, 7, 11, 20], "text"] = ["a brand new text", "another new text", "a third new text", "a brand new text"]
    after = _embed(edited, tiny_model, cache)
    assert after.counts.items_encoded == 3 and after.counts.items_from_cache == 46
    unchanged = np.setdiff1d(np.arange(50), [3, 7, 11, 20])
    np.testing.assert_allclose(after.vectors[unchanged], first.vectors[unchanged], atol=1e-6)
    assert not np.allclose(after.vectors[3], first.vectors[3])
    np.testing.assert_array_equal(after.vectors[20], after.vectors[3])
    single = encode_texts(["a brand new text"], EncodePlan(str(tiny_model), device="cpu")).astype(np.float16)[0]
    np.testing.assert_allclose(after.vectors[20], single, atol=2e-3)


def test_changed_model_reuses_nothing(tmp_path, tiny_model):
    other = build_tiny_model(tmp_path / "other-model", seed=1)
    assert model_fingerprint(other) != model_fingerprint(tiny_model)
    cache = str(tmp_path / "cache")
    _embed(_items(), tiny_model, cache)
    result = _embed(_items(), other, cache)
    assert result.counts.items_encoded == 50


def test_cache_lookup_reads_back_what_was_added(tmp_path):
    cache = EmbeddingCache(str(tmp_path / "c"))
    keys = [content_hash("fp", f"text {i}") for i in range(40)]
    vectors = _unit_rows(np.random.default_rng(0).normal(size=(40, 8)))  # what encoders give: unit rows
    cache.add(keys[:30], vectors[:30])
    found = cache.lookup(keys).found
    assert set(found) == set(keys[:30]) and cache.size() == 30
    read = np.stack([found[k] for k in keys[:30]])
    assert read.dtype == np.float16  # as stored: a million float32 rows would be twice the memory
    np.testing.assert_array_equal(read, vectors[:30].astype(STORED_DTYPE).astype(np.float32))  # stored as float16: half the bytes
    np.testing.assert_allclose(read, vectors[:30], rtol=1e-3, atol=1e-3)
    stored = pq.read_table(next((tmp_path / "c").rglob("*.parquet")))
    assert str(stored.schema.field("vector").type) == "fixed_size_list<element: halffloat>[8]"


def test_reduced_precision_is_checked_and_keyed_apart(tmp_path, tiny_model):
    """bf16 vectors are compared with fp32 on a sample before use, and never mixed with fp32 in the cache."""
    items = _items(30)
    cache = str(tmp_path / "cache")
    fp32 = _embed(items, tiny_model, cache, precision="fp32")
    bf16 = _embed(items, tiny_model, cache, precision="bf16", check_sample=16)
    report = bf16.counts.precision
    assert report.chosen == "bf16" and report.sample == 16 and report.ok
    assert report.mean_cosine >= 0.99 and report.min_cosine <= report.mean_cosine
    assert bf16.counts.items_encoded == 30  # its own cache keys: the fp32 vectors are not reused
    assert fp32.vectors.dtype == bf16.vectors.dtype == np.float16  # as the cache stores them
    a, b = fp32.vectors.astype(np.float32), bf16.vectors.astype(np.float32)
    cos = (a * b).sum(axis=1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)
    assert cos.mean() >= 0.99
    again = _embed(items, tiny_model, cache, precision="bf16")
    assert again.counts.items_encoded == 0 and again.counts.precision.mean_cosine is None  # no check without work


@pytest.mark.parametrize("on_cluster", [True, False])
def test_a_failed_precision_check_falls_back_to_fp32_and_caches_nothing_of_it(tmp_path, tiny_model, dask_client,
                                                                             monkeypatch, on_cluster):
    """Fault injected: no precision passes (threshold above 1). The check runs before the encode (on a
    worker, or in this process without a cluster); no bf16 vector is made or cached, fp32 ones are."""
    import embedder.encode as encode

    client = dask_client if on_cluster else None
    items, cache = _items(40), str(tmp_path / "cache")
    monkeypatch.setattr(encode, "MIN_MEAN_COSINE", 1.01)
    failed = _embed(items, tiny_model, cache, client, precision="bf16", check_sample=8)
    report = failed.counts.precision
    assert report.chosen == "fp32" and not report.ok and "below 1.01" in report.fallback
    assert report.sample == 8 and failed.counts.items_encoded == 40
    reference = _embed(items, tiny_model, str(tmp_path / "other"), precision="fp32")
    np.testing.assert_array_equal(failed.vectors, reference.vectors)
    monkeypatch.undo()
    passed = _embed(items, tiny_model, cache, client, precision="bf16", check_sample=8)
    assert passed.counts.precision.ok and passed.counts.items_encoded == 40  # no bf16 vector was cached
    again = _embed(items, tiny_model, cache, client, precision="fp32")
    assert again.counts.items_encoded == 0  # the fallback's fp32 vectors were


def test_dask_encode_equals_single_process(tiny_model, dask_client, monkeypatch):
    import embedder.task_window as task_window

    texts = [("short" if i % 3 else "a much longer text about trail running shoes and mud " * 3) + f" {i}"
             for i in range(450)]
    local = encode_texts(texts, EncodePlan(str(tiny_model), device="cpu", chunk_size=16), client=None)
    # chunks are submitted a few per worker at a time, not all at once: count the encode tasks the
    # client holds whenever it submits one (450 texts make 8 chunks of 64; the window is 1 per worker,
    # and the chunk just placed may still be counted)
    monkeypatch.setattr(task_window, "PER_SLOT", 1)
    workers = len(dask_client.scheduler_info()["workers"])
    in_flight, submit = [], dask_client.submit

    def counting_submit(*args, **kwargs):
        in_flight.append(sum(str(key).startswith("encode-") for key in dask_client.futures))
        return submit(*args, **kwargs)

    monkeypatch.setattr(dask_client, "submit", counting_submit)
    done = []
    spread = encode_texts(pd.Series(texts, dtype=pd.StringDtype("pyarrow")), EncodePlan(str(tiny_model), device="cpu", chunk_size=16),
                          client=dask_client, progress=done.append)
    assert len(in_flight) == 8 and max(in_flight) <= max(2, workers) < 7  # all at once would reach 7
    assert sum(done) == len(texts)
    np.testing.assert_allclose(spread, local, atol=1e-5)
    np.testing.assert_allclose(np.linalg.norm(spread, axis=1), 1.0, atol=1e-5)


def test_the_driver_writes_no_cache_file(tmp_path, tiny_model, dask_client, monkeypatch):
    """Fault injected in the driver's process only: any cache write here fails. The encode's tasks
    write their vectors on the workers, so the run succeeds, and a rerun finds every vector."""
    import embedder.cache as cache_module

    def refuse(*args, **kwargs):
        raise AssertionError("the driver wrote a cache file")

    monkeypatch.setattr(cache_module.EmbeddingCache, "_write", refuse)
    items, cache = _items(300), str(tmp_path / "cache")
    first = _embed(items, tiny_model, cache, dask_client, precision="fp32")
    assert first.counts.items_encoded == 300
    monkeypatch.undo()
    assert _embed(items, tiny_model, cache, dask_client, precision="fp32").counts.items_from_cache == 300


def test_embeddings_written_on_a_worker_equal_the_vectors_brought_here(tmp_path, tiny_model, dask_client, monkeypatch):
    """Oracle: the same items embedded with their vectors brought to this process. With `out`, a
    first run (every text encoded) and a rerun after edits (most from the cache, a repeated text)
    write embeddings.parquet on a worker; no vector comes here and no text is hashed here: a lookup
    that would bring vectors, and a hash, are refused in this process (faults injected here only)."""
    import embedder.encode as encode_module
    from embedder.artifacts import arrow_to_vectors

    items = _items(120)
    edited = items.copy()
    edited.loc[[3, 7, 20], "text"] = ["a brand new text", "another new text", "a brand new text"]
    expected = [_embed(frame, tiny_model, str(tmp_path / "oracle"), client=dask_client).vectors for frame in (items, edited)]
    original_lookup = encode_module.EmbeddingCache.lookup

    def keys_only(self, hashes, client=None, vectors=True):
        assert not vectors, "the vectors were brought to the driver"
        return original_lookup(self, hashes, client, vectors)

    def no_hash_here(*args):
        raise AssertionError("a text was hashed in the driver")

    monkeypatch.setattr(encode_module.EmbeddingCache, "lookup", keys_only)
    monkeypatch.setattr(encode_module, "content_hashes", no_hash_here)
    for n, (frame, vectors) in enumerate(zip((items, edited), expected)):
        out = tmp_path / f"embeddings-{n}.parquet"
        result = embed_items(frame, EmbedSettings(model=str(tiny_model), device="cpu", precision="fp32"),
                             cache_root=str(tmp_path / "cache"), client=dask_client, out=out)
        assert result.vectors is None and result.counts.items_encoded == (120 if n == 0 else 2)
        table = pq.read_table(out)
        assert table["item_id"].to_pylist() == frame["item_id"].tolist()
        np.testing.assert_allclose(arrow_to_vectors(table["vector"], np.float32), vectors.astype(np.float32), atol=1e-3)
        assert pq.ParquetFile(out).metadata.num_row_groups == 1
    prefixes = set(dask_client.run_on_scheduler(lambda dask_scheduler: list(dask_scheduler.task_prefixes)))
    assert {"write-embeddings", "hash-texts"} <= prefixes


def test_worker_layout_one_per_gpu_else_one_per_core():
    import os

    from recommend.run.infra.cluster import worker_layout

    cores = os.cpu_count() or 1
    assert worker_layout("cpu", None, None, gpus=4) == {"kind": "cpu", "n_workers": cores, "threads_per_worker": 1}
    assert worker_layout("auto", None, None, gpus=0)["kind"] == "cpu"
    on_gpus = worker_layout("auto", None, None, gpus=2)
    try:
        import dask_cuda  # noqa: F401
        assert on_gpus == {"kind": "cuda", "n_workers": 2, "threads_per_worker": 4}
    except ImportError:  # without dask-cuda one worker drives the first GPU
        assert on_gpus == {"kind": "single-gpu", "n_workers": 1, "threads_per_worker": 4}
    assert worker_layout("cuda", 3, 1, gpus=2) == {**on_gpus, "n_workers": 3, "threads_per_worker": 1}  # overrides
    assert worker_layout("cpu", None, 2, gpus=0)["n_workers"] == max(1, cores // 2)


def test_keys_made_in_bulk_equal_the_keys_made_one_by_one():
    """Oracle: `content_hash` text by text (the cache's keys since the start). `content_hashes` gives
    the same keys for Arrow (string, large string, sliced, chunked), Series and lists, with unicode,
    empty and null texts and across its blocks; the checksum made from Arrow's buffers equals the one
    made from "\\n".join; `bucket_rows` groups as pandas does."""
    import pyarrow as pa
    import xxhash

    import embedder.cache as cache_module
    from embedder.cache import bucket_rows, content_hashes

    texts = ["", "a", "Café au lait", "日本語のテキスト", "emoji 🎉 x", "tab\tand\0nul"] + [f"item {i} " * (i % 7) for i in range(300)]
    expected = [content_hash("fp:bf16", t) for t in texts]
    sliced = pa.array(["skip"] + texts)[1:]
    for given in (texts, pd.Series(texts), pa.array(texts), pa.array(texts, pa.large_string()), sliced,
                  pa.chunked_array([texts[:7], texts[7:]]), pd.Series(texts, dtype="string[pyarrow]")):
        assert content_hashes("fp:bf16", given).to_pylist() == expected
    assert content_hashes("fp", pa.array(["x", None])).to_pylist() == [content_hash("fp", "x"), content_hash("fp", None)]
    assert content_hashes("fp", []).to_pylist() == []
    original = cache_module.HASH_BLOCK
    try:
        cache_module.HASH_BLOCK = 64  # several blocks
        assert content_hashes("fp:bf16", texts).to_pylist() == expected
    finally:
        cache_module.HASH_BLOCK = original
    vectors = _unit_rows(np.random.default_rng(2).normal(size=(len(texts), 8))).astype(STORED_DTYPE)
    for keys in (pa.array(expected), pa.array(["x"] + expected)[1:], pa.array(expected[:1]), pa.array([], pa.string())):
        old = xxhash.xxh3_128("\n".join(keys.to_pylist()).encode())
        old.update(vectors[:len(keys)].tobytes())
        assert cache_module._checksum(keys, vectors[:len(keys)]) == old.hexdigest().encode()
    keys = pd.Series(expected)
    groups = {b: list(rows) for b, rows in keys.groupby(keys.str[:1]).indices.items()}
    assert {b: list(rows) for b, rows in bucket_rows(pa.array(expected))} == groups


def test_embeddings_from_the_cache_take_what_a_lookup_finds(tmp_path):
    """Oracle: `lookup`'s vectors (a dict from the rows read: a key stored twice gives its last row).
    `write_embeddings` matches keys with Arrow and gives the same vectors, in item order, for keys
    repeated among the items and keys stored twice with different vectors; a key not there stops it."""
    import pyarrow as pa

    from embedder.artifacts import arrow_to_vectors
    from embedder.encode import write_embeddings
    from embedder.errors import StorageError

    cache = EmbeddingCache(str(tmp_path / "c"))
    keys = [content_hash("fp", f"text {i}") for i in range(120)]
    rng = np.random.default_rng(3)
    cache.add(keys, _unit_rows(rng.normal(size=(120, 8))))
    cache.add(keys[:40], _unit_rows(rng.normal(size=(40, 8))))  # stored twice (a compaction cut short)
    wanted = [keys[i] for i in rng.integers(0, 120, 300)]
    found = cache.lookup(keys).found
    write_embeddings(str(tmp_path / "e.parquet"), [f"i{i}" for i in range(300)], pa.array(wanted), cache.root)
    table = pq.read_table(tmp_path / "e.parquet")
    assert table["content_hash"].to_pylist() == wanted and table["item_id"].to_pylist() == [f"i{i}" for i in range(300)]
    np.testing.assert_array_equal(arrow_to_vectors(table["vector"], np.float32), np.stack([found[k] for k in wanted]))
    with pytest.raises(StorageError, match="1 vector"):
        write_embeddings(str(tmp_path / "f.parquet"), ["a", "b"], pa.array([keys[0], content_hash("fp", "absent")]), cache.root)


def test_cache_lookup_on_workers_equals_lookup_in_process(tmp_path, dask_client):
    """Oracle: the bucket-by-bucket join run on the Dask workers finds what a single process finds."""
    cache = EmbeddingCache(str(tmp_path / "c"))
    keys = [content_hash("fp", f"text {i}") for i in range(200)]
    vectors = _unit_rows(np.random.default_rng(1).normal(size=(200, 8)))
    cache.add(keys[:150], vectors[:150])
    cache.add(keys[150:170], vectors[150:170])  # a second file in some buckets
    local, remote = cache.lookup(keys).found, cache.lookup(keys, dask_client).found
    assert set(local) == set(remote) == set(keys[:170])
    assert all(np.array_equal(local[k], remote[k]) for k in local)


def test_precision_choices_name_what_they_need():
    import pytest

    from embedder.precision import resolve_precision
    from embedder.quantized import available

    assert resolve_precision("auto", "cuda") == "fp16"
    with pytest.raises(ValueError, match="fp16 needs a GPU"):
        resolve_precision("fp16", "cpu")
    with pytest.raises(ValueError, match="int8 runs on the CPU"):
        resolve_precision("int8", "cuda")
    if available():
        assert resolve_precision("int8", "cpu") == "int8"
    with pytest.raises(ValueError, match="must be one of"):
        resolve_precision("int4", "cpu")
