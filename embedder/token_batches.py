"""The GPU's encoder: a whole chunk tokenized at once, batches cut by token count, the model in half precision.

`model.encode` (sentence-transformers) tokenizes each small batch in the calling thread and copies
every batch's vectors back before it starts the next, so on a GPU the device mostly waits for the
CPU. `TokenBatchEncoder` runs the same model (its transformer, pooling and normalisation) with:
- one call of the fast tokenizer's own batch API per chunk (its Rust threads use every core; the
  transformers wrapper around it costs more, and more of it holds the GIL), no padding;
- texts sorted by token count and cut into batches of about `TOKENS_PER_BATCH` tokens, each padded
  only to its own longest text;
- ids copied to the device from pinned memory without waiting, the vectors of every batch kept on
  the device and copied back once per chunk (no per-batch synchronisation);
- the weights themselves in fp16/bf16 (not autocast) when that precision is asked for.

It is `load_encoder`'s choice on CUDA for models made of a transformer, mean or CLS pooling and an
optional normalisation (all-MiniLM-L6-v2 is); other models keep `TorchEncoder`. On a CPU it gives the
same vectors as `TorchEncoder` (tests/test_encoders.py), but the CPU keeps `TorchEncoder`.

Example:
    encoder = TokenBatchEncoder.from_model(load_model(path, "cuda"), "cuda", "fp16")
    encoder.encode(texts).shape          # (len(texts), 384), float32, unit rows
"""

from __future__ import annotations

import copy
from typing import Sequence

import numpy as np

TOKENS_PER_BATCH = 1 << 16  # ids in one forward pass on a GPU (1,024 texts of 64 tokens)
POOLINGS = ("mean", "cls")
_DTYPES = {"fp32": "float32", "fp16": "float16", "bf16": "bfloat16"}


def pooling_mode(model) -> str | None:
    """'mean', 'cls', ... for a sentence-transformers [Transformer, Pooling, (Normalize)] model; None
    for any other layout (that model keeps `TorchEncoder`)."""
    names = [type(m).__name__ for m in model]
    if names not in (["Transformer", "Pooling"], ["Transformer", "Pooling", "Normalize"]):
        return None
    pool = model[1]
    mode = getattr(pool, "pooling_mode", None)
    if mode is None and getattr(pool, "pooling_mode_mean_tokens", False):
        mode = "mean"
    if mode is None and getattr(pool, "pooling_mode_cls_token", False):
        mode = "cls"
    return mode if mode in POOLINGS else None


class TokenBatchEncoder:
    """A sentence-transformers model's transformer, pooled and normalised here, fed token batches."""

    def __init__(self, transformer, tokenizer, max_length: int, pooling: str, dim: int, device: str,
                 precision: str):
        import torch

        self.transformer, self.tokenizer = transformer, tokenizer
        self.max_length, self.pooling, self.dim = max_length, pooling, dim
        self.device, self.precision = device, precision
        self.pad_id = int(tokenizer.pad_token_id or 0)
        self._backend = _rust_tokenizer(tokenizer, max_length)
        self.tokens_per_batch = TOKENS_PER_BATCH if device.startswith("cuda") else 1 << 13
        self._torch = torch

    @classmethod
    def from_model(cls, model, device: str, precision: str) -> "TokenBatchEncoder | None":
        """The encoder for a loaded SentenceTransformer on `device`, or None when its layout is not
        one this encoder runs (see `pooling_mode`). fp16/bf16: a half-precision copy of the weights."""
        import torch

        mode = pooling_mode(model)
        transformer = getattr(model[0], "auto_model", None) if mode else None
        if transformer is None or precision not in _DTYPES or getattr(model, "tokenizer", None) is None:
            return None
        if precision != "fp32":
            transformer = copy.deepcopy(transformer).to(getattr(torch, _DTYPES[precision]))
        transformer.eval()
        getter = getattr(model, "get_embedding_dimension", None) or model.get_sentence_embedding_dimension
        return cls(transformer, model.tokenizer, int(model.max_seq_length), mode, int(getter()), str(device), precision)

    def token_ids(self, texts: Sequence[str]) -> list[list[int]]:
        """Token ids of each text, truncated to the model's length, unpadded (one batch call)."""
        if self._backend is not None:
            return [encoding.ids for encoding in self._backend(list(texts))]
        return self.tokenizer(list(texts), truncation=True, max_length=self.max_length, padding=False,
                              return_attention_mask=False, return_token_type_ids=False)["input_ids"]

    def encode(self, texts: Sequence[str], batch_size: int = 64) -> np.ndarray:
        """(len(texts), dim) float32 unit rows in the order of `texts`. `batch_size` is the fewest
        texts per batch; batches grow to `tokens_per_batch` tokens."""
        torch = self._torch
        n = len(texts)
        if n == 0:
            return np.zeros((0, self.dim), dtype=np.float32)
        ids = self.token_ids(texts)
        lengths = np.fromiter(map(len, ids), dtype=np.int64, count=n)
        order = np.argsort(-lengths, kind="stable")  # longest first: the first batch sizes the memory
        device = torch.device(self.device)
        cuda = device.type == "cuda"
        out = torch.empty((n, self.dim), dtype=torch.float32, device=device)
        start = 0
        with torch.inference_mode():
            while start < n:
                longest = int(lengths[order[start]])
                size = min(n - start, max(batch_size, self.tokens_per_batch // max(longest, 1)))
                rows = order[start:start + size]
                batch = np.full((size, longest), self.pad_id, dtype=np.int64)
                for j, row in enumerate(rows):
                    batch[j, :lengths[row]] = ids[row]
                mask = (np.arange(longest)[None, :] < lengths[rows][:, None]).astype(np.int64)
                tensors = [torch.from_numpy(a) for a in (batch, mask, rows)]
                if cuda:  # pinned, so the copy runs while this thread prepares the next batch
                    tensors = [t.pin_memory().to(device, non_blocking=True) for t in tensors]
                input_ids, attention, where = tensors
                hidden = self.transformer(input_ids=input_ids, attention_mask=attention).last_hidden_state
                out[where] = self._pool(hidden, attention).float()
                start += size
        vectors = out.cpu().numpy() if cuda else out.numpy()
        # normalised in fp32 here, with or without the model's Normalize (as `TorchEncoder` does)
        return vectors / np.maximum(np.linalg.norm(vectors, axis=1, keepdims=True), 1e-12)

    def _pool(self, hidden, attention):
        if self.pooling == "cls":
            return hidden[:, 0]
        weights = attention.unsqueeze(-1).to(hidden.dtype)
        summed = (hidden * weights).sum(dim=1, dtype=self._torch.float32)  # summed in fp32: no fp16 overflow
        return summed / attention.sum(dim=1, keepdim=True).clamp(min=1).to(self._torch.float32)


def _rust_tokenizer(tokenizer, max_length: int):
    """The batch encode of a private copy of the fast tokenizer's Rust tokenizer, truncating at
    `max_length`, unpadded (the model's own tokenizer is left as it is); None without one."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        return None
    from tokenizers import Tokenizer

    own = Tokenizer.from_str(backend.to_str())
    own.no_padding()
    own.enable_truncation(max_length)
    return getattr(own, "encode_batch_fast", own.encode_batch)
