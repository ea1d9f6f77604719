"""Today's items (recommend/serving/additions.py) on both stores: added items are found by text
search, similar-from-text and filters at once, a changed item replaces the version's own (once,
with its new metadata, its lists and blended vectors kept), users' lists never name an added item,
the counts show them, and a rollback leaves them behind with their version.

The oracle is numpy over the version's text vectors and the added ones."""

from __future__ import annotations

import numpy as np
import pytest

from recommend.ranking.blend import Layout
from recommend.serving.additions import added_points
from recommend.serving.facade import Recommender, text_answer
from recommend.serving.filters import Where
from recommend.serving.live import LiveVersion, NotFound
from recommend.serving.payloads import item_payloads, parse_list, user_payloads
from recommend.serving.publish import Storage, publish_version, vector_sizes
from recommend.serving.versions import EmbeddedVersions, ServerVersions

N_ITEMS, DIM, K = 40, 8, 5
FIELDS = {"category": "keyword", "price": "float"}
LAYOUT = Layout(behaviour_dim=3, text_dim=4, behaviour_weight=0.7, popularity_weight=0.3, few_events=5.0)
V0, V1 = "20260101T000000Z-a0", "20260102T000000Z-a1"


def _unit(x):
    return (x / np.linalg.norm(x, axis=-1, keepdims=True)).astype(np.float32)


def _version(seed: int):
    rng = np.random.default_rng(seed)
    sizes = vector_sizes(LAYOUT, DIM)
    text = _unit(rng.normal(size=(N_ITEMS, DIM)))
    vectors = {"text": text, **{n: rng.normal(size=(N_ITEMS, d)).astype(np.float32) for n, d in sizes["item"].items()
                                if n != "text"}}
    item_ids = np.array([f"i{i}" for i in range(N_ITEMS)], dtype=object)
    metadata = {"category": ["shoes" if i % 2 else "hats" for i in range(N_ITEMS)], "price": [float(i) for i in range(N_ITEMS)]}
    ids = np.array([[(i + j + 1) % N_ITEMS for j in range(K)] for i in range(N_ITEMS)])
    scores = np.tile(np.linspace(0.9, 0.5, K, dtype=np.float32), (N_ITEMS, 1))
    items = {"ids": item_ids.tolist(), "vectors": vectors,
             "payloads": item_payloads(item_ids, metadata, scores, ids, ["similar"] * N_ITEMS)}
    users = {"ids": ["u0", "u1"], "vectors": rng.normal(size=(2, sizes["user"]["profile"])).astype(np.float32),
             "payloads": user_payloads(["u0", "u1"], item_ids, scores[:2], ids[:2], ["history"] * 2)}
    return items, users


def _publish(store, run_id: str, seed: int):
    items, users = _version(seed)
    publish_version(store, run_id, items, users, storage=Storage(fields=tuple(FIELDS.items())),
                    metadata={"run_id": run_id, "created_at": "2026-01-01T00:00:00+00:00", "indexed_fields": FIELDS,
                              "dim": DIM, "layout": LAYOUT.to_dict(), "query_scale": 1.0})
    return items


@pytest.fixture(params=["embedded", "server"])
def store(request, tmp_path):
    if request.param == "embedded":
        return EmbeddedVersions(tmp_path / "store", "t")
    from qdrant_client import QdrantClient

    return ServerVersions(QdrantClient(":memory:"), "t")


def _add(store, run_id: str, adds: dict[str, tuple[np.ndarray, dict]]) -> int:
    """Add items {id: (text vector, metadata)} to `run_id` as the intake does."""
    reader = store.open(run_id)
    try:
        ids = list(adds)
        replaces = reader.held(ids)
        points = added_points(reader, store.metadata(run_id), ids, np.stack([v for v, _ in adds.values()]),
                              [m for _, m in adds.values()])
    finally:
        reader.release()
    return store.add_items(run_id, points, replaces)


def _nearest(vectors: dict[str, np.ndarray], query: np.ndarray, k: int, keep=lambda i: True) -> list[str]:
    return sorted((i for i in vectors if keep(i)), key=lambda i: -float(vectors[i] @ query))[:k]


@pytest.mark.parametrize("hot_after,post_excluded", [(1, 200), (10**9, 200), (10**9, 0)])
def test_added_items_are_searchable_at_once_and_a_changed_item_replaces_its_old_point(store, hot_after, post_excluded,
                                                                                      monkeypatch):
    """hot_after 1: every filter's items held at once (filter_subsets.py), or never; post_excluded 0: the
    replaced items' old points left out in the engine's filter, not dropped after it (shard_search.py)."""
    from recommend.serving import filter_subsets, shard_search

    monkeypatch.setattr(filter_subsets, "HOT_AFTER", hot_after)
    monkeypatch.setattr(shard_search, "POST_EXCLUDED", post_excluded)
    monkeypatch.setattr(filter_subsets, "IN_BACKGROUND", False)
    _publish(store, V0, 1)
    items = _publish(store, V1, 2)
    rec = Recommender(LiveVersion(store, poll_s=0), k=K)
    before = rec.similar("i5")  # a reader opened before the addition follows it at its next query
    rng = np.random.default_rng(9)
    new, changed = _unit(rng.normal(size=DIM)), _unit(rng.normal(size=DIM))
    assert _add(store, V1, {"n1": (new, {"category": "boots", "price": 12.5}),
                            "i5": (changed, {"category": "boots", "price": 99.0})}) == 2

    text = {f"i{i}": items["vectors"]["text"][i] for i in range(N_ITEMS)} | {"n1": new, "i5": changed}
    snap = rec.live.current()
    for query in (new, changed, new + 0.5 * changed):
        got = text_answer(snap, query, "q", K)
        assert [r.item_id for r in got.items] == _nearest(text, query, K)  # i5 once, at its new text
    boots = Where.build({"category": "boots"}, fields=FIELDS)
    got = text_answer(snap, new, "q", K, boots)
    assert [r.item_id for r in got.items] == ["n1", "i5"] and got.items[0].metadata == {"category": "boots", "price": 12.5}
    cheap = Where.build({"price": {"lt": 13}}, fields=FIELDS)
    assert [r.item_id for r in text_answer(snap, new, "q", K, cheap).items] == _nearest(
        text, new, K, lambda i: (12.5 if i == "n1" else 99.0 if i == "i5" else float(i[1:])) < 13)

    # the changed item keeps its list (until the night) with its new metadata
    assert [r.item_id for r in rec.similar("i5").items] == [r.item_id for r in before.items]
    listed = rec.for_user("u0", where={"category": "boots"})  # a user's fill asks the blended vectors:
    assert [r.item_id for r in listed.items] == ["i5"]         # i5 has them (kept), n1 has none yet
    assert rec.for_user("u1").items[0].metadata  # plain lists unchanged
    # an added item's similar items: its text's nearest, itself left out
    got = rec.similar("n1")
    assert got.source == "query" and [r.item_id for r in got.items] == _nearest(text, new, K, lambda i: i != "n1")

    found = {v.run_id: v for v in store.versions()}
    assert found[V1].added == 2 and found[V0].added == 0 and found[V1].to_dict()["added_items"] == 2
    assert store.verify(V1, deep=True) is None
    reader = store.open(V1)
    try:
        assert reader.count("item") == N_ITEMS + 1
        # the changed item keeps the blended vectors the night made; the new one has none yet
        _, rows = reader.vectors(["i5", "n1"], "blend")
        assert len(rows) == 1 and np.allclose(rows[0], items["vectors"]["blend"][5])
    finally:
        reader.release()

    # a second addition: one more, and n1 again with another price (still one n1)
    assert _add(store, V1, {"n2": (changed, {"category": "hats", "price": 1.0}),
                            "n1": (new, {"category": "boots", "price": 5.0})}) == 3
    got = text_answer(rec.live.current(), new, "q", 50, boots)
    assert [r.item_id for r in got.items] == ["n1", "i5"] and got.items[0].metadata["price"] == 5.0
    assert store.verify(V1, deep=True) is None

    # a rollback leaves them behind with their version
    store.rollback()
    snap = rec.live.current()
    assert snap.run_id == V0
    assert "n1" not in [r.item_id for r in text_answer(snap, new, "q", 50).items]
    with pytest.raises(NotFound):
        rec.similar("n1")


def test_an_added_shard_is_checked_and_what_a_crashed_addition_left_is_removed(tmp_path):
    store = EmbeddedVersions(tmp_path / "store", "t")
    _publish(store, V1, 2)
    vector = _unit(np.ones(DIM))
    _add(store, V1, {"n1": (vector, {"category": "boots", "price": 1.0})})
    folder = store.folder / V1
    stray = folder / "added-0009"  # a crashed addition's shard, never named by added.json
    stray.mkdir()
    _add(store, V1, {"n2": (vector, {"category": "boots", "price": 2.0})})
    assert not stray.exists() and sorted(p.name for p in folder.glob("added-*")) == ["added-0002"]

    page = next(p for p in (folder / "added-0002").rglob("*") if p.is_file() and p.stat().st_size > 0)
    with open(page, "r+b") as f:
        f.truncate(page.stat().st_size - 1)
    problem = store.verify(V1)
    assert problem and str(page) in problem
    from recommend.serving.store import DamagedVersion

    with pytest.raises(DamagedVersion, match="added-0002"):
        store.open(V1)
    (folder / "added.json").write_text("{not json")  # a damaged list of today's items
    assert [v.added for v in store.versions()] == [0]  # the versions are still listed
    assert "added.json is damaged" in store.verify(V1)
    with pytest.raises(DamagedVersion, match="added.json"):
        store.open(V1)


def test_a_users_list_never_names_an_item_added_today(store):
    _publish(store, V1, 2)
    rec = Recommender(LiveVersion(store, poll_s=0), k=K)
    rng = np.random.default_rng(4)
    _add(store, V1, {f"n{j}": (_unit(rng.normal(size=DIM)), {"category": "shoes", "price": 1.0}) for j in range(10)})
    for u in ("u0", "u1"):
        got = rec.for_user(u, k=30, where={"category": "shoes"})
        assert got.items and not [r for r in got.items if r.item_id.startswith("n")]
        stored, _, _ = parse_list(_version(2)[1]["payloads"][int(u[1:])], "recommended")
        assert [r.item_id for r in rec.for_user(u).items] == [i for i, _ in stored][:K]
