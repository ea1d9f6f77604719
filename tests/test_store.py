"""The embedded store on Qdrant's engine (recommend/serving/shards.py, embedded.py): readers open a
version through private views that leave the shard's files byte-identical and untouched, any number
of them in several processes at once, beside a writer publishing the next version."""

import os
import subprocess
import sys
from pathlib import Path

from http_helpers import publish_small
from recommend.serving.facade import Recommender
from recommend.serving.live import LiveVersion
from recommend.serving.shards import Graph, shard_files
from recommend.serving.versions import EmbeddedVersions

ROOT = Path(__file__).parent.parent
V1, V2 = "20260101T000000-aaaa", "20260102T000000-bbbb"
READ = """
import sys
from recommend.serving.versions import EmbeddedVersions
reader = EmbeddedVersions(sys.argv[1], "t").open(sys.argv[2])
print(reader.payload("user", "u7")["user_id"], reader.count("item"), flush=True)
sys.stdin.readline()  # hold the view open until told
reader.close()
"""


def _state(folder: Path) -> dict:
    """Every file's bytes digest, size, inode and modification time."""
    return {name: (size, digest, (folder / name).stat().st_ino, (folder / name).stat().st_mtime_ns)
            for name, (size, digest) in shard_files(folder).items()}


def test_readers_in_several_processes_leave_the_shards_untouched_beside_a_writer(tmp_path):
    store = EmbeddedVersions(tmp_path / "store", "t")
    publish_small(store, V1, n_items=300, n_users=200, graph=Graph(m=16))  # the graph and its int8 copies too
    folder = store.folder / V1
    before = {shard.name: _state(shard) for shard in folder.iterdir() if shard.is_dir()}
    assert sorted(before) == ["items-000", "texts-000", "users-000"]

    here = store.open(V1)
    others = [subprocess.Popen([sys.executable, "-c", READ, str(store.root), V1], cwd=ROOT, text=True,
                               env={**os.environ, "PYTHONPATH": str(ROOT)},
                               stdin=subprocess.PIPE, stdout=subprocess.PIPE) for _ in range(2)]
    try:
        for proc in others:  # each opened the version while this process holds it too
            assert proc.stdout.readline().split() == ["u7", "300"]
        publish_small(store, V2, n_items=250, n_users=150, seed=2)  # a writer beside them
        rec = Recommender(LiveVersion(store))
        assert rec.for_user("u7").version == V2
        assert here.count("user") == 200 and here.count("item") == 300  # still reads its own (V2: 150, 250)
        assert len(here.search([1.0] * 8, "text", 5)) == 5  # a vector query reads the int8 copies too
        assert len(list(store.views.iterdir())) == 4  # one private view per reader
    finally:
        for proc in others:
            proc.communicate("\n", timeout=30)
    assert [p.returncode for p in others] == [0, 0]
    assert here.changed() == []
    here.close()
    del rec  # the last holder of V2's snapshot: its reader closes
    after = {shard.name: _state(shard) for shard in folder.iterdir() if shard.is_dir()}
    assert after == before  # same bytes, same inodes, same times: nothing wrote into the shards
    assert not list(store.views.iterdir())  # every view removed when its reader closed
    assert store.verify(V1, deep=True) is None and store.verify(V2, deep=True) is None


def test_a_view_left_by_a_killed_reader_is_removed_by_the_next_open(tmp_path):
    store = EmbeddedVersions(tmp_path / "store", "t")
    publish_small(store, V1)
    proc = subprocess.Popen([sys.executable, "-c", READ, str(store.root), V1], cwd=ROOT, text=True,
                            env={**os.environ, "PYTHONPATH": str(ROOT)}, stdin=subprocess.PIPE, stdout=subprocess.PIPE)
    assert proc.stdout.readline().split()[0] == "u7"
    proc.kill()  # kill -9: no close, its view stays behind
    proc.wait()
    assert len(list(store.views.iterdir())) == 1
    store.open(V1).close()
    assert not list(store.views.iterdir())


def test_point_ids_are_uuid5_of_kind_and_id_as_on_a_server():
    import uuid

    from recommend.serving.version_store import NAMESPACE, point_id

    for kind, business_id in (("user", "U0000042"), ("item", "ü-日本-\x00"), ("item", ""), ("user", "x" * 5000)):
        assert point_id(kind, business_id) == str(uuid.uuid5(NAMESPACE, f"{kind}:{business_id}"))


def test_a_readers_hash_of_one_id_is_the_event_blocks_hash():
    """The reader routes one id in Python, without pandas (embedder/user_hashing.py); it must be the
    hash the writers split users by."""
    import numpy as np

    from embedder.event_blocks import user_hash, user_hash_few

    ids = [f"U{i:07d}" for i in range(500)] + ["ü日本", "", "x" * 300, "1", "None", "a\x00b"]
    ids += ["é" * n for n in range(1, 18)] + ["z" * n for n in range(1, 18)]  # every tail length of SipHash's 8-byte words
    assert (user_hash_few(ids) == user_hash(ids)).all() and user_hash_few(ids).dtype == np.uint64
    import pandas as pd  # and user_hash is pandas' hash of the ids as a Series, missing and mixed ones too

    mixed = np.asarray(ids + [None, float("nan"), 7, pd.NA], dtype=object)
    assert (user_hash(mixed) == pd.util.hash_pandas_object(pd.Series(mixed, dtype=object), index=False).to_numpy()).all()


def test_a_readers_shard_of_one_id_is_the_writers():
    """A reader routes one id to its shard in integers (`shard_of_user`); the writers split users with
    numpy (`user_shard`, `block_of`). They must agree for every id, and at every range's edges."""
    import numpy as np

    from embedder.user_hashing import HASH_SPACE, block_of, block_of_one, bounds
    from recommend.serving.shards import shard_of_user, user_shard

    ids = [f"U{i:07d}" for i in range(3000)] + ["ü日本", "", "x" * 300]
    for shards in (1, 2, 3, 7, 48, 256):
        assert [shard_of_user(i, shards) for i in ids] == user_shard(ids, shards).tolist()
        edges = [int(b) + d for b in bounds(shards) for d in (-1, 0, 1) if 0 <= int(b) + d < HASH_SPACE] + [HASH_SPACE - 1]
        assert [block_of_one(h, shards) for h in edges] == block_of(np.array(edges, np.uint64), shards).tolist()


def test_a_batch_of_users_is_read_from_each_users_shard(tmp_path):
    """A batch routes its ids all at once (pandas' hash from 64 ids on, Python's below): every user is
    found in the shard its id routes to, and the batch answers each as a lookup alone does."""
    from http_helpers import small_version
    from recommend.serving.publish import Storage, publish_version

    store = EmbeddedVersions(tmp_path / "store", "t")
    publish_version(store, V1, *small_version(n_items=300, n_users=300), storage=Storage(shards=3),
                    metadata={"run_id": V1, "created_at": "2026-01-01T00:00:00+00:00"})
    rec = Recommender(LiveVersion(store))
    reader = rec.live.current().reader
    assert reader.user_shards == 3
    for asked in ([f"u{i}" for i in range(0, 300, 7)], [f"u{i}" for i in range(299, -1, -1)]):  # 43 ids, then 300
        assert reader.payloads("user", asked + ["ghost"]) == {u: reader.payload("user", u) for u in asked}
    asked = [f"u{i}" for i in range(0, 300, 3)] + ["ghost", "u3"]
    batch = rec.for_users(asked, k=4)
    assert batch.unknown == ["ghost"] and len(batch.answers) == len(asked)
    for user_id, got in zip(asked, batch.answers):
        if user_id != "ghost":
            alone = rec.for_user(user_id, k=4)
            assert (got.source, got.items) == (alone.source, alone.items) and len(got.items) == 4


def test_text_search_over_the_graph_finds_the_exact_nearest_items(tmp_path):
    """From graph_min_items on, text search walks an HNSW graph over int8 copies of the vectors and
    rescores with the originals: against exact search (the oracle) it must find the same top 10.
    8,000 vectors of 384 dims, enough for the engine to search the graph and not scan."""
    import numpy as np

    from recommend.serving.publish import ITEM_VECTOR, Storage, publish_version
    from recommend.serving.text_graph import build_text_graph

    store = EmbeddedVersions(tmp_path / "store", "t")
    rng = np.random.default_rng(3)
    centers = rng.normal(size=(200, 384)).astype(np.float32)  # topics, as text embeddings have
    vectors = centers[rng.integers(0, 200, 8000)] + 0.6 * rng.normal(size=(8000, 384)).astype(np.float32)
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    ids = [f"i{j}" for j in range(8000)]
    items = {"ids": ids, "vectors": vectors, "payloads": [{"item_id": i} for i in ids]}
    users = {"ids": ["u0"], "vectors": vectors[:1], "payloads": [{"user_id": "u0"}]}
    publish_version(store, V1, items, users, metadata={"run_id": V1}, storage=Storage(graph=Graph(m=16)))
    build_text_graph(store, V1)  # the first version gets its graph after the switch (text_graph.py)
    shard = next((store.folder / V1).glob("texts-000.graph/segments/*/vector_storage-text/quantized.data"))
    assert shard.stat().st_size > 8000 * 384 * 0.9  # the int8 copies were built
    reader = store.open(V1)
    try:
        queries = vectors[rng.choice(len(vectors), 30, replace=False)] + 0.1 * rng.normal(size=(30, 384)).astype(np.float32)
        exact = np.argsort(-(queries @ vectors.T), axis=1)[:, :10]
        found = [[p["item_id"] for p, _ in reader.search(q, ITEM_VECTOR, 10)] for q in queries]
        recall = np.mean([len(set(f) & {f"i{j}" for j in e}) / 10 for f, e in zip(found, exact)])
        assert recall >= 0.97, recall
    finally:
        reader.close()


def _cached(path: Path) -> float:
    """The share of a file's pages in the page cache (mincore over a private map of it)."""
    import ctypes
    import mmap

    size = path.stat().st_size
    with open(path, "rb") as f:
        mapped = mmap.mmap(f.fileno(), size, flags=mmap.MAP_PRIVATE, prot=mmap.PROT_READ | mmap.PROT_WRITE)
    try:
        start = (ctypes.c_char * size).from_buffer(mapped)
        pages = (size + mmap.PAGESIZE - 1) // mmap.PAGESIZE
        vec = (ctypes.c_ubyte * pages)()
        assert ctypes.CDLL(None).mincore(ctypes.c_void_p(ctypes.addressof(start)), ctypes.c_size_t(size), vec) == 0
        del start
        return sum(b & 1 for b in vec) / pages
    finally:
        mapped.close()


QUERY = """
import sys
from recommend.serving.facade import Recommender
from recommend.serving.live import LiveVersion
from recommend.serving.versions import EmbeddedVersions
print(Recommender(LiveVersion(EmbeddedVersions(sys.argv[1], "t"))).for_user("u7").items[0].item_id)
"""


def test_a_server_reads_a_version_in_and_readers_that_end_leave_it_in_the_page_cache(tmp_path):
    """The engine evicts a shard's files from the page cache when it closes them, for every process
    reading them. So a server reads a version's hot files in before serving it (`warm`), and a reader
    whose process ends (a CLI query) leaves them there: only a version replaced is closed."""
    store = EmbeddedVersions(tmp_path / "store", "t")
    publish_small(store, V1, n_items=2000, n_users=2000)
    hot = sorted((store.folder / V1).glob("*/segments/*/payload_storage/page_*.dat"))
    hot += sorted((store.folder / V1).glob("*/segments/*/id_tracker.mappings"))
    assert len(hot) >= 4
    for path in hot:  # out of the page cache, as after a publish
        fd = os.open(path, os.O_RDONLY)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        os.close(fd)
    assert max(_cached(p) for p in hot) < 0.5

    live = LiveVersion(store, warm=True)
    live.current()
    assert min(_cached(p) for p in hot) > 0.99  # read in before the first query (a page may go under pressure)
    for _ in range(2):  # queries from processes that end without closing anything
        done = subprocess.run([sys.executable, "-c", QUERY, str(store.root)], cwd=ROOT, text=True, capture_output=True,
                              env={**os.environ, "PYTHONPATH": str(ROOT)}, timeout=120)
        assert done.returncode == 0 and done.stdout.strip(), done.stderr[-2000:]
    assert min(_cached(p) for p in hot) > 0.99  # still there for the server (closing evicts them all)
    assert len(list(store.views.iterdir())) == 1  # theirs removed; the server's own stays

    publish_small(store, V2, n_items=300, n_users=300, seed=2)
    assert live.poll_once()
    assert [v.name.rsplit("-", 2)[-2:] for v in store.views.iterdir()] == [V2.split("-")]  # V1 replaced: closed


def test_lists_read_each_items_metadata_once_per_version(tmp_path):
    """Lists name the same items over and over: a version's item metadata is read from the store once
    (the snapshot's item cache), and every answer carries the metadata the store holds."""
    store = EmbeddedVersions(tmp_path / "store", "t")
    publish_small(store, V1, n_items=40, n_users=20)
    rec = Recommender(LiveVersion(store))
    reader, asked = rec.live.current().reader, []
    stored = reader.metadata([f"i{i}" for i in range(40)])
    real = reader.metadata
    reader.metadata = lambda ids: asked.extend(ids) or real(ids)  # counts the reads, the store answers
    for u in range(20):
        answer = rec.for_user(f"u{u}", k=5)
        assert [r.item_id for r in answer.items] == [f"i{(u + j + 1) % 40}" for j in range(5)]
        assert all(r.metadata == {"title": stored[r.item_id]["title"]} for r in answer.items)
    for i in range(10):
        assert rec.similar(f"i{i}", k=5).items[0].metadata == {"title": f"title {(i + 1) % 40}"}
    assert sorted(asked) == sorted(set(asked)) and len(asked) == 24  # u0..u19 name i1..i24, each read once


def test_a_shard_stores_the_vectors_given_even_from_an_unaligned_array(tmp_path):
    """An array unpickled from a worker's message can sit unaligned in its buffer; its rows still go
    to the engine (as memoryviews, recommend/serving/shards.py) with their exact values. Oracle: the
    array given, read back by id."""
    import numpy as np
    from qdrant_edge import EdgeShard

    from recommend.serving.shards import VectorSpec, write_shard

    given = np.random.default_rng(0).normal(size=(50, 8)).astype(np.float32)
    unaligned = np.frombuffer(b"\0" + given.tobytes(), dtype=np.float32, offset=1).reshape(50, 8)
    assert not unaligned.flags["ALIGNED"]
    write_shard(tmp_path / "s", {"v": VectorSpec(8)}, [(list(range(1, 51)), {"v": unaligned}, [{}] * 50)])
    shard = EdgeShard.load(str(tmp_path / "s"))
    try:
        got = {p.id: p.vector["v"] for p in shard.retrieve(list(range(1, 51)), True, True)}
    finally:
        shard.close()
    np.testing.assert_array_equal(np.array([got[i] for i in range(1, 51)], dtype=np.float32), given)
