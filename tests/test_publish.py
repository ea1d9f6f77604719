"""Publishing to real Qdrant (local-mode folders, and the server code path on qdrant-client's in-memory
mode): readers see the old version until the switch and the new one after it without reopening, a
reread returns what was written, pruning keeps the live and the previous version, rollback works."""

import numpy as np
import pytest
from qdrant_client import QdrantClient

from recommend.serving.facade import NotFound, Recommender
from recommend.serving.live import LiveVersion
from recommend.serving.publish import (PublishError, collection, item_payloads, point_id, publish_version, stage_version,
                                       user_payloads)
from recommend.serving.store import load_readonly
from recommend.serving.versions import LocalVersions, ServerVersions


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


def publish(store, run_id, keep=3, **kwargs):
    return publish_version(store, run_id, *_version(run_id, **kwargs),
                           metadata={"run_id": run_id, "created_at": "2026-01-01T00:00:00+00:00"}, keep=keep)


@pytest.fixture(params=["local", "server-code-path"])
def store(request, tmp_path):
    if request.param == "local":
        return LocalVersions(tmp_path / "qdrant", "t")
    return ServerVersions(QdrantClient(":memory:"), "t")


def test_old_version_answers_until_switch_and_readers_follow_without_reopening(store):
    live = LiveVersion(store, poll_s=0)
    rec = Recommender(live)
    with pytest.raises(NotFound, match="nothing published"):
        rec.for_user("u1")
    publish(store, "20260101T000000-aaaa")
    answer = rec.for_user("u1")
    assert answer.version == "20260101T000000-aaaa" and answer.created_at == "2026-01-01T00:00:00+00:00"
    assert answer.age_seconds > 0

    items, users = _version("20260102T000000-bbbb", seed=1)
    users["payloads"][1]["recommended"] = [{"item_id": "i9", "score": 0.9}]
    held = live.current()  # a query under way keeps its snapshot across the switch
    result = publish_version(store, "20260102T000000-bbbb", items, users, metadata={"created_at": "2026-01-02T00:00:00+00:00"})
    assert result.previous == "20260101T000000-aaaa"
    answer = rec.for_user("u1")
    assert answer.version == "20260102T000000-bbbb" and [r.item_id for r in answer.items] == ["i9"]
    assert answer.items[0].metadata["title"] == "title 9"
    assert held.run_id == "20260101T000000-aaaa" and held.client.count(held.users).count == 5  # still answers
    assert [(v.run_id, v.live) for v in store.versions()] == [("20260102T000000-bbbb", True), ("20260101T000000-aaaa", False)]


def test_reread_matches_written_and_rerun_is_idempotent(store):
    run = "20260101T000000-aaaa"
    assert publish(store, run).counts == {"items": 20, "users": 5}
    assert publish(store, run).counts == {"items": 20, "users": 5}
    rec = Recommender(LiveVersion(store))
    items, _ = _version(run)
    for i in (0, 7, 19):
        got = rec.similar(f"i{i}")
        expected = items["payloads"][i]["similar"]
        assert [(r.item_id, r.score) for r in got.items] == [(e["item_id"], e["score"]) for e in expected]
    with pytest.raises(NotFound, match="unknown item 'nope'"):
        rec.similar("nope")
    with pytest.raises(NotFound) as err:  # an id is shown cut short, whatever its length
        rec.similar("x" * 20_000)
    assert len(str(err.value)) < 300 and "20,000 characters" in str(err.value)


def test_prune_keeps_newest_live_and_previous_and_rollback(store):
    runs = [f"2026010{d}T000000-abcd" for d in range(1, 6)]
    for run in runs[:4]:
        publish(store, run, keep=10)
    assert store.rollback() == (runs[3], runs[2], [])
    deleted = store.prune(keep=1, protect={runs[0]})
    assert set(deleted) == {runs[1]}  # runs[2] is live, runs[3] the newest, runs[0] protected
    result = publish(store, runs[4], keep=1)
    assert result.previous == runs[2] and set(result.pruned) == {runs[0], runs[3]}
    assert [v.run_id for v in store.versions()] == [runs[4], runs[2]]  # the one live before the switch is kept
    with pytest.raises(PublishError, match="unknown version 'nope'"):
        store.rollback("nope")
    with pytest.raises(PublishError) as err:
        store.rollback("y" * 20_000)
    assert len(str(err.value)) < 400


def test_a_version_still_indexing_is_not_published(store):
    """Fault injected: the target reports the new collection as still optimising (status yellow)."""
    from qdrant_client import models

    publish(store, "20260101T000000-aaaa")

    class StillIndexing:
        def __init__(self, client):
            self.client = client

        def __getattr__(self, name):
            return getattr(self.client, name)

        def get_collection(self, name):
            info = self.client.get_collection(name)
            return info.model_copy(update={"status": models.CollectionStatus.YELLOW})

    run = "20260102T000000-bbbb"
    with pytest.raises(PublishError, match="not indexed after 0s; not switching"):
        store.publish(run, lambda c: stage_version(StillIndexing(c), "t", run, *_version(run), metadata={},
                                                   index_wait_s=0.01), {})
    assert [(v.run_id, v.live) for v in store.versions()] == [("20260101T000000-aaaa", True)]
    assert store.incomplete() == []  # nothing of the failed version is left


def test_a_version_is_invisible_until_its_marker_and_the_next_publish_removes_leftovers(tmp_path):
    store = LocalVersions(tmp_path / "qdrant", "t")
    publish(store, "20260101T000000-aaaa")
    leftover = store.folder / "20260102T000000-bbbb"
    run = leftover.name
    with pytest.raises(KeyboardInterrupt):  # the process stopped between the load and the marker
        store.publish(run, lambda c: (stage_version(c, "t", run, *_version(run), metadata={}), _raise())[0], {})
    assert not leftover.exists()  # an orderly failure cleans up after itself
    from recommend.serving.store import open_local

    client = open_local(leftover)  # a kill -9 does not: half a version on disk
    stage_version(client, "t", run, *_version(run), metadata={})
    client.close()
    assert store.incomplete() == [run] and [v.run_id for v in store.versions()] == ["20260101T000000-aaaa"]
    assert store.live_gate()["run_id"] == "20260101T000000-aaaa"
    with pytest.raises(PublishError, match="unknown version"):
        store.rollback(run)
    result = publish(store, "20260103T000000-cccc")
    assert result.removed_incomplete == [run] and not leftover.exists()


def _raise():
    raise KeyboardInterrupt


def test_readers_load_a_version_without_writing_to_it_or_taking_its_lock(tmp_path):
    """The reader's view: several readers load one version at once, write nothing into its folder,
    and leave its lock free for anyone; what they loaded stays readable after the folder is deleted."""
    import shutil

    store = LocalVersions(tmp_path / "qdrant", "t")
    publish(store, "20260101T000000-aaaa", n_items=300, n_users=40)
    folder = store.folder / "20260101T000000-aaaa"
    before = {p: (p.stat().st_mtime_ns, p.stat().st_size) for p in folder.rglob("*")}
    readers = [load_readonly(folder) for _ in range(2)]
    writer = QdrantClient(path=str(folder))  # would raise "already accessed" if a reader held the lock
    writer.close()
    assert {p: (p.stat().st_mtime_ns, p.stat().st_size) for p in folder.rglob("*")} == before
    shutil.rmtree(folder)
    name = collection("t", "items", "20260101T000000-aaaa")
    for reader in readers:
        assert reader.count(name).count == 300
        assert reader.retrieve(name, [point_id("item", "i7")])[0].payload["item_id"] == "i7"


def test_a_bulk_load_is_on_disk_and_whole_when_reopened(tmp_path):
    """Local mode loads a version without a disk sync per point (WAL during the load); what a fresh
    client reads back from disk afterwards is exactly what was written, in SQLite's default journal."""
    from recommend.serving.store import _local_sqlite, bulk_load, open_local

    folder, run = tmp_path / "v", "20260101T000000-aaaa"
    client = open_local(folder)
    items, users = _version(run, n_items=300, n_users=40)
    stage_version(client, "t", run, items, users, metadata={})
    name = collection("t", "items", run)
    sqlite = _local_sqlite(client, name)
    assert sqlite is not None, "qdrant-client's local storage moved: bulk_load would fall back to a sync per point"
    with bulk_load(client, name):
        assert sqlite.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    assert sqlite.execute("PRAGMA journal_mode").fetchone()[0] == "delete"
    client.close()

    reread = load_readonly(folder)
    points, _ = reread.scroll(name, limit=1000, with_vectors=True, with_payload=True)
    assert len(points) == 300 and not list(folder.rglob("*-wal"))
    expected = {pid: row for row, pid in enumerate(point_id("item", i) for i in items["ids"])}
    for p in points:
        row = expected[str(p.id)]
        assert p.payload == items["payloads"][row]
        np.testing.assert_allclose(p.vector["text"], items["vectors"][row], rtol=1e-6)


def test_bulk_load_leaves_in_memory_mode_alone_and_quiet(caplog):
    """In-memory local mode has no file to sync: the load runs as is, with no warning about internals."""
    from qdrant_client import models

    from recommend.serving.store import bulk_load

    client = QdrantClient(":memory:")
    client.create_collection("m", vectors_config=models.VectorParams(size=4, distance=models.Distance.DOT))
    with caplog.at_level("WARNING", logger="recs"), bulk_load(client, "m"):
        client.upsert("m", [models.PointStruct(id=1, vector=[1.0, 0.0, 0.0, 0.0])])
    assert client.count("m").count == 1 and not caplog.records
