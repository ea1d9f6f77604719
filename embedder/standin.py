"""A stand-in encoder for scale tests of the data path only: NOT a language model.

`stand-in:hashing-384` maps each text to a 384-dimension unit vector by feature hashing its words
(each word adds a fixed pseudo-random ±1 pattern), so equal texts get equal vectors and texts
sharing words are similar. It is fast (no model weights, no torch) and makes a 1M-item run about
moving data, which is what the out-of-core benchmark measures; the encode rate of the real model is
measured separately (tests/benchmarks/bench_encode.py). Never the default, never chosen silently.
"""

from __future__ import annotations

import numpy as np
import xxhash

PREFIX = "stand-in:"
NAME = "stand-in:hashing-384"
DIM = 384


def is_standin(spec) -> bool:
    return str(spec).startswith(PREFIX)


class HashingEncoder:
    """The `SentenceTransformer.encode` surface that encode_chunk uses, over hashed words."""

    def __init__(self, dim: int = DIM):
        self.dim = dim
        self._patterns: dict[str, tuple[list[int], list[float]]] = {}

    def get_embedding_dimension(self) -> int:
        return self.dim

    def encode(self, texts, batch_size: int = 64, convert_to_numpy: bool = True, normalize_embeddings: bool = True,
               show_progress_bar: bool = False) -> np.ndarray:
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
        if normalize_embeddings:
            norms = np.linalg.norm(out, axis=1, keepdims=True)
            out = np.divide(out, norms, out=np.zeros_like(out), where=norms > 0)
        return out
