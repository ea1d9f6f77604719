"""Hand memory the process has freed back to the operating system between stages.

glibc keeps freed heap memory for reuse instead of returning it, so a stage that made and dropped many
small objects (ingest's per-row values, a split's temporary frames) leaves the process's resident size
at its peak for the rest of the run. `malloc_trim(0)` returns what is free. Elsewhere than glibc
(macOS, musl) it does nothing.

A full collection walks every object the process holds, most of them modules' functions and types
(hundreds of thousands once torch is imported, a noticeable pause each time). Within
`survivors_frozen()`, what survives a collection is frozen (`gc.freeze`), so the next one walks only
what was made since. Reference counting still frees frozen objects; pandas frames and numpy arrays
hold no reference cycles, so nothing a stage drops waits for the end of the run.

Arrow allocates from its own pool (mimalloc in the wheels), which keeps what it freed, above all
what other threads (Dask's, Parquet's) allocated, and after the embed stage at scale that is much of
the driver's memory. `release_freed_memory` asks the pool to return it too. (Arrow on the system
allocator returned it as well, but made the driver's side of the encode slower: docs/performance.md.)

Example:
    from recommend.run.infra.memory import release_freed_memory, survivors_frozen
    with survivors_frozen():
        ...  # a stage
        release_freed_memory()
"""

from __future__ import annotations

import ctypes
import ctypes.util
import gc
from contextlib import contextmanager
from functools import lru_cache

_freezing = False


@lru_cache(maxsize=1)
def _malloc_trim():
    try:
        return ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").malloc_trim
    except (OSError, AttributeError):
        return None


def release_freed_memory() -> bool:
    """Collect garbage, then return the heap's free memory to the OS. True where that is possible."""
    gc.collect()
    if _freezing:
        gc.freeze()
    import pyarrow as pa

    pa.default_memory_pool().release_unused()  # Arrow's pool first: what it returns to malloc is trimmed next
    trim = _malloc_trim()
    if trim is None:
        return False
    trim(0)
    return True


@contextmanager
def survivors_frozen():
    """Freeze what survives each `release_freed_memory()` inside the block; unfreeze all on leaving it,
    so a long-lived process (a notebook, the service) collects as usual afterwards."""
    global _freezing
    _freezing = True
    try:
        yield
    finally:
        _freezing = False
        gc.unfreeze()
