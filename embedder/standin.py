"""A stand-in encoder for scale tests of the data path only: NOT a language model.

`stand-in:hashing-384` maps each text to a 384-dimension unit vector by feature hashing its words
(each word adds a fixed pseudo-random ±1 pattern), so equal texts get equal vectors and texts
sharing words are similar. It needs no weights and no torch, so a benchmark at a million items
measures moving data, not encoding; the real model's encode rate is measured on its own
(tests/benchmarks/bench_encode.py). Never the default, never chosen silently.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
import xxhash

PREFIX = "stand-in:"
NAME = "stand-in:hashing-384"
DIM = 384


def is_standin(spec) -> bool:
    return str(spec).startswith(PREFIX)


class HashingEncoder:
    """An `embedder.encoder.Encoder` over hashed words."""

    def __init__(self, dim: int = DIM):
        self.dim = dim
        self._patterns: dict[str, tuple[list[int], list[float]]] = {}

    def encode(self, texts: Sequence[str], batch_size: int = 64) -> np.ndarray:
        out = np.zeros((len(texts), self.dim), dtype=np.float32)
        rows, cols, signs = [], [], []
        for row, text in enumerate(texts):
            for word in str(text).lower().split():
                pattern = self._patterns.get(word)
                if pattern is None:
                    h = xxhash.xxh64_intdigest(word.encode())
                    pattern = self._patterns[word] = ([(h >> s) % self.dim for s in (0, 16, 32, 48)],
                                                      [1.0 if (h >> (s + 9)) & 1 else -1.0 for s in (0, 16, 32, 48)])
                rows.extend([row] * 4)
                cols.extend(pattern[0])
                signs.extend(pattern[1])
        np.add.at(out, (np.array(rows, dtype=np.int64), np.array(cols, dtype=np.int64)), np.array(signs, dtype=np.float32))
        norms = np.linalg.norm(out, axis=1, keepdims=True)
        return np.divide(out, norms, out=np.zeros_like(out), where=norms > 0)
