"""The items' text vectors in shards of their own, carried from one version to the next.

Text search and similar-from-text ask the items' text vectors through the engine's HNSW graph
(recommend/serving/shards.py, `Graph`). Building that graph was most of a publish: at 1M items on 2
cores about 210 s for each shard of 500k items, against about 50 s for everything else in it
(docs/performance.md, "Publishing at 1M"). Yet a catalog's texts change little from one night to the
next, and the embed stage already encodes only the changed ones. So the text vectors live in shards
of their own, `texts-000`, `texts-001`, ..., each item routed by the hash of its id (the same in every
version), with the item's metadata as payload (what a search answers and filters on). The item shards
keep the lists and the blended vectors.

A text shard starts from the live version's copy of it when it can (`write_text_shard`): the folder
copied (never linked: the engine writes into what it opens), then the items removed, changed or new
since applied to the copy, and the engine's optimize indexes what changed, keeping the graph of the
rest. Each text shard's keys (`texts-000.keys.npz` beside it in the version: its item ids and a 64-bit
digest of each one's vector and payload) say what changed. A previous shard is used only when it was
written with the same settings (`text_settings`) and its files are as written; otherwise, and on the
first night, the shard is written whole.

Example (what write_version runs on a worker for shard 0 of 2):
    info = write_text_shard(folder / "texts-000", spec, pieces, (0, 2), Graph(m=16), fields,
                            previous=live_folder / "texts-000")
"""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path
from typing import Iterable, Iterator

import numpy as np
import xxhash

from embedder.artifacts import file_digest
from recommend.serving.payloads import LIST_FIELDS
from recommend.serving.shards import Graph, ShardError, VectorSpec, engine_points, problems, shard_files, user_shard, write_shard

TEXT = "text"  # the vector a text shard holds (publish.ITEM_VECTOR)


def keys_path(shard: Path | str) -> Path:
    """Where a text shard's keys lie: beside its folder, in the version."""
    return Path(f"{shard}.keys.npz")


def text_settings(spec: VectorSpec, graph: Graph, fields: tuple, shards: int) -> dict:
    """What a text shard must share with the previous version's to be carried from it."""
    return {"size": spec.size, "graph": [graph.m, graph.ef_construct], "fields": [list(f) for f in fields],
            "shards": shards}


def digests(vectors: np.ndarray, payloads: list[dict]) -> np.ndarray:
    """A 64-bit digest of each row's vector (as float32) and payload: what tells a changed item."""
    rows = np.ascontiguousarray(vectors, dtype=np.float32)
    return np.fromiter((xxhash.xxh3_64_intdigest(rows[i].tobytes() + json.dumps(p, sort_keys=True, default=str).encode())
                        for i, p in enumerate(payloads)), dtype=np.uint64, count=len(payloads))


def text_batches(batches: Iterable[tuple[list, dict, list]], route: tuple[int, int]) -> Iterator[tuple[list, dict, list]]:
    """Item batches (business ids, named vectors, payloads) cut to a text shard's: the items whose id
    hashes into shard route[0] of route[1], their text vector and their metadata."""
    for ids, vectors, payloads in batches:
        if not len(ids):
            continue
        keep = np.flatnonzero(user_shard(list(ids), route[1]) == route[0])
        yield ([ids[i] for i in keep], {TEXT: np.asarray(vectors[TEXT])[keep]},
               [{k: v for k, v in payloads[i].items() if k not in LIST_FIELDS} for i in keep])


def _read_keys(path: Path) -> dict[str, int]:
    with np.load(path, allow_pickle=False) as keys:
        return dict(zip(keys["ids"].tolist(), keys["digests"].tolist()))


def _usable(previous: Path | None, info: dict | None) -> bool:
    """Whether a previous text shard can be copied: its files and its keys as version.json lists them."""
    if previous is None or not info or not info.get("keys"):
        return False
    keys = keys_path(previous)
    try:
        sound = keys.stat().st_size == info["keys"][0] and file_digest(keys) == info["keys"][1]
    except OSError:
        return False
    return sound and not problems(previous, info["files"])


def write_text_shard(folder: Path | str, spec: VectorSpec, batches: Iterable[tuple[list, dict, list]],
                     route: tuple[int, int], graph: Graph, fields: tuple = (), previous: Path | str | None = None,
                     previous_info: dict | None = None) -> dict:
    """Text shard route[0] of route[1] at `folder`, from item batches (business ids, {"text": array,
    ...}, payloads): from a copy of `previous` (the live version's shard; `previous_info`: its entry
    in that version's version.json) when it is sound, the changes applied; else written whole. Returns
    write_shard's info, with "carried" ({"from", "upserted", "removed"} or None) and "keys" ([size, digest])."""
    from recommend.serving.version_store import point_id

    folder, previous = Path(folder), (Path(previous) if previous else None)
    ids: list[str] = []
    sums: list[np.ndarray] = []

    def keyed(source):  # note each batch's keys on the way through
        for b_ids, vectors, payloads in text_batches(source, route):
            ids.extend(b_ids)
            sums.append(digests(vectors[TEXT], payloads))
            yield b_ids, vectors, payloads, sums[-1]

    if _usable(previous, previous_info):
        info = _carry(folder, previous, keyed(batches), point_id)
    else:
        cold = (([point_id("item", b) for b in b_ids], vectors, payloads) for b_ids, vectors, payloads, _ in keyed(batches))
        info = write_shard(folder, {TEXT: spec}, cold, graph, fields)
        info["carried"] = None
    keys = keys_path(folder)
    np.savez(keys, ids=np.asarray(ids, dtype=str), digests=np.concatenate(sums) if sums else np.zeros(0, np.uint64))
    info["keys"] = [keys.stat().st_size, file_digest(keys)]
    return info


def _carry(folder: Path, previous: Path, batches, point_id) -> dict:
    """The previous shard copied to `folder`, what changed upserted, what went removed, optimised."""
    from qdrant_edge import EdgeShard, Point, UpdateOperation

    began, clock = time.time(), time.perf_counter()
    if folder.exists():
        shutil.rmtree(folder)
    shutil.copytree(previous, folder)
    before = _read_keys(keys_path(previous))
    seconds = {"copy": time.perf_counter() - clock}
    shard, upserted, held = EdgeShard.load(str(folder)), 0, 0
    try:
        for b_ids, vectors, payloads, sums in batches:
            held += len(b_ids)
            changed = [i for i, (b, s) in enumerate(zip(b_ids, sums.tolist())) if before.pop(b, None) != s]
            if changed:
                pids = [point_id("item", b_ids[i]) for i in changed]
                for points in engine_points(Point, pids, {TEXT: np.asarray(vectors[TEXT])[changed]}, [payloads[i] for i in changed]):
                    shard.update(UpdateOperation.upsert_points(points))
                upserted += len(changed)
        gone = [point_id("item", b) for b in before]  # in the previous shard, not in this version
        if gone:
            shard.update(UpdateOperation.delete_points(gone))
        seconds["apply"] = time.perf_counter() - clock - seconds["copy"]
        shard.optimize()
        shard.flush()
        found = shard.info().points_count
    finally:
        shard.close()
    seconds["optimize"] = time.perf_counter() - clock - seconds["copy"] - seconds["apply"]
    if found != held:
        raise ShardError(f"shard {folder}: holds {found} points after its changes, {held} expected")
    files = shard_files(folder)
    seconds["digest"] = time.perf_counter() - clock - sum(seconds.values())
    return {"points": held, "files": files, "seconds": {k: round(v, 3) for k, v in seconds.items()},
            "ran": [round(began, 3), round(time.time(), 3)],
            "carried": {"from": previous.parent.name, "upserted": upserted, "removed": len(gone)}}
