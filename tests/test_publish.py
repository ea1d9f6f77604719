"""Publishing to real Qdrant (the embedded store on Qdrant's engine, and the server code path on
qdrant-client's in-memory mode): readers see the old version until the switch and the new one after
it without reopening, a reread returns what was written, pruning keeps the live and the previous
version, rollback works. The engine store's own guarantees (views, routing, faults): tests/test_store.py."""

import numpy as np
import pytest
from qdrant_client import QdrantClient

from recommend.serving.facade import NotFound, Recommender
from recommend.serving.live import LiveVersion
from recommend.serving.payloads import item_payloads, list_text, list_texts, payload_list, read_list, user_payloads
from recommend.serving.publish import PublishError, Storage, in_process, publish_version, stage_version, write_version
from recommend.serving.versions import EmbeddedVersions, ServerVersions


def _version(n_items=20, n_users=5, seed=0):
    rng = np.random.default_rng(seed)
    vecs = rng.normal(size=(n_items, 8)).astype(np.float32)
    vecs /= np.linalg.norm(vecs, axis=1, keepdims=True)
    item_ids = np.array([f"i{i}" for i in range(n_items)], dtype=object)
    ids = np.array([[(i + j + 1) % n_items for j in range(3)] for i in range(n_items)])
    scores = np.full(ids.shape, 0.5, np.float32)
    u_ids = ids[:n_users]
    items = {"ids": item_ids.tolist(), "vectors": vecs,
             "payloads": item_payloads(item_ids, {"title": [f"title {i}" for i in range(n_items)]}, scores, ids,
                                       ["similar"] * n_items)}
    users = {"ids": [f"u{u}" for u in range(n_users)], "vectors": vecs[:n_users],
             "payloads": user_payloads([f"u{u}" for u in range(n_users)], item_ids, scores[:n_users], u_ids,
                                       ["history"] * n_users)}
    return items, users


def publish(store, run_id, keep=3, **kwargs):
    return publish_version(store, run_id, *_version(**kwargs),
                           metadata={"run_id": run_id, "created_at": "2026-01-01T00:00:00+00:00"}, storage=Storage(keep=keep))


@pytest.fixture(params=["embedded", "server-code-path"])
def store(request, tmp_path):
    if request.param == "embedded":
        return EmbeddedVersions(tmp_path / "store", "t")
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

    items, users = _version(seed=1)
    users["payloads"][1]["recommended"] = '[["i9"],[0.9]]'
    held = live.current()  # a query under way keeps its snapshot across the switch
    result = publish_version(store, "20260102T000000-bbbb", items, users, metadata={"created_at": "2026-01-02T00:00:00+00:00"})
    assert result.previous == "20260101T000000-aaaa"
    answer = rec.for_user("u1")
    assert answer.version == "20260102T000000-bbbb" and [r.item_id for r in answer.items] == ["i9"]
    assert answer.items[0].metadata["title"] == "title 9"
    assert held.run_id == "20260101T000000-aaaa" and held.reader.count("user") == 5  # still answers
    assert [(v.run_id, v.live) for v in store.versions()] == [("20260102T000000-bbbb", True), ("20260101T000000-aaaa", False)]


def test_reread_matches_written_and_rerun_is_idempotent(store):
    run = "20260101T000000-aaaa"
    assert publish(store, run).counts == {"items": 20, "users": 5}
    assert publish(store, run).counts == {"items": 20, "users": 5}
    rec = Recommender(LiveVersion(store))
    items, _ = _version()
    for i in (0, 7, 19):
        got = rec.similar(f"i{i}")
        expected = read_list(items["payloads"][i]["similar"])
        assert [(r.item_id, r.score) for r in got.items] == expected and len(expected) == 3
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


def test_a_version_still_indexing_is_not_published():
    """Fault injected: the server reports the new collection as still optimising (status yellow)."""
    from qdrant_client import models

    store = ServerVersions(QdrantClient(":memory:"), "t")
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
        store.publish(run, lambda c: stage_version(StillIndexing(c), "t", run, *_version(), metadata={},
                                                   storage=Storage(index_wait_s=0.01)), {})
    assert [(v.run_id, v.live) for v in store.versions()] == [("20260101T000000-aaaa", True)]
    assert store.incomplete() == []  # nothing of the failed version is left


def test_a_version_is_invisible_until_its_marker_and_the_next_publish_removes_leftovers(tmp_path):
    store = EmbeddedVersions(tmp_path / "store", "t")
    publish(store, "20260101T000000-aaaa")
    leftover = store.folder / "20260102T000000-bbbb"
    run = leftover.name
    items, users = (in_process(k, p) for k, p in zip(("item", "user"), _version()))
    with pytest.raises(KeyboardInterrupt):  # the process stopped between the shards and the marker
        store.publish(run, lambda folder: (write_version(folder, items, users), _raise())[0], {})
    assert not leftover.exists()  # an orderly failure cleans up after itself
    write_version(leftover, items, users, storage=Storage(shards=2))  # a kill -9 does not: a version's shards without a marker
    assert store.incomplete() == [run] and [v.run_id for v in store.versions()] == ["20260101T000000-aaaa"]
    assert store.live_gate()["run_id"] == "20260101T000000-aaaa"
    with pytest.raises(PublishError, match="unknown version"):
        store.rollback(run)
    result = publish(store, "20260103T000000-cccc")
    assert result.removed_incomplete == [run] and not leftover.exists()


def _raise():
    raise KeyboardInterrupt


def test_a_payload_list_keeps_its_rows_entries_and_source_and_older_forms_still_read():
    item_ids = np.array(["a", "b", "c", "d"], dtype=object)
    ids = np.array([[1, 2, 3], [0, -1, -1], [-1, -1, -1]])
    scores = np.array([[0.9, 0.812345678, 0.5], [0.7, 0.0, 0.0], [0.0, 0.0, 0.0]], np.float32)
    texts = list_texts(item_ids, scores, ids, ["similar", "similar+popular", "popular"])
    assert [payload_list({"similar": t}, "similar") for t in texts] == [
        ([("b", 0.9), ("c", 0.81235), ("d", 0.5)], "similar"), ([("a", 0.7)], "similar+popular"), ([], "popular")]
    assert texts[0] == list_text(["b", "c", "d"], scores[0], "similar")  # one row at a time, the same text
    older = {"recommended": list_text(["b"], [0.5]), "source": "history"}  # the source beside the list
    oldest = {"recommended": [{"item_id": "b", "score": 0.5}], "source": "history"}
    assert payload_list(older, "recommended") == payload_list(oldest, "recommended") == ([("b", 0.5)], "history")
    payloads = user_payloads(["u1", "u2"], item_ids, scores[:2], ids[:2], ["history", "popular"])
    assert payloads[1] == {"user_id": "u2", "recommended": texts[1].replace("similar+popular", "popular")}


def test_shards_are_handed_out_longest_first_a_graph_first_and_a_carried_text_shard_last():
    """The schedule of write_version on workers (one shard per task slot, the next as one ends): the
    text shards building a graph are the long ones and start first; carried from the live version
    they only apply the night's changes and go last; without a graph the item shards lead."""
    from recommend.serving.publish import Points, longest_first, shard_jobs, shard_sizes
    from recommend.serving.shards import Graph

    items = Points({"text": 8, "blend": 4}, 1000, None, [object()] * 4)
    users = Points({"profile": 4}, 1000, None, [object()] * 2)
    jobs = shard_jobs(items, users, 2)
    sizes = shard_sizes(items, users, jobs)
    assert sizes == {"items-000": 500, "items-001": 500, "texts-000": 500, "texts-001": 500, "users-000": 500,
                     "users-001": 500}

    def order(graph, carried=frozenset()):
        return [job[0][:-4] for job in longest_first(jobs, sizes, graph, carried)]

    assert order(Graph(m=16)) == ["texts"] * 2 + ["items"] * 2 + ["users"] * 2
    assert order(Graph(m=16), {"texts-000", "texts-001"}) == ["items"] * 2 + ["users"] * 2 + ["texts"] * 2
    assert order(Graph()) == ["items"] * 2 + ["users"] * 2 + ["texts"] * 2
