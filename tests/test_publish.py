"""Publishing to real Qdrant (local mode): the old version answers until the alias switch, a reread
returns what was written, reruns are idempotent, pruning keeps the live version, rollback works."""

import numpy as np
import pytest

from recommend.serving.facade import NotFound, Recommender
from recommend.serving.publish import (PublishError, collection, item_payloads, list_versions, point_id, prune_versions, rollback,
                               stage_version, switch_live, user_payloads)
from recommend.serving.store import open_store


def _version(run_id, n_items=20, n_users=5, seed=0):
    rng = np.random.default_rng(seed)
    vecs = rng.normal(size=(n_items, 8)).astype(np.float32)
    vecs /= np.linalg.norm(vecs, axis=1, keepdims=True)
    item_ids = np.array([f"i{i}" for i in range(n_items)], dtype=object)
    ids = np.array([[(i + j + 1) % n_items for j in range(3)] for i in range(n_items)])
    scores = np.full(ids.shape, 0.5, np.float32)
    u_ids = ids[:n_users]
    items = {"ids": item_ids.tolist(), "vectors": vecs,
             "payloads": item_payloads(item_ids, {"title": [f"title {i}" for i in range(n_items)]}, scores, ids,
                                       run_id, ["similar"] * n_items)}
    users = {"ids": [f"u{u}" for u in range(n_users)], "vectors": vecs[:n_users],
             "payloads": user_payloads([f"u{u}" for u in range(n_users)], item_ids, scores[:n_users], u_ids, run_id,
                                       ["history"] * n_users)}
    return items, users


@pytest.fixture
def store(tmp_path):
    return open_store(None, tmp_path / "qdrant")


def test_old_version_answers_until_switch(store):
    rec = Recommender(store, prefix="t", version_ttl_s=0)
    with pytest.raises(NotFound, match="nothing published"):
        rec.for_user("u1")
    stage_version(store, "t", "20260101T000000-aaaa", *_version("20260101T000000-aaaa"), metadata={})
    switch_live(store, "t", "20260101T000000-aaaa")
    assert rec.for_user("u1").version == "20260101T000000-aaaa"

    items, users = _version("20260102T000000-bbbb", seed=1)
    users["payloads"][1]["recommended"] = [{"item_id": "i9", "score": 0.9}]
    stage_version(store, "t", "20260102T000000-bbbb", items, users, metadata={})
    answer = rec.for_user("u1")  # staged, not live: readers still see the old version
    assert answer.version == "20260101T000000-aaaa" and answer.items[0].item_id != "i9"
    previous = switch_live(store, "t", "20260102T000000-bbbb")
    assert previous == "20260101T000000-aaaa"
    answer = rec.for_user("u1")
    assert answer.version == "20260102T000000-bbbb" and [r.item_id for r in answer.items] == ["i9"]
    assert answer.items[0].metadata["title"] == "title 9"
    assert [v.live for v in list_versions(store, "t")] == [True, False]


def test_reread_matches_written_and_rerun_is_idempotent(store):
    run = "20260101T000000-aaaa"
    items, users = _version(run)
    counts = stage_version(store, "t", run, items, users, metadata={"model": "m"})
    assert counts == {"items": 20, "users": 5}
    stage_version(store, "t", run, items, users, metadata={"model": "m"})
    assert store.count(collection("t", "items", run)).count == 20
    switch_live(store, "t", run)
    rec = Recommender(store, prefix="t")
    for i in (0, 7, 19):
        got = rec.similar(f"i{i}")
        expected = items["payloads"][i]["similar"]
        assert [(r.item_id, r.score) for r in got.items] == [(e["item_id"], e["score"]) for e in expected]
    with pytest.raises(NotFound, match="unknown item 'nope'"):
        rec.similar("nope")


def test_prune_keeps_newest_and_live_and_rollback(store):
    runs = [f"2026010{d}T000000-abcd" for d in range(1, 5)]
    for run in runs:
        stage_version(store, "t", run, *_version(run), metadata={})
        switch_live(store, "t", run)
    assert rollback(store, "t") == (runs[3], runs[2])
    deleted = prune_versions(store, "t", keep=1)
    remaining = [v.run_id for v in list_versions(store, "t")]
    assert runs[2] in remaining  # live, though not the newest
    assert runs[3] in remaining and set(deleted) == {runs[0], runs[1]}
    with pytest.raises(PublishError, match="unknown version 'nope'"):
        rollback(store, "t", "nope")


def test_a_version_still_indexing_is_not_switched_live(store):
    """Fault injected: the target reports the new collection as still optimising (status yellow)."""
    from qdrant_client import models

    stage_version(store, "t", "20260101T000000-aaaa", *_version("20260101T000000-aaaa"), metadata={})
    switch_live(store, "t", "20260101T000000-aaaa")

    class StillIndexing:
        def __init__(self, client):
            self.client = client

        def __getattr__(self, name):
            return getattr(self.client, name)

        def get_collection(self, name):
            info = self.client.get_collection(name)
            return info.model_copy(update={"status": models.CollectionStatus.YELLOW})

    with pytest.raises(PublishError, match="not indexed after 0s; not switching"):
        stage_version(StillIndexing(store), "t", "20260102T000000-bbbb", *_version("20260102T000000-bbbb"),
                      metadata={}, index_wait_s=0.01)
    assert [v.run_id for v in list_versions(store, "t") if v.live] == ["20260101T000000-aaaa"]


def test_a_bulk_load_is_on_disk_and_whole_when_reopened(tmp_path):
    """Local mode loads a version without a disk sync per point (WAL during the load); what a fresh
    client reads back from disk afterwards is exactly what was written, in SQLite's default journal."""
    from recommend.serving.store import _local_sqlite, bulk_load, close_store

    path, run = tmp_path / "qdrant", "20260101T000000-aaaa"
    store = open_store(None, path)
    items, users = _version(run, n_items=300, n_users=40)
    stage_version(store, "t", run, items, users, metadata={})
    name = collection("t", "items", run)
    sqlite = _local_sqlite(store, name)
    assert sqlite is not None, "qdrant-client's local storage moved: bulk_load would fall back to a sync per point"
    with bulk_load(store, name):
        assert sqlite.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    assert sqlite.execute("PRAGMA journal_mode").fetchone()[0] == "delete"
    close_store(None, path)

    reread = open_store(None, path)
    points, _ = reread.scroll(name, limit=1000, with_vectors=True, with_payload=True)
    assert len(points) == 300 and not list(path.rglob("*-wal"))
    expected = {pid: row for row, pid in enumerate(point_id("item", i) for i in items["ids"])}
    for p in points:
        row = expected[str(p.id)]
        assert p.payload == items["payloads"][row]
        np.testing.assert_allclose(p.vector["text"], items["vectors"][row], rtol=1e-6)


def test_bulk_load_leaves_in_memory_mode_alone_and_quiet(caplog):
    """In-memory local mode has no file to sync: the load runs as is, with no warning about internals."""
    from qdrant_client import QdrantClient, models

    from recommend.serving.store import bulk_load

    client = QdrantClient(":memory:")
    client.create_collection("m", vectors_config=models.VectorParams(size=4, distance=models.Distance.DOT))
    with caplog.at_level("WARNING", logger="recs"), bulk_load(client, "m"):
        client.upsert("m", [models.PointStruct(id=1, vector=[1.0, 0.0, 0.0, 0.0])])
    assert client.count("m").count == 1 and not caplog.records
