"""Qdrant's engine in-process (qdrant-edge-py, pinned): one shard per folder, written once, read
through private views.

A shard is written by one process (`write_shard`): created without a write-ahead log, filled in
batches, optimised into immutable segments, flushed, closed, and its files listed with their sizes
and digests. Nothing writes into it after that.

Readers never open a shard's folder itself. The engine writes into a folder it opens (it takes the
write-ahead log's lock, rewrites a few small bookkeeping files in place and replaces `segment.json`,
even when nothing changed), so each reader opens a private view (`ShardView`): a folder of its own
where the bulk files the engine only reads (vectors, payload pages, the HNSW graph, the id mappings)
are hard links to the shard's, mapped and paged in by what a query touches, and every other file
is a private copy (small). Any number of readers open one version together, while a refresh writes
the next one beside it; tests/test_store.py checks that a view leaves the shard's files
byte-identical and untouched.

Users are routed to shards by the hash the event blocks use (`user_shard`): shard s of S holds the
users whose 64-bit hash lies in the s-th of S equal ranges, so a reader finds a user's shard
without asking any other, and the writer of shard s reads only the user blocks that overlap its range.
"""

from __future__ import annotations

import ctypes
import os
import re
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable

import numpy as np

from embedder.artifacts import file_digest
from embedder.errors import RecsError
from embedder.user_hashing import block_of, block_of_one, bounds, user_hash_few, user_hash_one

ENGINE = "qdrant-edge-py"
BATCH = 2048  # points per engine update
# Files the engine only reads once a shard is closed: linked into readers' views. Everything else
# (bookkeeping bitmaps, trackers, configs) is copied, since the engine rewrites some of it on open.
_LINKED = re.compile(r"^(matrix\.dat|page_\d+\.dat|chunk_\d+\.mmap|links(_compressed)?\.bin|graph\.bin|"
                     r"quantized\.data|id_tracker\.mappings|id_tracker\.versions)$")
# What queries read all over, read through when a server opens a version (`ShardView.warm`): payload
# pages, id mappings, the text graph, its int8 vectors and their originals (a search rescores with
# them); not the other float vectors, which only a real-time list reads, a few rows each.
_HOT = re.compile(r"^(page_\d+\.dat|id_tracker\.mappings|id_tracker\.versions|links(_compressed)?\.bin|graph\.bin|"
                  r"quantized\.data)$")


class ShardError(RecsError):
    """A shard could not be written, or its files are not what was written."""


@dataclass(frozen=True)
class VectorSpec:
    """One named vector of a shard: its size, and whether the engine builds an HNSW graph over it
    (only where a vector query is asked; a vector read by id needs none)."""

    size: int
    indexed: bool = False


@dataclass(frozen=True)
class Graph:
    """The HNSW graph's settings for indexed vectors (config: publish.hnsw_m, publish.hnsw_ef_construct;
    m=0: no graph, the vector is scanned exactly). A graph is built over int8 copies of the vectors
    (scalar quantization, kept on disk beside the originals): a quarter of float32's bytes, so the
    graph builds faster than over float32, and a query rescores its candidates with the originals
    (embedded.py, `ShardReader.search`): the answers are ranked by exact scores."""

    m: int = 0
    ef_construct: int = 64
    threads: int = 1  # per shard writer: writers run side by side, one per task slot


def engine_config(vectors: dict[str, VectorSpec], graph: Graph):
    from qdrant_edge import (Distance, EdgeConfig, EdgeOptimizersConfig, EdgeVectorParams, HnswIndexConfig, Memory,
                             ScalarQuantizationConfig, ScalarType)

    def hnsw(m: int):
        return HnswIndexConfig(m=m, ef_construct=graph.ef_construct, full_scan_threshold=10_000,
                               max_indexing_threads=graph.threads, memory=Memory.Cold)

    def int8(spec: VectorSpec):
        return ScalarQuantizationConfig(type=ScalarType.Int8, memory=Memory.Cold) if spec.indexed and graph.m else None

    params = {name: EdgeVectorParams(size=spec.size, distance=Distance.Dot, memory=Memory.Cold,
                                     hnsw_config=hnsw(graph.m if spec.indexed else 0),  # m=0: no graph
                                     quantization_config=int8(spec))
              for name, spec in vectors.items()}
    # indexing_threshold 1 kB: every segment is optimised into an immutable one when the load ends
    return EdgeConfig(vectors=params, payload_memory=Memory.Cold, wal_enabled=False, hnsw_config=hnsw(0),
                      optimizers=EdgeOptimizersConfig(indexing_threshold=1, default_segment_number=1))


def shard_files(folder: Path) -> dict[str, list]:
    """{relative path: [size, digest]} of every file of a closed shard."""
    return {str(p.relative_to(folder)): [p.stat().st_size, file_digest(p)]
            for p in sorted(folder.rglob("*")) if p.is_file()}


def write_shard(folder: Path | str, vectors: dict[str, VectorSpec], batches: Iterable[tuple[list, dict, list]],
                graph: Graph = Graph(), fields: tuple[tuple[str, str], ...] = ()) -> dict:
    """Write one shard at `folder` (replaced if there) from `batches`: tuples (point ids, {name: (n, d)
    array}, payloads), or lists of engine Points (each with the vectors it has: an added item,
    recommend/serving/additions.py). A payload index on each of `fields` ((name, kind): keyword,
    integer, float or bool; what filters ask, recommend/serving/filters.py). Optimised and closed.
    Returns {"points": n, "files": shard_files(folder), "seconds": per step, "ran": [start, end] in
    epoch seconds}; ShardError when the engine counts other than what was written."""
    from qdrant_edge import EdgeShard, PayloadSchemaType, Point, UpdateOperation

    from recommend.serving.filters import INDEX

    folder = Path(folder)
    if folder.exists():
        shutil.rmtree(folder)  # a leftover of a task that ran before (a lost worker's)
    shard, written = EdgeShard.create(str(folder), engine_config(vectors, graph)), 0
    seconds = dict.fromkeys(("read", "points", "update", "optimize", "digest"), 0.0)
    began = time.time()  # wall-clock, beside the steps' seconds: when the shard's writing ran within the publish
    clock = time.perf_counter()

    def lap(step: str) -> None:
        nonlocal clock
        now = time.perf_counter()
        seconds[step] += now - clock
        clock = now

    try:
        for name, kind in fields:
            shard.update(UpdateOperation.create_field_index(name, getattr(PayloadSchemaType, INDEX[kind])))
        for batch in batches:
            lap("read")
            for points in (engine_points(Point, *batch) if isinstance(batch, tuple) else [batch]):
                lap("points")
                shard.update(UpdateOperation.upsert_points(points))
                lap("update")
                written += len(points)
        shard.optimize()
        shard.flush()
        found = shard.info().points_count
    finally:
        shard.close()
    lap("optimize")
    if found != written:
        raise ShardError(f"shard {folder}: wrote {written} points, the engine counts {found}")
    files = shard_files(folder)
    lap("digest")
    return {"points": written, "files": files, "seconds": {k: round(v, 3) for k, v in seconds.items()},
            "ran": [round(began, 3), round(time.time(), 3)]}


def engine_points(point, ids: list, named: dict, payloads: list):
    """Engine points of a batch (point ids, {name: (n, d) array}, payloads), BATCH at a time. Each
    vector goes to the engine as a memoryview of its float32 row: the engine reads it about twice as
    fast as a numpy row (a point of 579 floats: 14-17 us against 30-45 on machine C), the same values."""
    for start in range(0, len(ids), BATCH):
        stop = min(start + BATCH, len(ids))
        # aligned too: an array unpickled from a worker's message may not be, and the engine refuses
        # the memoryview of an unaligned row (its format is "=f", not "f")
        rows = {n: list(map(memoryview, np.require(v[start:stop], dtype=np.float32, requirements=["C", "A"])))
                for n, v in named.items()}
        yield [point(ids[i], {n: r[i - start] for n, r in rows.items()}, payloads[i]) for i in range(start, stop)]


def user_shard(user_ids, shards: int) -> np.ndarray:
    """The shard of each user id: the s-th of `shards` equal ranges of the users' 64-bit hash."""
    if len(user_ids) < 64:  # a reader routing a few ids: no pandas (embedder/user_hashing.py)
        return block_of(user_hash_few(user_ids), shards)
    from embedder.event_blocks import user_hash

    return block_of(user_hash(user_ids), shards)


def shard_of_user(user_id: str, shards: int) -> int:
    """`user_shard` of one id, in plain Python (a reader answering a request)."""
    return block_of_one(user_hash_one(user_id), shards)


def blocks_of_shard(shard: int, shards: int, n_blocks: int) -> range:
    """The event blocks (hash ranges too, `n_blocks` of them) that overlap shard `shard`'s range."""
    starts = [int(b) for b in bounds(shards)] + [2 ** 64]
    first, last = block_of(np.array([starts[shard], starts[shard + 1] - 1], np.uint64), n_blocks)
    return range(int(first), int(last) + 1)


def problems(folder: Path, files: dict[str, list], deep: bool = False) -> list[str]:
    """What differs between a shard's files and those it was written with: missing, extra, another
    size; `deep`: another digest too. Empty: sound."""
    found = {str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file()} if folder.is_dir() else set()
    out = [f"{folder / name} is missing" for name in sorted(set(files) - found)]
    out += [f"{folder / name} was not written by the publish" for name in sorted(found - set(files))]
    for name in sorted(set(files) & found):
        size, digest = files[name]
        if (now := (folder / name).stat().st_size) != size:
            out.append(f"{folder / name} is damaged: {now} bytes, {size} written")
        elif deep and file_digest(folder / name) != digest:
            out.append(f"{folder / name} is damaged: its bytes are not those written")
    return out


class ShardView:
    """One reader's private view of a closed shard, opened with the engine (see the module's doc).
    `close()` closes the engine and removes the view."""

    def __init__(self, shard: Path, view: Path):
        from qdrant_edge import EdgeShard

        self.shard, self.view = Path(shard), Path(view)
        self.linked: dict[str, tuple[int, int]] = {}  # shard file -> (mtime_ns, size) when linked
        try:
            for path in sorted(self.shard.rglob("*")):
                target = self.view / path.relative_to(self.shard)
                if path.is_dir():
                    target.mkdir(parents=True, exist_ok=True)
                    continue
                target.parent.mkdir(parents=True, exist_ok=True)
                if _LINKED.match(path.name):
                    os.link(path, target)
                    st = path.stat()
                    self.linked[str(path)] = (st.st_mtime_ns, st.st_size)
                else:
                    shutil.copy2(path, target)
            self.engine = EdgeShard.load(str(self.view))
        except BaseException:
            shutil.rmtree(self.view, ignore_errors=True)
            raise

    def warm(self) -> int:
        """Read this view's hot files (`_HOT`) through, so that they are in the page cache (shared by
        every reader, not this process's memory) before the first query needs them. Returns the bytes read."""
        done, buffer = 0, bytearray(1 << 20)
        graphs = {Path(p).parent for p in self.linked if Path(p).name == "quantized.data"}
        for path in self.linked:
            # and the originals of a vector with a graph: every search rescores its candidates with them
            if _HOT.match(Path(path).name) or (Path(path).name == "matrix.dat" and Path(path).parent in graphs):
                with open(path, "rb", buffering=0) as f:
                    while n := f.readinto(buffer):
                        done += n
        return done

    def release(self) -> None:
        """Remove the view but leave the engine open until the process ends. Closing the engine
        evicts the shard's files from the page cache, for every process reading them (a server's hot
        pages), where the end of the process unmaps them without that: a reader that exits (a CLI
        query, a check) releases, a server closes only versions it no longer serves."""
        engine, self.engine = getattr(self, "engine", None), None
        if engine is not None:  # one more reference, never dropped: not freed even at the interpreter's shutdown
            ctypes.pythonapi.Py_IncRef(ctypes.py_object(engine))
        shutil.rmtree(self.view, ignore_errors=True)

    def changed(self) -> list[str]:
        """Linked shard files whose time or size changed since the view was opened (empty: none)."""
        changed = []
        for path, (mtime, size) in self.linked.items():
            st = os.stat(path)
            if (st.st_mtime_ns, st.st_size) != (mtime, size):
                changed.append(path)
        return changed

    def close(self) -> None:
        engine, self.engine = getattr(self, "engine", None), None
        try:
            if engine is not None:
                engine.close()
        finally:
            shutil.rmtree(self.view, ignore_errors=True)
