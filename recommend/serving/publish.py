"""Publish a run as a new version and switch it live: the points, their payloads, the transaction.

A version holds the items and the users, written by `write_version` into engine shards (the embedded
default, recommend/serving/embedded.py: each shard by one task on a Dask worker, side by side) or by
`stage_version` into two collections of a Qdrant server, ``<prefix>_items_<run_id>`` and
``<prefix>_users_<run_id>``; then marked complete and switched live (`publish_version` runs the whole
transaction). A reader sees yesterday's version or today's, never a mix and never a half one.

The points' payloads are made by recommend/serving/payloads.py.
"""

from __future__ import annotations

import errno
import functools
import shutil
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Callable, Iterable, Sequence

import numpy as np

from recommend.serving.filters import INDEX
from recommend.serving.shard_process import APART_FROM, run_shard_tasks
from recommend.serving.shards import Graph, ShardError, VectorSpec, blocks_of_shard, user_shard, write_shard
from recommend.serving.text_graph import has_graph, pending, shard_folder
from recommend.serving.text_shards import text_settings, write_text_shard
from recommend.serving.store import StoreUnavailable
from recommend.serving.version_store import (NAMESPACE, PublishError, Version, VersionStore,  # noqa: F401 (re-exported)
                                             alias, collection, point_id)
# Named vectors. Items: "text" (the embedding, for text queries), "blend" (what lists are ranked by)
# and "blend_query" (raw behaviour query side + text, for real-time user vectors). Users: "profile".
ITEM_VECTOR, USER_VECTOR = "text", "profile"
BLEND_VECTOR, BLEND_QUERY_VECTOR = "blend", "blend_query"
INDEXING_THRESHOLD = 20_000  # Qdrant's default (kB of vectors before a segment gets an HNSW index), restored after the load


def vector_sizes(layout, text_dim: int) -> dict[str, dict[str, int]]:
    """The named vectors' sizes of each kind of point, from the version's layout (a
    recommend.ranking.blend.Layout: behaviour_dim, text_dim) and the encoder's dimensions."""
    blend = layout.behaviour_dim + layout.text_dim
    return {"item": {ITEM_VECTOR: int(text_dim), BLEND_VECTOR: blend + 1, BLEND_QUERY_VECTOR: blend},
            "user": {USER_VECTOR: blend + 1}}


class PointIds(Sequence):
    """The point ids of business ids, made as sliced (a batch of points at a time)."""

    def __init__(self, kind: str, ids: Sequence[str]):
        self.kind, self.ids = kind, ids

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, index):
        if isinstance(index, slice):
            return [point_id(self.kind, b) for b in self.ids[index]]
        return point_id(self.kind, self.ids[index])


def _points(ids: list[str], vectors: dict[str, np.ndarray], payloads: Iterable[dict], batch_size: int,
            progress: Callable[[int], None] | None):
    """Points one at a time, vectors read a block of `batch_size` rows at a time, ticking `progress` per block."""
    from qdrant_client import models  # here, not at the top: readers import this module and need no client

    payloads = iter(payloads)
    for start in range(0, len(ids), batch_size):  # vectors fetched a block at a time: they may be computed on demand
        stop = min(start + batch_size, len(ids))
        block = {name: np.asarray(v[start:stop], dtype=np.float32) for name, v in vectors.items()}
        for j, pid in enumerate(ids[start:stop]):
            yield models.PointStruct(id=pid, vector={name: b[j].tolist() for name, b in block.items()}, payload=next(payloads))
        if progress:
            progress(stop - start)


def upload(client, name: str, ids: list[str], vectors: dict[str, np.ndarray], payloads: Iterable[dict],
           batch_size: int = 256, progress: Callable[[int], None] | None = None, parallel: int = 1) -> None:
    """Bulk upload of (id, named vectors, payload) points into collection `name`: batches of
    `batch_size`, `parallel` upload processes on a server."""
    client.upload_points(name, points=_points(ids, vectors, payloads, batch_size, progress), batch_size=batch_size,
                         parallel=parallel, max_retries=3, wait=True)


def wait_indexed(client, name: str, timeout_s: float = 600.0, poll_s: float = 1.0) -> None:
    """Wait until Qdrant reports the collection optimised (status green), so that a version goes live
    with its search index built. (qdrant-client's in-memory mode is always green.)"""
    from qdrant_client import models

    deadline = time.monotonic() + timeout_s
    while client.get_collection(name).status != models.CollectionStatus.GREEN:
        if time.monotonic() > deadline:
            raise PublishError(f"collection {name}: not indexed after {timeout_s:.0f}s; not switching")
        time.sleep(poll_s)


@dataclass(frozen=True)
class Storage:
    """How a version is stored, written and kept (config: the publish section's shards, replicas,
    vectors_on_disk, payload_on_disk, hnsw_m, hnsw_ef_construct, batch_size, parallel, index_wait_s,
    keep_versions). On a server None is the server's default; the embedded store takes `shards`
    (default: one per Dask worker) and `graph`, and maps everything from disk."""

    shards: int | None = None
    replicas: int | None = None
    vectors_on_disk: bool = False
    payload_on_disk: bool | None = None
    graph: Graph = Graph()
    batch_size: int = 256        # points per upsert into a server
    parallel: int = 1            # upserts in flight from this process
    index_wait_s: float = 600.0  # how long a server may take to index a new version
    keep: int = 3                # versions kept for rollback
    fields: tuple[tuple[str, str], ...] = ()  # (item field, kind) pairs given a payload index (filters.py)

    def collection_options(self) -> dict:
        options = {"shard_number": self.shards, "replication_factor": self.replicas, "on_disk_payload": self.payload_on_disk}
        return {k: v for k, v in options.items() if v is not None}


@dataclass
class Points:
    """One kind's points: the named vectors' sizes, how many points, and two ways to write them.
    - `load(client, name, progress)` writes them all into collection `name` of a server (in this
      process, or from tasks on the workers: recommend/run/tasks/publish_tasks.py);
    - `pieces` (picklable callables, each returning (business ids, {name: (n, d) array}, payloads))
      are what the embedded store's shard tasks read; for users, `blocks` says the pieces are the
      event blocks in order (hash ranges: a user shard reads only those overlapping its own range),
      None that any piece may hold any user; for items, `texts` are pieces with the text vector and
      the metadata alone, what the text shards read (None: `pieces`, which have them too)."""

    sizes: dict[str, int]
    count: int
    load: Callable[[object, str, Callable[[int], None] | None], None]
    pieces: list[Callable[[], tuple[list, dict, list]]] = field(default_factory=list)
    blocks: int | None = None
    texts: list[Callable[[], tuple[list, dict, list]]] | None = None  # items: what the text shards read (default: pieces)


def in_process(kind: str, data: dict, batch_size: int = 256, parallel: int = 1) -> Points:
    """`Points` of `kind` ("item" or "user") from {"ids": [...], "vectors": {name: (n, d) array} or one
    (n, d) array (named "text" for items, "profile" for users), "payloads": [dict, ...]}, uploaded
    from this process."""
    vectors = data["vectors"]
    if not isinstance(vectors, dict):
        vectors = {ITEM_VECTOR if kind == "item" else USER_VECTOR: vectors}
    ids = PointIds(kind, data["ids"])

    def load(client, name: str, progress) -> None:
        upload(client, name, ids, vectors, data["payloads"], batch_size, progress, parallel)

    piece = functools.partial(_given, list(data["ids"]), vectors, list(data["payloads"]))
    return Points({n: int(v.shape[1]) for n, v in vectors.items()}, len(ids), load, [piece])


def _given(ids: list, vectors: dict, payloads: list) -> tuple[list, dict, list]:
    return ids, vectors, payloads


def _shard_batches(kind: str, pieces: list, route: tuple[int, int] | None, names):
    """(point ids, vectors, payloads) of each piece; `route` (shard, shards): only that shard's users;
    `names`: the vectors kept (items': without the text vector where they have others, it lives in
    the text shards, recommend/serving/text_shards.py)."""
    for piece in pieces:
        ids, vectors, payloads = piece()
        if route is not None and len(ids):
            keep = np.flatnonzero(user_shard(ids, route[1]) == route[0])
            if len(keep) < len(ids):
                ids, payloads = [ids[i] for i in keep], [payloads[i] for i in keep]
                vectors = {n: np.asarray(v)[keep] for n, v in vectors.items()}
        vectors = {n: v for n, v in vectors.items() if n in names}
        yield [point_id(kind, b) for b in ids], vectors, payloads


def write_shard_task(folder: str, kind: str, specs: dict[str, VectorSpec], pieces: list,
                     route: tuple[int, int] | None, graph: Graph, fields: tuple = (), previous: tuple | None = None) -> dict:
    """One shard of a version, written from its pieces (a task on a Dask worker, or in this process);
    `fields`: the payload indexes of an item or text shard; `previous` (a text shard's): (folder, its
    entry in version.json) of the live version's same shard, to start from (text_shards.py)."""
    if kind == "text":
        return write_text_shard(folder, specs[ITEM_VECTOR], (piece() for piece in pieces), route, graph, fields,
                                *(previous or (None, None)))
    return write_shard(folder, specs, _shard_batches(kind, pieces, route, set(specs)), graph if kind == "item" else Graph(),
                       fields if kind == "item" else ())


def shard_jobs(items: Points, users: Points, shards: int) -> list[tuple[str, str, list, tuple | None]]:
    """(shard name, kind, pieces, route) of every shard: the item pieces cut into `shards` runs in
    order; the items' text vectors (`items.texts`, else the item pieces) in `shards` ranges of the
    item ids' hash, the same from version to version; users in `shards` hash ranges, each with the
    pieces that may hold its users."""
    jobs = []
    n_items = max(1, min(shards, len(items.pieces)))
    for s, run in enumerate(np.array_split(np.arange(len(items.pieces)), n_items)):
        jobs.append((f"items-{s:03d}", "item", [items.pieces[i] for i in run], None))
    for s in range(shards):
        jobs.append((f"texts-{s:03d}", "text", items.texts or items.pieces, (s, shards)))
    for s in range(shards):
        mine = (users.pieces if users.blocks is None
                else [users.pieces[b] for b in blocks_of_shard(s, shards, users.blocks)])
        jobs.append((f"users-{s:03d}", "user", mine, (s, shards)))
    return jobs


def shard_sizes(items: Points, users: Points, jobs: list) -> dict[str, float]:
    """The points each shard of `jobs` is expected to hold: items by its share of the pieces, texts
    and users by the hash ranges' share."""
    ranges = {kind: sum(1 for _, k, _, _ in jobs if k == kind) or 1 for kind in ("text", "user")}
    return {name: (items.count * len(pieces) / max(1, len(items.pieces)) if kind == "item"
                   else (items.count if kind == "text" else users.count) / ranges[kind])
            for name, kind, pieces, _ in jobs}


# Seconds per point of a shard's writing, by kind, from the 1M x 1M publish (docs/performance.md,
# "Publishing at 1M"): an item point (two blended vectors, its list) about 100 us, a user point 56 us,
# a text point 25 us, and its graph 420 us more unless the shard is carried from the live version
# (its changes only). Only their ratios matter: they order the shards.
COST_PER_POINT = {"item": 100e-6, "user": 56e-6, "text": 25e-6, "graph": 420e-6}


def longest_first(jobs: list, sizes: dict[str, float], graph: Graph, carried: set = frozenset()) -> list:
    """`jobs` ordered by their expected time, longest first (`carried`: text shards started from the
    live version's): handed out one per task slot as slots free, the long shards start at once and
    the short ones fill the slots that free up early (at 100k x 100k both user shards had waited on
    one worker while the other sat idle)."""
    def cost(job) -> float:
        name, kind = job[0], job[1]
        graphed = kind == "text" and graph.m and name not in carried
        return sizes[name] * (COST_PER_POINT[kind] + (COST_PER_POINT["graph"] if graphed else 0.0))

    return sorted(jobs, key=cost, reverse=True)


def write_version(folder: Path, items: Points, users: Points, *, storage: Storage = Storage(shards=1), dask=None,
                  progress: Callable[[int], None] | None = None, previous: tuple[Path, dict] | None = None
                  ) -> tuple[dict, dict, dict]:
    """Write a version's shards into `folder`: one task per shard on the workers of `dask` (a
    distributed Client; a task writes a text shard of `APART_FROM` points or more with a graph in a
    child process, recommend/serving/shard_process.py, the others on the worker's thread; None: one
    after the other in this process). `storage.shards`
    item, text and user shards each. The text shards build an HNSW graph over the items' text vectors
    (what text search asks) when `storage.graph.m` > 0, starting from `previous` ((folder, marker) of
    the live version) where its text shards were written alike (recommend/serving/text_shards.py);
    when `previous` has no graph, the marker says it is pending and it is built after the switch
    (recommend/serving/text_graph.py). No other vector gets one. `storage.fields` ((name, kind) pairs) get a payload index in the item and
    text shards. Returns (counts, {shard name: its points and files}, the marker's other fields)."""
    shards, graph, fields = storage.shards or 1, storage.graph, tuple(storage.fields)
    specs = {"item": {n: VectorSpec(d) for n, d in items.sizes.items() if n != ITEM_VECTOR or len(items.sizes) == 1},
             "text": {ITEM_VECTOR: VectorSpec(items.sizes[ITEM_VECTOR], indexed=True)},
             "user": {n: VectorSpec(d) for n, d in users.sizes.items()}}
    folder.mkdir(parents=True, exist_ok=True)
    need, free = space_needed(items, users, shards), shutil.disk_usage(folder).free
    if free < need:  # the engine writes through memory maps: a disk that fills up mid-write kills the writer (SIGBUS)
        raise OSError(errno.ENOSPC, f"No space left on device for this version: about {need / 2**20:,.1f} MiB "
                                    f"needed, {free / 2**20:,.1f} MiB free", str(folder))
    # no live graph to keep (no version live, or it has none): the graph is built after the switch
    # (recommend/serving/text_graph.py), the lists do not wait for it
    after = graph.m > 0 and not has_graph(previous[1] if previous else None)
    texts = {"settings": text_settings(specs["text"][ITEM_VECTOR], replace(graph, m=0) if after else graph, fields, shards)}
    if after:
        texts["pending"] = text_settings(specs["text"][ITEM_VECTOR], graph, fields, shards)
        graph = replace(graph, m=0)
    before = previous if previous and (previous[1].get("texts") or {}).get("settings") == texts["settings"] else None
    jobs = shard_jobs(items, users, shards)
    carry = {name: (str(before[0] / shard_folder(before[1], name)), before[1]["shards"][name])
             for name, kind, _, _ in jobs if kind == "text" and before and name in before[1]["shards"]}
    calls = {name: (str(folder / name), kind, specs[kind], pieces, route, graph, fields, carry.get(name))
             for name, kind, pieces, route in jobs}
    sizes = shard_sizes(items, users, jobs)
    order = [job[0] for job in longest_first(jobs, sizes, graph, set(carry))]
    # apart: a graph's build, where the engine holds the GIL for minutes; the other shards' optimize holds
    # it seconds (12 s for 500k items), and a child's start (imports: about 1.3 s) cost more than that at
    # 100k x 100k, where six children started one after another took a third of the publish
    written = run_shard_tasks(write_shard_task, calls, order, dask=dask, progress=progress, key="write-shard",
                              apart=lambda name: calls[name][1] == "text" and graph.m > 0 and sizes[name] >= APART_FROM)
    counts = {kind: sum(w["points"] for n, w in written.items() if n.startswith(kind)) for kind in ("items", "users")}
    if (held := sum(w["points"] for n, w in written.items() if n.startswith("texts"))) != counts["items"]:
        raise ShardError(f"version {folder}: {counts['items']} items written, {held} in the text shards")
    return counts, written, {"user_shards": shards, "texts": texts}


def space_needed(items: Points, users: Points, shards: int) -> int:
    """Bytes a version's shards take on disk, roughly and on the high side: every vector twice (the
    load's segment and the optimised one), about half a kilobyte of payload and graph per point, and
    the engine's files per shard."""
    per_point = {kind: 2 * 4 * sum(p.sizes.values()) + 512 for kind, p in (("item", items), ("user", users))}
    texts = items.count * 512 + 2 * shards * 256 * 1024  # the text vectors' graph and payloads, in shards of their own
    return items.count * per_point["item"] + users.count * per_point["user"] + 2 * shards * 256 * 1024 + texts


def stage_version(client, prefix: str, run_id: str, items: dict | Points, users: dict | Points, *, metadata: dict,
                  progress: Callable[[int], None] | None = None, storage: Storage = Storage()) -> dict:
    """Create and fill this run's two collections and check their counts. Nothing live changes.

    `items`/`users`: `Points`, or {"ids": [...], "vectors": {name: (n, d) array} or one (n, d) array
    (named "text" for items, "profile" for users), "payloads": [dict, ...]} (`in_process`). Indexing
    is deferred during the bulk load and the version is ready only once indexed. Returns the counts written.
    """
    from qdrant_client import models

    counts = {}
    for kind, data in (("items", items), ("users", users)):
        name = collection(prefix, kind, run_id)
        points = data if isinstance(data, Points) else in_process(kind[:-1], data, storage.batch_size, storage.parallel)
        if client.collection_exists(name):
            client.delete_collection(name)  # a half-filled leftover of a crashed attempt at this run
        client.create_collection(
            name, vectors_config={n: models.VectorParams(size=size, distance=models.Distance.DOT,
                                                         on_disk=storage.vectors_on_disk or None)
                                  for n, size in points.sizes.items()},
            optimizers_config=models.OptimizersConfigDiff(indexing_threshold=0),  # no index while loading
            metadata={**metadata, "kind": kind}, **storage.collection_options())
        for field_name, field_kind in storage.fields if kind == "items" else ():
            client.create_payload_index(name, field_name, field_schema=getattr(models.PayloadSchemaType,
                                                                               INDEX[field_kind].upper()))
        points.load(client, name, progress)
        client.update_collection(name, optimizers_config=models.OptimizersConfigDiff(indexing_threshold=INDEXING_THRESHOLD))
        wait_indexed(client, name, storage.index_wait_s)
        found = client.count(name, exact=True).count
        if found != points.count:
            raise PublishError(f"collection {name}: wrote {points.count} points, Qdrant counts {found}; not switching")
        counts[kind] = found
    return counts


def live_gate(store: VersionStore, prefix: str | None = None) -> dict | None:
    """The quality-gate figures the live version was published with, and its run id (None before
    the first publish). Complete versions only."""
    return store.live_gate()


@dataclass
class Published:
    counts: dict
    previous: str | None
    pruned: list[str]
    removed_incomplete: list[str]
    graph_pending: bool = False  # the text graph is to be built now (text_graph.build_text_graph)


def publish_version(store: VersionStore, run_id: str, items: dict | Points, users: dict | Points, *, metadata: dict,
                    progress: Callable[[int], None] | None = None, storage: Storage = Storage(), dask=None) -> Published:
    """The whole publish as a transaction: remove what crashed publishes left, write the version
    (`write_version` into the embedded store, its shards as tasks on `dask`'s workers when given;
    `stage_version` into a server), verify it and write its completion marker, switch it live, prune
    old versions.

    Until the switch nothing live changes; a failure at any point leaves no trace of this version.
    Pruning keeps `storage.keep` versions, and never the live one or the one live before the switch.
    """
    try:
        previous = store.live()
    except StoreUnavailable:
        previous = None  # a damaged pointer: the switch writes it again
    removed = store.clean_incomplete(protect={previous})
    if store.embedded:
        items, users = (p if isinstance(p, Points) else in_process(k, p) for k, p in (("item", items), ("user", users)))
        shards = storage.shards or (len(dask.scheduler_info()["workers"]) if dask is not None else 1)
        counts = store.publish(run_id, lambda folder: write_version(
            folder, items, users, storage=replace(storage, shards=shards), dask=dask, progress=progress,
            previous=store.written(previous)), metadata)
    else:
        counts = store.publish(run_id, lambda client: stage_version(
            client, store.prefix, run_id, items, users, metadata=metadata, progress=progress, storage=storage), metadata)
    previous = store.switch(run_id)
    pruned = store.prune(storage.keep, protect={run_id, previous})
    written = store.written(run_id) if store.embedded else None
    return Published(counts, previous, pruned, removed, bool(written and pending(written[1])))
