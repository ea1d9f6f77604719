"""Publish a run as a new version and switch it live: the points, their payloads, the transaction.

A version is two collections, ``<prefix>_items_<run_id>`` and ``<prefix>_users_<run_id>``, written by
`stage_version` into whatever client the version store gives (a local folder of its own, or a server),
then marked complete and switched live by `recommend.serving.versions` (`publish_version` runs the
whole transaction). A reader sees yesterday's version or today's, never a mix and never a half one.
"""

from __future__ import annotations

import math
import time
import uuid
from dataclasses import dataclass
from typing import Callable, Iterable, Sequence

import numpy as np
from qdrant_client import models

from recommend.serving.store import StoreUnavailable, bulk_load
from recommend.serving.versions import PublishError, Version, VersionStore, alias, collection  # noqa: F401 (re-exported)

NAMESPACE = uuid.UUID("6f1d7e2a-1c55-4f3e-9a49-2b8f4a6c0d11")
# Named vectors. Items: "text" (the embedding, for text queries), "blend" (what lists are ranked by)
# and "blend_query" (raw behaviour query side + text, for real-time user vectors). Users: "profile".
ITEM_VECTOR, USER_VECTOR = "text", "profile"
BLEND_VECTOR, BLEND_QUERY_VECTOR = "blend", "blend_query"
INDEXING_THRESHOLD = 20_000  # Qdrant's default (kB of vectors before a segment gets an HNSW index), restored after the load


def point_id(kind: str, business_id: str) -> str:
    """Deterministic point id: the same item or user gets the same id in every run (idempotent reruns)."""
    return str(uuid.uuid5(NAMESPACE, f"{kind}:{business_id}"))


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


def _clean(value):
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def _points(ids: list[str], vectors: dict[str, np.ndarray], payloads: Iterable[dict], batch_size: int,
            progress: Callable[[int], None] | None):
    """Points one at a time, vectors read a block of `batch_size` rows at a time, ticking `progress` per block."""
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
    `batch_size`, `parallel` upload processes on a server (local mode writes in this process)."""
    client.upload_points(name, points=_points(ids, vectors, payloads, batch_size, progress), batch_size=batch_size,
                         parallel=parallel, max_retries=3, wait=True)


def wait_indexed(client, name: str, timeout_s: float = 600.0, poll_s: float = 1.0) -> None:
    """Wait until Qdrant reports the collection optimised (status green), so that a version goes live
    with its search index built. Local mode is always green."""
    deadline = time.monotonic() + timeout_s
    while client.get_collection(name).status != models.CollectionStatus.GREEN:
        if time.monotonic() > deadline:
            raise PublishError(f"collection {name}: not indexed after {timeout_s:.0f}s; not switching")
        time.sleep(poll_s)


@dataclass(frozen=True)
class Storage:
    """How a server stores a version's collections (config: publish.shards, replicas, vectors_on_disk,
    payload_on_disk; None: the server's default). Local mode has none of these and ignores them."""

    shards: int | None = None
    replicas: int | None = None
    vectors_on_disk: bool = False
    payload_on_disk: bool | None = None

    def collection_options(self) -> dict:
        options = {"shard_number": self.shards, "replication_factor": self.replicas, "on_disk_payload": self.payload_on_disk}
        return {k: v for k, v in options.items() if v is not None}


@dataclass
class Points:
    """One collection's points as `stage_version` writes them: the named vectors' sizes, how many
    points, and `load(client, name, progress)`, which writes them all into collection `name` (in this
    process, or from tasks on the workers: recommend/run/publish_tasks.py)."""

    sizes: dict[str, int]
    count: int
    load: Callable[[object, str, Callable[[int], None] | None], None]


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

    return Points({n: int(v.shape[1]) for n, v in vectors.items()}, len(ids), load)


def stage_version(client, prefix: str, run_id: str, items: dict | Points, users: dict | Points, *, metadata: dict,
                  batch_size: int = 256, progress: Callable[[int], None] | None = None, parallel: int = 1,
                  index_wait_s: float = 600.0, storage: Storage = Storage()) -> dict:
    """Create and fill this run's two collections and check their counts. Nothing live changes.

    `items`/`users`: `Points`, or {"ids": [...], "vectors": {name: (n, d) array} or one (n, d) array
    (named "text" for items, "profile" for users), "payloads": [dict, ...]} (`in_process`). Indexing
    is deferred during the bulk load (on a server; local mode has no index to defer) and the version
    is ready only once indexed. Returns the counts written.
    """
    counts = {}
    for kind, data in (("items", items), ("users", users)):
        name = collection(prefix, kind, run_id)
        points = data if isinstance(data, Points) else in_process(kind[:-1], data, batch_size, parallel)
        if client.collection_exists(name):
            client.delete_collection(name)  # a half-filled leftover of a crashed attempt at this run
        client.create_collection(
            name, vectors_config={n: models.VectorParams(size=size, distance=models.Distance.DOT,
                                                         on_disk=storage.vectors_on_disk or None)
                                  for n, size in points.sizes.items()},
            optimizers_config=models.OptimizersConfigDiff(indexing_threshold=0),  # no index while loading
            metadata={**metadata, "kind": kind}, **storage.collection_options())
        with bulk_load(client, name):
            points.load(client, name, progress)
        client.update_collection(name, optimizers_config=models.OptimizersConfigDiff(indexing_threshold=INDEXING_THRESHOLD))
        wait_indexed(client, name, index_wait_s)
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


def publish_version(store: VersionStore, run_id: str, items: dict | Points, users: dict | Points, *, metadata: dict,
                    keep: int = 3, batch_size: int = 256, progress: Callable[[int], None] | None = None,
                    parallel: int = 1, index_wait_s: float = 600.0, storage: Storage = Storage()) -> Published:
    """The whole publish as a transaction: remove what crashed publishes left, write the version
    (`stage_version`), verify it and write its completion marker, switch it live, prune old versions.

    Until the switch nothing live changes; a failure at any point leaves no trace of this version.
    Pruning keeps `keep` versions, and never the live one or the one live before the switch.
    """
    try:
        previous = store.live()
    except StoreUnavailable:
        previous = None  # a damaged pointer: the switch writes it again
    removed = store.clean_incomplete(protect={previous})
    counts = store.publish(run_id, lambda client: stage_version(
        client, store.prefix, run_id, items, users, metadata=metadata, batch_size=batch_size, progress=progress,
        parallel=parallel, index_wait_s=index_wait_s, storage=storage), metadata)
    previous = store.switch(run_id)
    pruned = store.prune(keep, protect={run_id, previous})
    return Published(counts, previous, pruned, removed)


def item_payloads(item_ids, metadata: dict[str, list], scores: np.ndarray, ids: np.ndarray, run_id: str,
                  sources, subjects=None) -> list[dict]:
    """Item point payloads: the id, its similar items with scores, the run id and the chosen metadata.
    `ids` index `item_ids`; `subjects`: the ids of the rows (default `item_ids`: every item, in order;
    a block of items passes its own, with its rows of `metadata`)."""
    item_ids = np.asarray(item_ids, dtype=object)
    subjects = item_ids if subjects is None else np.asarray(subjects, dtype=object)
    out = []
    for r, item_id in enumerate(subjects):
        valid = ids[r] >= 0
        payload = {"item_id": item_id, "run_id": run_id, "source": str(sources[r]),
                   "similar": [{"item_id": i, "score": round(float(s), 5)}
                               for i, s in zip(item_ids[ids[r][valid]], scores[r][valid])]}
        payload.update({k: _clean(v[r]) for k, v in metadata.items()})
        out.append(payload)
    return out


def user_payloads(user_ids, item_ids, scores: np.ndarray, ids: np.ndarray, run_id: str, sources) -> list[dict]:
    """User point payloads: the id, the recommended items with scores, the run id and which path made them."""
    item_ids = np.asarray(item_ids, dtype=object)
    out = []
    for r, user_id in enumerate(user_ids):
        valid = ids[r] >= 0
        out.append({"user_id": user_id, "run_id": run_id, "source": str(sources[r]),
                    "recommended": [{"item_id": i, "score": round(float(s), 5)}
                                    for i, s in zip(item_ids[ids[r][valid]], scores[r][valid])]})
    return out
