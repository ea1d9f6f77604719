"""The publish's points made a lists part at a time (recommend/run/tasks/publish_tasks.py), checked by
rereading Qdrant: every point's vectors and payload against the files the lists stage wrote, whether
the driver streams the parts (local mode) or tasks upload them from a worker. No Qdrant server runs
here: the workers' uploads are checked against a local-mode folder through one worker, and a worker
that cannot reach its server fails the publish without a trace."""

from types import SimpleNamespace

import numpy as np
import pandas as pd
import pyarrow as pa
import pytest
from qdrant_client import QdrantClient, models

from embedder.artifacts import vectors_to_arrow, write_parquet
from index.build import build_index, save_index
from index.rows import parquet_rows
from recommend.run.tasks.item_tasks import save_item_side
from recommend.run.tasks.list_tasks import ListJob, list_blocks
from recommend.run.tasks.publish_tasks import PointSource, Target, collection_points, vector_sizes
from recommend.serving.payloads import parse_list, payload_list
from recommend.serving.publish import (BLEND_QUERY_VECTOR, BLEND_VECTOR, ITEM_VECTOR, USER_VECTOR, Storage, collection,
                                       publish_version, stage_version)
from recommend.serving.store import StoreUnavailable, open_local
from recommend.serving.versions import ServerVersions
from run_helpers import blocks_in
from test_list_tasks import _space

RUN = "20260101T000000-aaaa"


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A run folder as the index stage leaves it: item side, index, embeddings and the lists' parts
    (blocks of 64 items; the users' 3 event blocks), with the space they were computed from."""
    space, item_ids, user_ids, blocks, settings = _space(tmp_path_factory.mktemp("events"))
    blocks = blocks_in(blocks, tmp_path_factory.mktemp("run"))
    folder = blocks.run
    item_ids = np.asarray(item_ids, dtype=object)
    save_index(build_index(space.item_docs, "exact"), folder.index)
    save_item_side(folder, space.items, item_ids)
    write_parquet(pa.table({"item_id": item_ids.tolist(), "vector": vectors_to_arrow(space.items.text)}),
                  folder.embeddings)
    parts = list_blocks(None, len(item_ids), blocks, settings, ListJob(10, new_slots=1), sample=np.arange(3),
                        block_size=64)
    source = PointSource(folder, parquet_rows(folder.embeddings))
    metadata = {"title": pd.Series([f"title {i}" for i in item_ids]), "price": np.arange(len(item_ids)) / 4}
    return space, item_ids, user_ids, parts, source, metadata


def _points(client, run, target=Target(batch_size=50), dask=None):
    space, item_ids, user_ids, parts, source, metadata = run
    sizes = vector_sizes(space.items.layout, space.items.text.shape[1])
    return [collection_points(dask, source, parts, kind, metadata, sizes[kind], target)
            for kind in ("item", "user")]


def _reread(client, name):
    points, _ = client.scroll(name, limit=100_000, with_payload=True, with_vectors=True)
    return {p.payload.get("item_id", p.payload.get("user_id")): p for p in points}


def _check_against_the_run(client, run, reread=None):
    """Every point reread from Qdrant equals the run's files: the lists (lists.parquet), the item
    side's vectors, the text vectors and the users' vectors. `reread`: (items, users) already reread."""
    space, item_ids, user_ids, parts, source, metadata = run
    lists = pd.read_parquet(source.run.lists)
    items, users = reread or (_reread(client, collection("t", "items", RUN)), _reread(client, collection("t", "users", RUN)))
    assert sorted(items) == sorted(item_ids) and sorted(users) == sorted(user_ids)
    for kind, points, key, field in (("item", items, "item_id", "similar"), ("user", users, "user_id", "recommended")):
        for subject, rows in lists[lists.subject_kind == kind].groupby("subject_id"):
            payload = points[subject].payload
            listed, made_by = payload_list(payload, field)
            assert [i for i, _ in listed] == rows["item_id"].tolist()
            np.testing.assert_allclose([s for _, s in listed], rows["score"], atol=1e-5)
            assert made_by == rows["source"].iloc[0]
    rows = np.array([list(item_ids).index(i) for i in items])
    got = {name: np.array([items[i].vector[name] for i in items]) for name in (ITEM_VECTOR, BLEND_VECTOR, BLEND_QUERY_VECTOR)}
    np.testing.assert_allclose(got[ITEM_VECTOR], space.items.text[rows], atol=1e-6)
    np.testing.assert_allclose(got[BLEND_VECTOR], space.item_docs[rows], atol=1e-6)
    np.testing.assert_allclose(got[BLEND_QUERY_VECTOR], space.items.raw_queries()[rows], atol=1e-6)
    assert [items[i].payload["title"] for i in items] == [f"title {i}" for i in items]
    assert [items[i].payload["price"] for i in items] == (rows / 4).tolist()
    user_rows = np.array([user_ids.index(u) for u in users])
    np.testing.assert_allclose(np.array([users[u].vector[USER_VECTOR] for u in users]), space.users[user_rows], atol=1e-6)
    for u, row in zip(users, user_rows):  # each user's seen items, for a filled list to leave out
        listed, _, seen = parse_list(users[u].payload, "recommended")
        assert sorted(seen) == sorted(item_ids[space.seen[row].indices]) and not set(seen) & {i for i, _ in listed}
    assert len(parse_list(users["u000"].payload, "recommended")[2]) == len(item_ids) - 3


def test_the_driver_streams_each_part_into_local_mode_and_the_reread_equals_the_run(tmp_path, run):
    client = open_local(tmp_path / "store")
    counts = stage_version(client, "t", RUN, *_points(client, run), metadata={})
    assert counts == {"items": 400, "users": 150}
    _check_against_the_run(client, run)
    client.close()


def test_tasks_on_a_worker_upload_the_same_points(tmp_path, run):
    """The server path's tasks, run on a Dask worker: the worker opens its own connection (here a
    local-mode folder, which takes one writer: a cluster of one single-threaded worker, while the
    driver's client is closed) and uploads its parts; the reread equals the run as above."""
    from dask.utils import key_split
    from distributed import Client, LocalCluster, get_task_stream

    folder = tmp_path / "store"
    client = open_local(folder)
    sizes = vector_sizes(run[0].items.layout, run[0].items.text.shape[1])
    for kind in ("items", "users"):
        client.create_collection(collection("t", kind, RUN), vectors_config={
            n: models.VectorParams(size=s, distance=models.Distance.DOT) for n, s in sizes[kind[:-1]].items()})
    client.close()
    ticks = []
    with LocalCluster(n_workers=1, threads_per_worker=1, processes=True, dashboard_address=":0",
                      silence_logs=40) as cluster, Client(cluster) as dask, get_task_stream(dask) as stream:
        items, users = _points(None, run, Target(path=str(folder), batch_size=50), dask)
        items.load(None, collection("t", "items", RUN), ticks.append)
        users.load(None, collection("t", "users", RUN), ticks.append)
    ran = sorted(key_split(t["key"]) for t in stream.data)
    assert ran == ["upload-part-item"] * 7 + ["upload-part-user"] * 3  # one task per part, all on the worker
    assert sorted(ticks) == sorted([64] * 6 + [16] + [p.subjects for p in run[3] if p.kind == "user"])
    assert (items.count, users.count) == (400, 150)
    client = QdrantClient(path=str(folder))
    _check_against_the_run(client, run)
    client.close()


def test_the_embedded_stores_shards_are_written_by_tasks_on_the_workers_each_user_where_its_hash_routes(
        tmp_path, run, dask_client):
    """The default publish: one task per shard on the workers (two item shards from runs of item
    parts, two user shards from the event blocks overlapping their hash ranges); every user lies in
    the shard its hash routes to, and the reread, shard by shard, equals the run."""
    from dask.utils import key_split
    from distributed import get_task_stream
    from qdrant_edge import ScrollRequest

    from recommend.serving.shards import user_shard
    from recommend.serving.versions import EmbeddedVersions

    store, ticks = EmbeddedVersions(tmp_path / "store", "t"), []
    with get_task_stream(dask_client) as stream:
        done = publish_version(store, RUN, *_points(None, run, dask=dask_client), metadata={}, progress=ticks.append,
                               dask=dask_client)
    assert done.counts == {"items": 400, "users": 150} and sum(ticks) == 950  # items twice: their text shards too
    tasks = [(key_split(t["key"]), t["worker"]) for t in stream.data]
    assert sorted(k for k, _ in tasks) == ["write-shard-items"] * 2 + ["write-shard-texts"] * 2 + ["write-shard-users"] * 2
    assert len({w for _, w in tasks}) == 2  # side by side, on both workers
    reader = store.open(RUN)
    try:
        def scrolled(engine):
            return {r.payload.get("item_id", r.payload.get("user_id")): r
                    for r in engine.scroll(ScrollRequest(limit=100_000, with_payload=True, with_vector=True))[0]}

        shards = [scrolled(e) for e in reader.users]
        for s, found in enumerate(shards):
            assert found and (user_shard(list(found), 2) == s).all()
        texts = [scrolled(e) for e in reader.texts]  # the text vectors: in shards of their own, by the item id's hash
        for s, found in enumerate(texts):
            assert found and (user_shard(list(found), 2) == s).all()
            assert all("similar" not in r.payload and r.payload["title"] == f"title {i}" for i, r in found.items())
        text = {k: v for found in texts for k, v in found.items()}
        items = {k: SimpleNamespace(payload=v.payload, vector={**v.vector, **text[k].vector})
                 for e in reader.items for k, v in scrolled(e).items()}
        _check_against_the_run(None, run, (items, {k: v for found in shards for k, v in found.items()}))
        assert all(reader.payload("user", u)["user_id"] == u for u in run[2])  # routed by hash, found in one shard
    finally:
        reader.close()


def test_a_worker_that_cannot_reach_the_server_fails_the_publish_and_leaves_nothing(run, dask_client):
    """The driver's store answers (the server code path on in-memory mode), the workers' target does
    not: the publish fails with the workers' error naming the URL, the new version's collections are
    removed and the live version stays live."""
    store = ServerVersions(QdrantClient(":memory:"), "t")
    dead = Target(url="http://127.0.0.1:9", batch_size=50)
    with pytest.raises(StoreUnavailable, match=r"127\.0\.0\.1:9"):
        publish_version(store, RUN, *_points(None, run, dead, dask_client), metadata={})
    assert store.live() is None and store.versions() == [] and store.incomplete() == []
    assert not store.client.collection_exists(collection("t", "items", RUN))


def test_storage_options_reach_the_collections(run):
    """publish.vectors_on_disk is in the collections' config as Qdrant reports it, on every named vector."""
    client = QdrantClient(":memory:")
    stage_version(client, "t", RUN, *_points(client, run), metadata={},
                  storage=Storage(shards=2, replicas=1, vectors_on_disk=True, payload_on_disk=True))
    for kind, names in (("items", (ITEM_VECTOR, BLEND_VECTOR, BLEND_QUERY_VECTOR)), ("users", (USER_VECTOR,))):
        vectors = client.get_collection(collection("t", kind, RUN)).config.params.vectors
        assert sorted(vectors) == sorted(names) and all(vectors[n].on_disk is True for n in names)


def test_preflight_stops_a_run_whose_workers_cannot_reach_the_server(tmp_path, dask_client):
    """Workers that will upload the publish are asked first whether the server answers them: each
    one unreachable is named, with the URL, before any work (exit code 2)."""
    from recommend.run.infra.preflight import PreflightFailed, preflight

    common = {"sources": {}, "cache_root": str(tmp_path / "cache"), "model": "stand-in:hashing-384"}
    assert preflight(dask_client, **common)["problems"] == []  # the same workers, no server asked
    with pytest.raises(PreflightFailed, match=r"worker tcp://.*publish\.url: Qdrant at http://127\.0\.0\.1:9 unreachable") as err:
        preflight(dask_client, **common, qdrant=("http://127.0.0.1:9", "QDRANT_API_KEY"))
    assert str(err.value).count("publish.url") == len(dask_client.scheduler_info()["workers"]) and err.value.exit_code == 2
    (tmp_path / "afile").write_text("")  # a store folder the workers cannot make (even as root): named before any work
    with pytest.raises(PreflightFailed, match=r"publish \(the embedded store\): cannot write and read back .*afile/store"):
        preflight(dask_client, **common, store=str(tmp_path / "afile" / "store"))
    assert preflight(dask_client, **common, store=str(tmp_path / "store"))["problems"] == []
