"""The text graph built after the switch (recommend/serving/text_graph.py): a publish with no graph
live goes live with plain text shards (searched exactly), then gets its graph; readers follow; a
build that dies leaves the version live and sound. The oracle is exact search with numpy over the
version's own input."""

from __future__ import annotations

import json
import shutil

import pytest

import recommend.serving.text_graph as text_graph
from recommend.serving.live import LiveVersion
from recommend.serving.publish import Storage, publish_version
from recommend.serving.shards import Graph, ShardError
from recommend.serving.text_graph import SUFFIX, build_text_graph, pending
from recommend.serving.versions import EmbeddedVersions
from tests.test_text_shards import catalog, changed, exact

V1, V2 = "20260101T000000-000001", "20260102T000000-000001"
STORAGE = Storage(shards=2, graph=Graph(m=16), fields=(("category", "keyword"),))


def publish(store, run_id: str, items: dict, storage: Storage = STORAGE):
    data = {"ids": items["ids"], "vectors": {"text": items["text"], "blend": items["blend"]},
            "payloads": [{"item_id": i, "similar": "", "category": c} for i, c in zip(items["ids"], items["category"])]}
    users = {"ids": ["u0"], "vectors": {"profile": items["blend"][:1]}, "payloads": [{"user_id": "u0"}]}
    return publish_version(store, run_id, data, users, metadata={"run_id": run_id}, storage=storage)


def marker(store, run_id: str) -> dict:
    return json.loads((store.folder / run_id / "version.json").read_text())


def has_int8_graph(folder) -> bool:
    """Whether a shard folder holds the engine's int8 copies, which it builds with a graph only."""
    return any(p.name == "quantized.data" for p in folder.rglob("*"))


def searches_exactly(reader, items: dict, queries) -> bool:
    return all([p["item_id"] for p, _ in reader.search(q, "text", 10)] == exact(items, q, 10) for q in queries)


def test_a_first_publish_goes_live_before_its_graph_and_readers_follow_it_once_built(tmp_path):
    store, items = EmbeddedVersions(tmp_path / "store", "t"), catalog(800)
    done = publish(store, V1, items)
    plain = marker(store, V1)
    assert done.graph_pending and store.live() == V1
    assert pending(plain)["graph"] == [16, 64] and plain["texts"]["settings"]["graph"][0] == 0
    assert not any(has_int8_graph(store.folder / V1 / n) for n in plain["shards"])

    live = LiveVersion(store, poll_s=0, warm=True)
    before = live.current()
    assert searches_exactly(before.reader, items, items["text"][:15])  # an exact scan meanwhile

    built = build_text_graph(store, V1)
    graphed = marker(store, V1)
    assert sorted(built) == ["texts-000", "texts-001"] and pending(graphed) is None
    assert graphed["texts"]["settings"]["graph"] == [16, 64]
    for name in built:
        assert graphed["shards"][name]["folder"] == name + SUFFIX
        assert has_int8_graph(store.folder / V1 / (name + SUFFIX))
        assert not (store.folder / V1 / name).exists()  # the plain shard went
    assert graphed["shards"]["items-000"] == plain["shards"]["items-000"]  # the others untouched
    assert store.verify(V1, deep=True) is None

    # the reader that opened the plain shards still answers (its own links to their files) ...
    assert searches_exactly(before.reader, items, items["text"][15:20])
    # ... and a reader following the live version opens it again, on the graph
    assert live.poll_once()
    after = live.current()
    assert after.run_id == V1 and after.reader.views["texts-000"].shard.name == "texts-000" + SUFFIX
    assert searches_exactly(after.reader, items, items["text"][:15])
    assert not live.poll_once()  # nothing changed since
    assert build_text_graph(store, V1) == {}  # nothing left to build

    # the next night keeps the graph: carried from the graphed shards, before its switch
    done = publish(store, V2, changed(items))
    nxt = marker(store, V2)
    assert not done.graph_pending and nxt["texts"]["settings"]["graph"] == [16, 64]
    assert all(nxt["shards"][n]["carried"]["from"] == V1 for n in built)
    reader = store.open(V2)
    try:
        assert searches_exactly(reader, changed(items), items["text"][:15])
    finally:
        reader.close()
        del before, after


def test_a_graph_build_that_dies_leaves_the_version_live_and_the_next_publish_builds_it(tmp_path, monkeypatch):
    store, items = EmbeddedVersions(tmp_path / "store", "t"), catalog(600)
    publish(store, V1, items)
    plain = marker(store, V1)
    real = text_graph.graph_text_shard

    def dies_on_the_second(source, folder, spec, graph):
        if folder.endswith("texts-001" + SUFFIX):
            shutil.copytree(source, folder)  # half done: a folder version.json does not name
            raise ShardError("killed mid-build")
        return real(source, folder, spec, graph)

    monkeypatch.setattr(text_graph, "graph_text_shard", dies_on_the_second)
    with pytest.raises(ShardError, match="killed"):
        build_text_graph(store, V1)
    assert marker(store, V1) == plain and store.live() == V1
    assert store.verify(V1, deep=True) is None
    reader = store.open(V1)
    try:
        assert searches_exactly(reader, items, items["text"][:10])
    finally:
        reader.close()

    # the live version has no graph: the next publish goes live without one too, its text shards
    # carried from the plain ones, and its graph is built after
    monkeypatch.setattr(text_graph, "graph_text_shard", real)
    nxt = changed(items)
    assert publish(store, V2, nxt).graph_pending
    assert all(s["carried"]["from"] == V1 for n, s in marker(store, V2)["shards"].items() if n.startswith("texts-"))
    assert sorted(build_text_graph(store, V2)) == ["texts-000", "texts-001"]
    reader = store.open(V2)
    try:
        assert reader.count("text") == len(nxt["ids"]) and searches_exactly(reader, nxt, nxt["text"][:15])
    finally:
        reader.close()


def test_a_damaged_graphed_shard_is_named_and_refused(tmp_path):
    store = EmbeddedVersions(tmp_path / "store", "t")
    publish(store, V1, catalog(400))
    build_text_graph(store, V1)
    data = next(p for p in (store.folder / V1 / ("texts-001" + SUFFIX)).rglob("quantized.data"))
    data.write_bytes(data.read_bytes()[:-8])
    assert str(data) in store.verify(V1)
    with pytest.raises(Exception, match="texts-001.graph"):
        store.open(V1)
