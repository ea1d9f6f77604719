"""The items' text vectors in shards of their own, carried from the live version to the next
(recommend/serving/text_shards.py): what a carried shard holds is what a shard written whole holds.
The oracle is the version's own input and exact search over it with numpy."""

from __future__ import annotations

import json

import numpy as np
import pytest

from recommend.serving.filters import Where
from recommend.serving.publish import Storage, publish_version
from recommend.serving.shards import Graph
from recommend.serving.text_graph import build_text_graph, shard_folder
from recommend.serving.text_shards import keys_path
from recommend.serving.version_store import point_id
from recommend.serving.versions import EmbeddedVersions

V1, V2 = "20260101T000000-000001", "20260102T000000-000001"


def catalog(n: int, seed: int = 0) -> dict:
    """n items with a text vector, a blended vector and a category."""
    rng = np.random.default_rng(seed)
    text = rng.normal(size=(n, 24)).astype(np.float32)
    return {"ids": [f"i{j}" for j in range(n)], "text": text / np.linalg.norm(text, axis=1, keepdims=True),
            "blend": rng.normal(size=(n, 6)).astype(np.float32), "category": [f"c{j % 5}" for j in range(n)]}


def publish(store, run_id: str, items: dict, storage: Storage) -> dict:
    """`items` published as `run_id` (two users beside them), its text graph built after the switch
    when it was left for then (as the refresh's graph stage does); returns the version's marker."""
    data = {"ids": items["ids"], "vectors": {"text": items["text"], "blend": items["blend"]},
            "payloads": [{"item_id": i, "similar": "", "category": c} for i, c in zip(items["ids"], items["category"])]}
    users = {"ids": ["u0", "u1"], "vectors": {"profile": items["blend"][:2]},
             "payloads": [{"user_id": "u0"}, {"user_id": "u1"}]}
    if publish_version(store, run_id, data, users, metadata={"run_id": run_id}, storage=storage).graph_pending:
        build_text_graph(store, run_id)
    return json.loads((store.folder / run_id / "version.json").read_text())


def changed(items: dict) -> dict:
    """The next night's catalog: item 3's text changed, item 5's category changed, item 7 gone, i900 new."""
    nxt = {k: list(v) if isinstance(v, list) else v.copy() for k, v in items.items()}
    nxt["text"][3] = -nxt["text"][3]
    nxt["category"][5] = "c-new"
    keep = [j for j in range(len(nxt["ids"])) if j != 7]
    nxt = {k: ([v[j] for j in keep] if isinstance(v, list) else v[keep]) for k, v in nxt.items()}
    nxt["ids"].append("i900")
    nxt["category"].append("c0")
    nxt["text"] = np.vstack([nxt["text"], items["text"][:1] * 0.5 + items["text"][1:2] * 0.5])
    nxt["blend"] = np.vstack([nxt["blend"], items["blend"][:1]])
    return nxt


def exact(items: dict, query: np.ndarray, k: int) -> list[str]:
    return [items["ids"][j] for j in np.argsort(-(items["text"] @ query), kind="stable")[:k]]


@pytest.mark.parametrize("shards", [1, 2])
def test_a_carried_text_shard_holds_what_a_whole_write_holds(tmp_path, shards):
    storage = Storage(shards=shards, graph=Graph(m=16), fields=(("category", "keyword"),))
    store = EmbeddedVersions(tmp_path / "store", "t")
    night1 = catalog(600)
    publish(store, V1, night1, storage)
    night2 = changed(night1)
    marker = publish(store, V2, night2, storage)

    texts = {n: s for n, s in marker["shards"].items() if n.startswith("texts-")}
    assert len(texts) == shards and all(s["carried"] and s["carried"]["from"] == V1 for s in texts.values())
    # i3's vector and i5's payload changed, i900 is new: three upserted; i7 removed
    assert sum(s["carried"]["upserted"] for s in texts.values()) == 3
    assert sum(s["carried"]["removed"] for s in texts.values()) == 1
    assert store.verify(V2, deep=True) is None and store.verify(V1, deep=True) is None

    reader, before = store.open(V2), store.open(V1)
    try:
        assert reader.count("text") == reader.count("item") == len(night2["ids"])
        pids, rows = reader.vectors(night2["ids"], "text")
        by_point = dict(zip(map(str, pids), rows))
        assert len(by_point) == len(night2["ids"])
        np.testing.assert_allclose(np.asarray([by_point[point_id("item", i)] for i in night2["ids"]], np.float32),
                                   night2["text"], rtol=1e-6)
        assert before.vectors(["i3"], "text")[1][0] == pytest.approx(night1["text"][3].tolist())  # V1 untouched
        for q in (night2["text"][3], night2["text"][-1], night1["text"][7]):
            found = reader.search(q, "text", 10)
            assert [p["item_id"] for p, _ in found] == exact(night2, q, 10)
        where = Where.build({"category": "c-new"}, fields={"category": "keyword"})
        assert [p["item_id"] for p, _ in reader.search(night2["text"][5], "text", 3, where=where)] == ["i5"]
        assert "i7" not in {p["item_id"] for p, _ in reader.search(night1["text"][7], "text", 50)}
    finally:
        reader.close()
        before.close()

    # the same night written whole, in a store of its own: the same answers
    cold = EmbeddedVersions(tmp_path / "cold", "t")
    cold_marker = publish(cold, V2, night2, storage)
    assert all(s["carried"] is None for n, s in cold_marker["shards"].items() if n.startswith("texts-"))
    whole = cold.open(V2)
    try:
        for q in night2["text"][:20]:
            assert [p["item_id"] for p, _ in whole.search(q, "text", 10)] == exact(night2, q, 10)
    finally:
        whole.close()


@pytest.mark.parametrize("other", ["graph", "shards", "keys"])
def test_a_text_shard_is_written_whole_when_the_live_one_differs_or_is_damaged(tmp_path, other):
    store = EmbeddedVersions(tmp_path / "store", "t")
    night1 = catalog(300)
    live = publish(store, V1, night1, Storage(shards=1, graph=Graph(m=16)))
    storage = Storage(shards=2 if other == "shards" else 1, graph=Graph(m=8 if other == "graph" else 16))
    if other == "keys":
        keys_path(store.folder / V1 / shard_folder(live, "texts-000")).write_bytes(b"not the keys")
    marker = publish(store, V2, changed(night1), storage)
    assert all(s["carried"] is None for n, s in marker["shards"].items() if n.startswith("texts-"))
    reader = store.open(V2)
    try:
        q = night1["text"][10]
        assert [p["item_id"] for p, _ in reader.search(q, "text", 5)] == exact(changed(night1), q, 5)
    finally:
        reader.close()
