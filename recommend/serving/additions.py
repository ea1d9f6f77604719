"""Today's items: items added to a published version during the day, searchable at once.

`recs add-items FILE` and POST /items (recommend/serving/intake.py) add new or changed items to the
live version. An added item gets its text vector (encoded through the embedding cache) and its
metadata, so text search, similar-from-text and filters find it the same day. It has no behaviour
yet: no blended vectors and no similar list of its own, and users' lists do not name it; the
published lists stay as the night made them, and the next refresh folds the item in from the catalog
like any other. An item the version already holds is replaced: its new text vector and metadata,
with the stored list and blended vectors it had (`added_points`).

Additions belong to the version they were added to: a rollback leaves them behind with it, and the
next refresh's version starts with none.

In the embedded store (`write_added`) a version's additions are one more shard beside its own,
`versions/<run_id>/added-<n>/`, named by `versions/<run_id>/added.json` (written last, replaced
atomically: the ids added so far and those that replace one of the version's items). Each addition
writes the next shard from the previous one's points and the new ones, then added.json, then removes
the previous shard (a reader that opened it keeps its own links to the files). A crash leaves the
previous state, and a shard added.json does not name is removed by the next addition. Readers search
the added shard beside the item shards, the replaced items' old points left out
(recommend/serving/embedded.py). On a server the points are upserted into the version's items
collection (recommend/serving/versions.py).

Example:
    points = added_points(reader, meta, ["I9001"], text_vectors, [{"category": "Shoes", "price": "59"}])
    state = write_added(Path(".recs/store/recs/versions") / run_id, meta, points, replaces={"I0042"})
"""

from __future__ import annotations

import json
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from embedder.artifacts import write_json
from recommend.serving.publish import BLEND_QUERY_VECTOR, BLEND_VECTOR, ITEM_VECTOR, vector_sizes
from recommend.serving.shards import Graph, ShardView, VectorSpec, write_shard
from recommend.serving.version_store import point_id

ADDED = "added.json"
LISTED = ("similar", "source")  # what a replaced item keeps from its published payload


@dataclass
class AddedPoint:
    """One item as added: its id, the vectors it has (by name) and its payload."""

    item_id: str
    vectors: dict[str, list[float]]
    payload: dict


def added_points(reader, meta: dict, item_ids: list[str], text: np.ndarray, metadata: list[dict]) -> list[AddedPoint]:
    """The points of items to add to the version `reader` reads (its metadata `meta`): each with its
    text vector and `metadata` (indexed fields typed as the version indexes them: recommend/serving/
    intake.py checks them); an item the version holds keeps its stored list and blended vectors."""
    held = reader.payloads("item", item_ids)
    kept: dict[str, dict] = {i: {} for i in held}
    for name in (BLEND_VECTOR, BLEND_QUERY_VECTOR) if meta.get("layout") and held else ():
        pids, rows = reader.vectors(list(held), name)
        by_pid = {str(p): r for p, r in zip(pids, rows)}  # the engine answers UUIDs
        for i in held:
            if (row := by_pid.get(point_id("item", i))) is not None:
                kept[i][name] = [float(x) for x in row]
    out = []
    for item_id, row, fields in zip(item_ids, np.asarray(text, dtype=np.float32), metadata):
        payload = {"item_id": item_id, **{k: held[item_id][k] for k in LISTED if k in held.get(item_id, {})}, **fields}
        out.append(AddedPoint(item_id, {ITEM_VECTOR: row.tolist(), **kept.get(item_id, {})}, payload))
    return out


def read_added(version: Path) -> dict | None:
    """A version folder's additions (added.json), None when it has none."""
    try:
        return json.loads((Path(version) / ADDED).read_text())
    except FileNotFoundError:
        return None


def added_token(version: Path):
    """What changes when a version's additions do (added.json is replaced, never edited): readers
    following the live version compare it (recommend/serving/live.py)."""
    try:
        st = (Path(version) / ADDED).stat()
    except FileNotFoundError:
        return None
    return st.st_ino, st.st_mtime_ns


def _specs(meta: dict) -> dict[str, VectorSpec]:
    """The added shard's vectors: those of the version's item shards, with no graph (a day's additions
    are scanned exactly: a few thousand points)."""
    from recommend.ranking.blend import Layout

    if not meta.get("layout"):
        return {ITEM_VECTOR: VectorSpec(int(meta["dim"]))}
    return {n: VectorSpec(d) for n, d in vector_sizes(Layout(**meta["layout"]), int(meta["dim"]))["item"].items()}


def _previous_points(version: Path, state: dict | None, leave_out: set[str]) -> list:
    """The engine points of the additions so far, those in `leave_out` (added again now) left out."""
    if not state:
        return []
    from qdrant_edge import Point, ScrollRequest

    view = ShardView(version / state["shard"], version / f".view-{state['shard']}-{time.time_ns()}")
    try:
        points, offset = [], None
        while True:
            records, offset = view.engine.scroll(ScrollRequest(offset=offset, limit=1024, with_payload=True, with_vector=True))
            points += [Point(r.id, dict(r.vector), r.payload) for r in records if r.payload["item_id"] not in leave_out]
            if offset is None:
                return points
    finally:
        view.close()


def write_added(version: Path, meta: dict, points: list[AddedPoint], replaces: set[str]) -> dict:
    """Add `points` to the version in folder `version` (its metadata `meta`; `replaces`: the ids among
    them the version's own shards hold): the next added shard and added.json, as the module's doc
    says. The caller holds the additions' lock (intake.py). Returns the new added.json."""
    from qdrant_edge import Point

    version = Path(version)
    state = read_added(version)
    new = {p.item_id for p in points}
    kept = _previous_points(version, state, new)
    generation = (state["generation"] if state else 0) + 1
    name = f"added-{generation:04d}"
    mine = [Point(point_id("item", p.item_id), p.vectors, p.payload) for p in points]
    fields = tuple((meta.get("indexed_fields") or {}).items())
    written = write_shard(version / name, _specs(meta), [kept[i:i + 2048] for i in range(0, len(kept), 2048)] + [mine],
                          Graph(), fields)  # ShardError when the engine holds other than was written
    items = sorted(set(state["items"] if state else ()) | new)
    added = {"generation": generation, "shard": name, "files": written["files"], "points": written["points"],
             "items": items, "replaces": sorted(set(state["replaces"] if state else ()) | replaces),
             "at": time.time()}
    write_json(added, version / ADDED, durable=True)
    for old in (*version.glob("added-*"), *version.glob(".view-added-*")):  # the previous shard, what a crash left
        if old.name != name:
            shutil.rmtree(old, ignore_errors=True)
    return added
