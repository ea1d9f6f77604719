"""One interface for every encoder (`Encoder`) and the one factory that picks it (`load_encoder`).

| encoder | chosen when | module |
|---|---|---|
| sentence-transformers under torch, fp32 or bf16/fp16 autocast | the default on a CPU | this one (`TorchEncoder`) |
| the same model fed whole chunks as token batches, weights in fp16/bf16 | the default on a GPU | embedder/token_batches.py |
| the transformer exported to ONNX with int8 dense layers | `embed.precision: int8` | embedder/quantized.py |
| feature hashing, not a language model (scale tests of the data path) | `embed.model: stand-in:hashing-384` | embedder/standin.py |

Every encoder returns float32 rows of unit length, in the order of the texts given. An encoder is
made once per process and reused: on a Dask worker the model loads at its first task, never per task.

Example:
    encoder = load_encoder(resolve_model_path("all-MiniLM-L6-v2"), precision="bf16", device="cpu")
    encoder.encode(["a red running shoe", "a kettle"]).shape      # (2, 384)
"""

from __future__ import annotations

from pathlib import Path
from typing import Protocol, Sequence

import numpy as np

from embedder.model import load_model, pick_device
from embedder.precision import autocast
from embedder.standin import HashingEncoder, is_standin
from embedder.token_batches import TokenBatchEncoder

_ENCODERS: dict[tuple, "Encoder"] = {}


class Encoder(Protocol):
    """Texts in, unit vectors out."""

    dim: int

    def encode(self, texts: Sequence[str], batch_size: int = 64) -> np.ndarray:
        """(len(texts), dim) float32, each row of unit length, in the order of `texts`."""


class TorchEncoder:
    """A sentence-transformers model run by torch, in fp32 or under bf16/fp16 autocast."""

    def __init__(self, model, device: str, precision: str):
        self.model, self.device, self.precision = model, device, precision
        getter = getattr(model, "get_embedding_dimension", None) or model.get_sentence_embedding_dimension
        self.dim = int(getter())

    def encode(self, texts: Sequence[str], batch_size: int = 64) -> np.ndarray:
        with autocast(self.precision, self.device):
            vectors = self.model.encode(list(texts), batch_size=batch_size, convert_to_numpy=True,
                                        normalize_embeddings=True, show_progress_bar=False)
        vectors = np.asarray(vectors, dtype=np.float32).reshape(len(texts), self.dim)
        if self.precision != "fp32":  # re-normalised in fp32: a half-precision norm is only close to 1
            vectors /= np.maximum(np.linalg.norm(vectors, axis=1, keepdims=True), 1e-12)
        return vectors


def load_encoder(model_path: Path | str, *, precision: str = "fp32", device: str = "auto",
                 threads: int | None = None) -> Encoder:
    """The encoder for a resolved model (`embedder.model.resolve_model_path`) in a resolved precision
    (`embedder.precision.resolve_precision`), made once per process.

    `threads`: the CPU threads it may use. Torch's thread count is per thread that calls it, so it
    is set on every call, from inside the task that encodes."""
    if is_standin(model_path):
        return _ENCODERS.setdefault(("stand-in",), HashingEncoder())
    if precision == "int8":
        from embedder.quantized import load_quantized

        return load_quantized(model_path, threads)
    device = pick_device(device)
    if threads:
        import torch

        torch.set_num_threads(threads)
    key = (str(model_path), device, precision)
    if key not in _ENCODERS:
        model = load_model(model_path, device)
        fast = TokenBatchEncoder.from_model(model, device, precision) if device.startswith("cuda") else None
        _ENCODERS[key] = fast or TorchEncoder(model, device, precision)
    return _ENCODERS[key]
