"""The lists stage's blocks on the Dask workers (recommend/run/tasks/list_tasks.py) against the oracle: the
same lists computed for every row at once in this process (`similar_items`, `recommended_items`), from
the same events whole (`build_space`) instead of from their user blocks (embedder/event_blocks.py)."""

import numpy as np
import pandas as pd
import pytest

from embedder.event_blocks import blocks_from_frame, read_user_ids
from embedder.run_folder import RunFolder
from index.build import build_index, save_index
from index.search import HEAVY, sample_rows
from index.tune import set_depth
from recommend.ranking.blend import build_space
from recommend.ranking.lists import Candidates, labels, lists_frame, recommended_items, similar_items
from recommend.ranking.settings import BlendSettings, RankingSettings
from recommend.run.tasks.item_tasks import save_item_side
from recommend.run.tasks.list_tasks import ListJob, list_blocks
from run_helpers import blocks_in

K = 10


def _space(folder, n_items=400, n_users=150, seed=0):
    """Events in 8 topics, 3 or 6 items per user (few or enough events); items 380.. have no events
    (placed by text); one user has seen all but 3
    items (short of K, topped up), one more than HEAVY (searched exactly), three have no events."""
    rng = np.random.default_rng(seed)
    topic = np.arange(n_items) % 8
    text = rng.normal(size=(8, 24))[topic] + 0.6 * rng.normal(size=(n_items, 24))
    text = (text / np.linalg.norm(text, axis=1, keepdims=True)).astype(np.float32)
    rows = []
    for u in range(n_users - 3):
        liked = rng.choice(np.flatnonzero((topic == u % 8) & (np.arange(n_items) < 380)), 3 if u % 5 else 6, replace=False)
        rows += [(f"u{u:03d}", f"i{i:03d}", rng.integers(0, 30 * 86400), "view") for i in liked]
    rows += [("u000", f"i{i:03d}", 0, "view") for i in range(n_items - 3)]
    rows += [("u001", f"i{i:03d}", 0, "view") for i in range(HEAVY + 20)]
    events = pd.DataFrame(rows, columns=["user_id", "item_id", "ts", "event_type"])
    events["ts"] = pd.to_datetime(events["ts"], unit="s", utc=True)
    item_ids = [f"i{i:03d}" for i in range(n_items)]
    blocks = blocks_from_frame(RunFolder(folder), events, item_ids, block_size=64, extra_users=[f"new{u}" for u in range(3)])
    user_ids = read_user_ids(blocks.run, blocks.n)  # the run's user order: block by block
    settings = RankingSettings(weights={"view": 1.0}, half_life_days=14.0, blend=BlendSettings(new_item_slots=1))
    space = build_space(events, item_ids=item_ids, text=text, user_ids=user_ids, settings=settings)
    return space, item_ids, user_ids, blocks, settings


@pytest.fixture(scope="module")
def space(tmp_path_factory):
    return _space(tmp_path_factory.mktemp("events"))


def _oracle(space, index, item_ids, user_ids, job):
    """Every list at once, in this process: what the driver computed before the blocks."""
    i_scores, i_ids, filled = similar_items(index, space.item_queries, K, space.popularity, item_vectors=space.item_docs)
    i_source = labels(np.where(filled, "similar+popular", np.where(space.warm, "similar", "similar-from-text")))
    candidates = Candidates(space.item_docs, space.popularity, new_items=np.flatnonzero(~space.warm),
                            new_slots=job.new_slots, new_boost=job.new_boost)
    u_scores, u_ids, u_source = recommended_items(index, space.users, space.has_history, space.seen, K, candidates)
    u_source = labels(np.where((u_source == "history") & space.few_events, "few-events", u_source))
    return pd.concat([lists_frame("item", item_ids, i_scores, i_ids, np.asarray(item_ids, dtype=object), i_source),
                      lists_frame("user", user_ids, u_scores, u_ids, np.asarray(item_ids, dtype=object), u_source)],
                     ignore_index=True), i_ids


@pytest.mark.parametrize("kind", ["exact", "HNSW32,SQbf16"])
def test_blocks_on_the_workers_equal_every_list_computed_at_once(tmp_path, space, dask_client, kind):
    """Blocks of 64 rows on the 2 workers (the index loaded there from the run folder, its vectors
    mapped from the file) give the oracle's lists, sources and user vectors; the Parts' counts add up."""
    space, item_ids, user_ids, blocks, settings = space
    blocks = blocks_in(blocks, tmp_path)
    index = build_index(space.item_docs, kind)
    if kind != "exact":
        set_depth(index, 16)  # shallow: the loaded index must search at the depth it was saved with
    save_index(index, blocks.run.index)
    save_item_side(blocks.run, space.items, np.asarray(item_ids, dtype=object))
    job = ListJob(K, new_slots=1, new_boost=1.5)
    sample = sample_rows(len(item_ids), 50, 0)
    parts = list_blocks(dask_client, len(item_ids), blocks, settings, job, sample=sample, block_size=64)
    expected, i_ids = _oracle(space, index, item_ids, user_ids, job)
    got = pd.read_parquet(blocks.run.lists)
    pd.testing.assert_frame_equal(got.drop(columns="score"), expected.drop(columns="score"))
    np.testing.assert_allclose(got["score"], expected["score"], atol=1e-5)  # BLAS on 1 thread or several
    assert {"similar", "similar-from-text", "popular", "few-events", "history", "history+popular",
            "history+new"} <= set(got["source"])

    assert [(p.kind, p.start, p.subjects) for p in parts] == \
        [("item", s, min(64, len(item_ids) - s)) for s in range(0, len(item_ids), 64)] + \
        [("user", int(s), b.users) for s, b in zip(blocks.starts, blocks.summaries)]
    assert blocks.n == 3 and sum(b.users for b in blocks.summaries) == len(user_ids) == 150
    users = got[got.subject_kind == "user"].groupby("subject_id").size().reindex(user_ids, fill_value=0)
    assert sum(p.short_of_k for p in parts) == int((users < K).sum()) == 1  # u000: 3 unseen items left
    np.testing.assert_array_equal(np.concatenate([p.sample_ids for p in parts if p.kind == "item"]), i_ids[sample])
    vectors = [np.load(blocks.run.part_arrays("user", p.block))["vectors"] for p in parts if p.kind == "user"]
    np.testing.assert_allclose(np.concatenate(vectors), space.users[:], atol=1e-6)  # the users' vectors, for the publish


def test_without_a_client_the_blocks_run_here_and_write_the_same(tmp_path, space, dask_client):
    """A notebook (no cluster) gets the same parts as the workers."""
    space, item_ids, user_ids, blocks, settings = space
    here, there = blocks_in(blocks, tmp_path / "here"), blocks_in(blocks, tmp_path / "there")
    for at, client in ((here, None), (there, dask_client)):
        save_index(build_index(space.item_docs, "exact"), at.run.index)
        save_item_side(at.run, space.items, np.asarray(item_ids, dtype=object))
        list_blocks(client, len(item_ids), at, settings, ListJob(K), sample=np.arange(3), block_size=100)
    a, b = pd.read_parquet(here.run.lists), pd.read_parquet(there.run.lists)
    pd.testing.assert_frame_equal(a.drop(columns="score"), b.drop(columns="score"))
    assert sorted(p.name for p in here.run.lists.iterdir()) == sorted(p.name for p in there.run.lists.iterdir())


def test_a_failing_block_fails_the_call_and_names_the_cause(tmp_path, space, dask_client):
    """A block that cannot run (here: the index file is missing, as on a worker that cannot see the
    run folder) raises in the driver with the worker's error, not a silent short list."""
    space, item_ids, user_ids, blocks, settings = space
    blocks = blocks_in(blocks, tmp_path)
    save_item_side(blocks.run, space.items, np.asarray(item_ids, dtype=object))
    with pytest.raises(RuntimeError, match="index.faiss"):
        list_blocks(dask_client, len(item_ids), blocks, settings, ListJob(K), sample=np.arange(3))


def test_lists_kept_longer_than_k_begin_with_the_k_lists(tmp_path, space):
    """lists.keep: each list is searched and stored 25 deep; its first K entries are the K lists
    (a query answers K by default), and the Parts' counts still speak of K."""
    space, item_ids, user_ids, blocks, settings = space
    index = build_index(space.item_docs, "exact")
    got = {}
    for keep in (None, 25):
        at = blocks_in(blocks, tmp_path / f"keep-{keep}")
        save_index(index, at.run.index)
        save_item_side(at.run, space.items, np.asarray(item_ids, dtype=object))
        parts = list_blocks(None, len(item_ids), at, settings, ListJob(K, new_slots=1, new_boost=1.5, keep=keep),
                            sample=np.arange(3), block_size=100)
        got[keep] = (pd.read_parquet(at.run.lists), parts)
    (short, short_parts), (long, long_parts) = got[None], got[25]
    head = long[long["rank"] <= K].reset_index(drop=True)
    pd.testing.assert_frame_equal(head.drop(columns=["score", "source"]), short.drop(columns=["score", "source"]))
    np.testing.assert_allclose(head["score"], short["score"], atol=1e-5)
    sizes = long.groupby(["subject_kind", "subject_id"]).size()
    assert sizes.max() == 25 and (sizes == 25).mean() > 0.95  # u000 has 3 unseen items left
    assert [p.short_of_k for p in long_parts] == [p.short_of_k for p in short_parts]
    assert [p.new_items_listed for p in long_parts] == [p.new_items_listed for p in short_parts]
    for a, b in zip(long_parts, short_parts):
        if a.kind == "item":
            np.testing.assert_array_equal(a.sample_ids, b.sample_ids)


def test_the_users_recall_is_measured_on_held_out_users_against_exact_search(tmp_path, space):
    """user_search_recall: the users of largest hash (the depth is tuned on those of smallest), their
    seen items excluded, the saved index's answers against exact search. Oracle: the same users'
    rows of the whole space, searched here."""
    from embedder.event_blocks import first_users
    from index.search import exact_search, recall_at_k, search_excluding
    from recommend.run.tasks.item_tasks import user_search_recall

    space, item_ids, user_ids, blocks, settings = space
    blocks = blocks_in(blocks, tmp_path)
    save_item_side(blocks.run, space.items, np.asarray(item_ids, dtype=object))
    held = first_users(blocks.run, blocks.n, 40, largest=True)[0]
    assert not set(held) & set(first_users(blocks.run, blocks.n, 40)[0])
    rows = np.array([user_ids.index(u) for u in held])
    rows = rows[space.has_history[rows]]
    seen = [space.seen[r].indices for r in rows]
    index = build_index(space.item_docs, "IVF8,Flat")
    index.nprobe = 1  # shallow: it misses some
    save_index(index, blocks.run.index)
    got = user_search_recall(None, blocks, 40, K, settings)
    truth = exact_search(space.item_docs, space.users[rows], K, seen)[1]
    want = recall_at_k(search_excluding(index, space.users[rows], K, seen, vectors=space.item_docs)[1], truth)
    assert got.sample == len(rows) and got.recall == round(want, 4) < 1
    save_index(build_index(space.item_docs, "exact"), blocks.run.index)
    assert user_search_recall(None, blocks, 40, K, settings).recall == 1.0
