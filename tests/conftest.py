"""Shared fixtures: real components on small data.

- `tiny_model`: a 1-layer, 32-dim BERT with MiniLM's tokenizer, built locally (random weights) so
  tests encode in milliseconds; the real all-MiniLM-L6-v2 runs in test_real_model.py.
- `dask_client`: one real distributed LocalCluster (2 worker processes) for the session.
- `sample_dir`: a small deterministic sample shop.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import yaml

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")


def brute_force(vectors, queries, k):
    """The tests' oracle for any search: every score by numpy, sorted. Returns (scores, ids)."""
    import numpy as np

    sims = np.asarray(queries, np.float32) @ np.asarray(vectors, np.float32).T
    ids = np.argsort(-sims, axis=1, kind="stable")[:, :min(k, sims.shape[1])]
    return np.take_along_axis(sims, ids, axis=1), ids


def mount_small_filesystem(folder: Path, size: str):
    """Mount a tmpfs of `size` (e.g. '64k') on `folder`, for tests of a full disk; the test is skipped
    where the machine refuses (mounting needs root). Returns a function that unmounts it."""
    import subprocess

    folder.mkdir(parents=True, exist_ok=True)
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(folder)], capture_output=True)
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a small filesystem here ({mounted.stderr.decode().strip() or mounted.returncode})")
    return lambda: subprocess.run(["umount", "-l", str(folder)], capture_output=True)


def build_tiny_model(out: Path, seed: int = 0) -> Path:
    import torch
    import transformers
    from sentence_transformers import SentenceTransformer, models
    from transformers import AutoTokenizer, BertConfig, BertModel

    from embedder.model import resolve_model_path

    transformers.logging.set_verbosity_error()
    transformers.logging.disable_progress_bar()
    hf = out / "hf"
    tok = AutoTokenizer.from_pretrained(str(resolve_model_path()))
    torch.manual_seed(seed)
    cfg = BertConfig(vocab_size=tok.vocab_size, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                     intermediate_size=64, max_position_embeddings=256)
    BertModel(cfg).save_pretrained(hf)
    tok.save_pretrained(hf)
    st = SentenceTransformer(modules=[models.Transformer(str(hf)), models.Pooling(32, "mean"), models.Normalize()])
    st.save(str(out / "st"))
    return out / "st"


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory) -> Path:
    return build_tiny_model(tmp_path_factory.mktemp("tiny-model"))


@pytest.fixture(scope="session")
def dask_client():
    from distributed import Client, LocalCluster

    with LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=":0",
                      silence_logs=40) as cluster, Client(cluster) as client:
        yield client


@pytest.fixture(scope="session")
def sample_dir(tmp_path_factory) -> Path:
    from recommend.run.commands.sample import write_sample

    out = tmp_path_factory.mktemp("sample")
    write_sample(out, n_items=240, n_users=80, days=30, seed=7, new_users=3)
    return out


def write_config(folder: Path, data_dir: Path, model: Path | str, **sections) -> Path:
    """A config.yaml in `folder` over the sample in `data_dir`; `sections` override top-level keys
    (a dict is merged into the section, None removes it)."""
    config = {
        "workdir": str(folder / "work"),
        "items": {"path": str(data_dir / "items.parquet"), "id": "item_id",
                  "text": "{title}. {description} Category: {category}.", "metadata": ["title", "category"]},
        "events": {"path": str(data_dir / "events.parquet")},
        "users": {"path": str(data_dir / "users.parquet")},
        "embed": {"model": str(model), "device": "cpu"},
        "lists": {"k": 5, "block_size": 32},  # several item and user blocks: the parts are assembled
        "dask": {"n_workers": 1},
    }
    for key, value in sections.items():
        if value is None:
            config.pop(key, None)
        elif isinstance(value, dict) and isinstance(config.get(key), dict):
            config[key] = {**config[key], **value}
        else:
            config[key] = value
    path = folder / "config.yaml"
    path.write_text(yaml.safe_dump(config))
    return path
