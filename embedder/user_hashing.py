"""Which block (or shard) a user id falls in: a stable 64-bit hash of the id, split into equal ranges.

The hash is pandas' (`embedder.event_blocks.user_hash`, vectorised, for the batch): SipHash-2-4 with
pandas' fixed key over the id's UTF-8 bytes, then a 64-bit mix. `user_hash_few` spells the same
steps out in Python for a reader routing one id, without importing pandas (a large share of a CLI
query's start); tests/test_store.py holds the two equal.
"""

from __future__ import annotations

import struct

import numpy as np

HASH_SPACE = 1 << 64
_M = HASH_SPACE - 1
_K0, _K1 = struct.unpack("<QQ", b"0123456789123456")  # pandas' hash key


def _rotl(x: int, b: int) -> int:
    return ((x << b) | (x >> (64 - b))) & _M


def siphash24(data: bytes, k0: int = _K0, k1: int = _K1) -> int:
    """SipHash-2-4 of `data` (the reference algorithm, as pandas' `hash_object_array` runs it)."""
    v = [k0 ^ 0x736F6D6570736575, k1 ^ 0x646F72616E646F6D, k0 ^ 0x6C7967656E657261, k1 ^ 0x7465646279746573]

    def rounds(n: int) -> None:
        v0, v1, v2, v3 = v
        for _ in range(n):
            v0 = (v0 + v1) & _M
            v1 = _rotl(v1, 13) ^ v0
            v0 = _rotl(v0, 32)
            v2 = (v2 + v3) & _M
            v3 = _rotl(v3, 16) ^ v2
            v0 = (v0 + v3) & _M
            v3 = _rotl(v3, 21) ^ v0
            v2 = (v2 + v1) & _M
            v1 = _rotl(v1, 17) ^ v2
            v2 = _rotl(v2, 32)
        v[:] = v0, v1, v2, v3

    end = len(data) - len(data) % 8
    for i in range(0, end, 8):
        m = struct.unpack_from("<Q", data, i)[0]
        v[3] ^= m
        rounds(2)
        v[0] ^= m
    last = ((len(data) & 0xFF) << 56) | int.from_bytes(data[end:], "little")
    v[3] ^= last
    rounds(2)
    v[0] ^= last
    v[2] ^= 0xFF
    rounds(4)
    return v[0] ^ v[1] ^ v[2] ^ v[3]


def _mix(h: int) -> int:
    h ^= h >> 30
    h = (h * 0xBF58476D1CE4E5B9) & _M
    h ^= h >> 27
    h = (h * 0x94D049BB133111EB) & _M
    return h ^ (h >> 31)


def user_hash_one(user_id: str) -> int:
    """`user_hash` of one string id, in Python."""
    return _mix(siphash24(str(user_id).encode("utf-8")))


def user_hash_few(ids: list[str]) -> np.ndarray:
    """`user_hash` of a few string ids, in Python (an id at a time: for a few ids, not for a batch)."""
    return np.array([user_hash_one(i) for i in ids], dtype=np.uint64)


def block_of_one(h: int, n_blocks: int) -> int:
    """`block_of` one hash, in integers (no numpy: a reader routing one id in a server thread; a numpy
    call releases the GIL and waits to take it back). `h * n >> 64` is the block or one below it:
    a block's first hash is rounded down (`bounds`), so h may be the next block's first."""
    b = (h * n_blocks) >> 64
    if b + 1 < n_blocks and (b + 1) * HASH_SPACE // n_blocks <= h:
        b += 1
    return b


def bounds(n_blocks: int) -> np.ndarray:
    """The first hash of each block (uint64, n_blocks values; block b ends where b+1 starts)."""
    return np.array([b * HASH_SPACE // n_blocks for b in range(n_blocks)], dtype=np.uint64)


def block_of(hashes: np.ndarray, n_blocks: int) -> np.ndarray:
    return np.searchsorted(bounds(n_blocks), np.asarray(hashes, np.uint64), side="right") - 1
