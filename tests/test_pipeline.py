"""The nightly refresh end to end on real components (tiny model, LocalCluster, faiss, Qdrant local)."""

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from conftest import write_config
from recommend.config import load_config
from recommend.serving.facade import Recommender
from recommend.run.pipeline import refresh

REPORT_KEYS = {"status", "run_id", "run_dir", "items", "events", "users", "embed", "gate", "index",
               "published_version", "previous_version", "seconds"}


@pytest.fixture(scope="module")
def first_run(tmp_path_factory, sample_dir, tiny_model, dask_client):
    folder = tmp_path_factory.mktemp("pipeline")
    # a text graph over the sample's items, built after the switch (the first version: text_graph.py)
    config = load_config(write_config(folder, sample_dir, tiny_model, publish={"graph_min_items": 0}))
    return config, refresh(config, quiet=True, client=dask_client)


def test_report_and_artifacts(first_run):
    config, report = first_run
    assert REPORT_KEYS <= set(report.model_dump()) and report.status == "ok"
    assert set(report.seconds) >= {"ingest", "embed", "index", "publish", "graph", "total"}
    assert report.text_graph == "built"
    version = Path(config.workdir) / "store" / "recs" / "versions" / report.published_version
    marker = json.loads((version / "version.json").read_text())
    assert marker["texts"]["settings"]["graph"][0] == 16 and marker["shards"]["texts-000"]["folder"] == "texts-000.graph"
    assert report.items.rows_read == 240 and report.index.users == 83 and report.index.users_with_history == 80
    assert report.embed.items_encoded + report.embed.items_from_cache == 240
    run = config.workdir + f"/runs/{report.run_id}"
    for name in ("items", "events", "embeddings", "lists", "quarantine"):
        assert pd.read_parquet(f"{run}/{name}.parquet") is not None
    for stage in ("ingest", "embed", "index", "publish"):
        assert json.load(open(f"{run}/manifest-{stage}.json"))["stage"] == stage
    assert json.load(open(f"{run}/report.json")) == json.loads(report.model_dump_json())
    import gc
    assert gc.get_freeze_count() == 0  # the run froze long-lived objects for its collections; it thaws them


def _published_vectors(config, kind, names, ids):
    """Oracle input: the vectors as Qdrant holds them (a reread of the publish)."""
    from recommend.serving.live import LiveVersion
    from recommend.serving.publish import point_id
    from recommend.serving.versions import version_store

    snap = LiveVersion(version_store(config.publish, config.workdir)).current()
    engines = snap.reader.items if kind == "item" else snap.reader.users  # the engine's shards, each read back
    points = [p for e in engines for p in e.retrieve([point_id(kind, i) for i in ids], with_payload=True, with_vector=names)]
    by_id = {p.payload[f"{kind}_id"]: p for p in points}
    return {n: np.array([by_id[i].vector[n] for i in ids], dtype=np.float32) for n in names}


def test_lists_match_exact_search_and_exclude_seen(first_run):
    """Oracle: brute force over the published blended vectors, seen items excluded."""
    from recommend.ranking.blend import Layout, item_queries_from_raw
    from recommend.serving.versions import version_store

    config, report = first_run
    run = config.workdir + f"/runs/{report.run_id}"
    import pyarrow.parquet as pq

    item_ids = np.array(pq.read_table(f"{run}/embeddings.parquet")["item_id"].to_pylist(), dtype=object)
    lists = pd.read_parquet(f"{run}/lists.parquet")
    events = pd.read_parquet(f"{run}/events.parquet")
    k = config.lists.k
    sizes = lists.groupby(["subject_kind", "subject_id"]).size()
    assert (sizes == k).all()  # exactly K for every item and every user
    layout = Layout(**version_store(config.publish, config.workdir).versions()[0].metadata["layout"])
    items = _published_vectors(config, "item", ["blend", "blend_query"], item_ids.tolist())
    queries = item_queries_from_raw(items["blend_query"], layout)

    item_lists = lists[lists.subject_kind == "item"]
    for i in (0, 17, 239):
        sims = items["blend"] @ queries[i]
        sims[i] = -np.inf
        expected = item_ids[np.argsort(-sims, kind="stable")[:k]]
        got = item_lists[item_lists.subject_id == item_ids[i]].sort_values("rank")["item_id"]
        assert list(got) == list(expected)

    user_lists = lists[lists.subject_kind == "user"]
    seen = events.groupby("user_id")["item_id"].apply(set)
    users = [seen.index[0], seen.index[40], seen.index[-1]]
    profiles = _published_vectors(config, "user", ["profile"], users)["profile"]
    new = ~np.isin(item_ids, events["item_id"].unique())  # items with no events: they may earn a place
    boost = config.blend.new_item_boost
    for user, profile in zip(users, profiles):
        sims = items["blend"] @ profile
        sims[np.isin(item_ids, list(seen[user]))] = -np.inf
        ranking = list(np.argsort(-sims, kind="stable")[:k])
        scores = [float(sims[r]) for r in ranking]
        candidates = [j for j in np.argsort(-sims, kind="stable") if new[j] and j not in ranking and np.isfinite(sims[j])]
        if candidates:  # the best new item enters where its boosted score beats the last one, at its rank
            raw = float(sims[candidates[0]])
            boosted = raw * boost if raw > 0 else raw / boost
            if boosted > scores[-1]:
                at = sum(s > boosted for s in scores)
                ranking = ranking[:at] + [candidates[0]] + ranking[at:k - 1]
        got = user_lists[user_lists.subject_id == user].sort_values("rank")["item_id"]
        assert list(got) == list(item_ids[ranking])
    for user, items_seen in seen.items():
        assert not items_seen & set(user_lists[user_lists.subject_id == user]["item_id"])
    new_users = set(user_lists.subject_id) - set(seen.index)
    assert len(new_users) == 3
    assert set(user_lists[user_lists.subject_id.isin(new_users)]["source"]) == {"popular"}


def test_published_version_rereads_as_lists(first_run):
    config, report = first_run
    rec = Recommender.from_config(config)
    lists = pd.read_parquet(config.workdir + f"/runs/{report.run_id}/lists.parquet")
    for user in ("U00000", "U00041", "U00082"):
        answer = rec.for_user(user)
        assert answer.version == report.published_version
        expected = lists[(lists.subject_kind == "user") & (lists.subject_id == user)].sort_values("rank")
        assert [r.item_id for r in answer.items] == expected["item_id"].tolist()
    assert rec.similar("I00003").items[0].metadata["category"]
    found = rec.search("trail running shoes", k=3)
    assert len(found.items) == 3 and found.version == report.published_version


def _copy_sample(sample_dir, data, names):
    """A private copy of sample files, for a test that edits its inputs."""
    data.mkdir()
    for name in names:
        (data / f"{name}.parquet").write_bytes((sample_dir / f"{name}.parquet").read_bytes())
    return data


def test_rerun_encodes_nothing_and_edits_encode_exactly_those(tmp_path, sample_dir, tiny_model, dask_client):
    data = _copy_sample(sample_dir, tmp_path / "data", ("items", "events", "users"))
    config = load_config(write_config(tmp_path, data, tiny_model, publish={"keep_versions": 2}))
    first = refresh(config, quiet=True, client=dask_client)
    second = refresh(config, quiet=True, client=dask_client)
    assert second.embed.items_encoded == 0 and second.embed.items_from_cache == 240
    assert second.previous_version == first.published_version

    items = pd.read_parquet(data / "items.parquet")
    items.loc[:9, "description"] = [f"Completely rewritten description number {i}." for i in range(10)]
    items.to_parquet(data / "items.parquet", index=False)
    third = refresh(config, quiet=True, client=dask_client)
    assert third.embed.items_encoded == 10
    versions = Recommender.from_config(config).versions()
    assert [v.run_id for v in versions] == [third.run_id, second.run_id]  # keep_versions: 2
    assert versions[0].live and not versions[1].live


def test_too_many_bad_rows_stops_before_publishing(tmp_path, sample_dir, tiny_model, dask_client):
    data = _copy_sample(sample_dir, tmp_path / "data", ("items", "users"))
    events = pd.read_parquet(sample_dir / "events.parquet")
    events.to_parquet(data / "events.parquet", index=False)
    config = load_config(write_config(tmp_path, data, tiny_model, events={"path": str(data / "events.parquet"),
                                                                          "max_bad_fraction": 0.02}))
    good = refresh(config, quiet=True, client=dask_client)
    assert good.events.balanced and good.items.balanced

    bad = events.sample(frac=0.05, random_state=0).assign(item_id="not-in-catalog")
    pd.concat([events, bad]).to_parquet(data / "events.parquet", index=False)
    from embedder.errors import BadDataError

    with pytest.raises(BadDataError) as err:
        refresh(config, quiet=True, client=dask_client)
    message = str(err.value)
    total = len(events) + len(bad)
    assert f"events: {len(bad) / total:.1%} of rows quarantined ({len(bad)} of {total})" in message
    assert "above events.max_bad_fraction 0.02; top reasons: unknown_item" in message
    assert "the live version stays live" in message
    assert Recommender.from_config(config).live_version() == good.published_version
    assert not (tmp_path / "work" / "refresh.lock.json").exists()  # the lock was released (its holder note goes with it)


def test_quality_gate_blocks_a_broken_run(tmp_path, sample_dir, tiny_model, dask_client):
    """A run whose events lost their meaning (item ids shuffled across events) is stopped by the gate
    before publishing, with its figures in the message; the good version stays live."""
    from recommend.quality.gate import GateFailed

    data = _copy_sample(sample_dir, tmp_path / "data", ("items", "users", "events"))
    config = load_config(write_config(tmp_path, data, tiny_model, lists={"k": 10}))
    good = refresh(config, quiet=True, client=dask_client)
    assert good.gate.ndcg > good.gate.popularity_ndcg > 0 and not good.gate.problems

    events = pd.read_parquet(sample_dir / "events.parquet")
    rng = np.random.default_rng(0)
    events.assign(item_id=rng.permutation(events["item_id"].to_numpy())).to_parquet(data / "events.parquet", index=False)
    with pytest.raises(GateFailed) as err:
        refresh(config, quiet=True, client=dask_client)
    assert "quality gate: nDCG@10" in str(err.value) and "the live version stays live" in str(err.value)
    assert Recommender.from_config(config).live_version() == good.published_version


def test_http_service_answers_like_the_facade(first_run):
    """`recs serve`'s app over real HTTP (uvicorn): the same lists as the facade, with clear 404 and 400 answers."""
    from http_helpers import ServerThread, get

    from recommend.serving.service import app_from_config

    config, report = first_run
    rec = Recommender.from_config(config)

    def same(body, answer):  # the age moves on between two answers
        return {**body, "age_seconds": 0} == {**answer.to_dict(), "age_seconds": 0}

    with ServerThread(app_from_config(config, encoder=False), config.serve) as server:
        port = server.port
        status, body, _ = get(port, "/health")
        assert status == 200 and body["status"] == "ok" and body["version"] == report.published_version
        status, body, _ = get(port, "/users/U00000?k=3")
        assert status == 200 and same(body, rec.for_user("U00000", 3))
        status, body, _ = get(port, "/items/I00003/similar")
        assert status == 200 and same(body, rec.similar("I00003"))
        status, body, _ = get(port, "/users/nobody?recent=I00001,I00002")
        assert status == 200 and same(body, rec.for_user("nobody", recent_items=["I00001", "I00002"]))
        status, body, _ = get(port, "/users/nobody")
        assert status == 404 and "unknown user 'nobody'" in body["error"] and body["version"] == report.published_version
        assert get(port, "/users/U00000?k=zero")[:2] == (400, {"error": "k: Input should be a valid integer, unable to "
                                                                        "parse string as an integer"})
        assert get(port, "/nowhere")[0] == 404
        assert get(port, "/versions")[1][0]["run_id"] == report.published_version


def test_freed_memory_goes_back_to_the_os_between_stages():
    """Many small freed blocks below a live one stay resident until trimmed (ingest's per-row values)."""
    import psutil

    from recommend.run.infra.memory import release_freed_memory

    me = psutil.Process()
    dropped = [np.ones(100) for _ in range(300_000)]  # ~250 MB in 300k heap blocks
    kept = [np.ones(100) for _ in range(1000)]  # allocated after them: the heap's top stays in use
    del dropped
    before = me.memory_info().rss
    if not release_freed_memory():
        pytest.skip("no malloc_trim here (not glibc)")
    assert before - me.memory_info().rss > 100 * 2**20
    assert len(kept) == 1000


def test_arrow_memory_freed_in_other_threads_goes_back_to_the_os():
    """Arrow's pool (mimalloc) keeps what other threads allocated and freed (at 1M items the driver
    held 550 MB of it after the embed stage); the trim between stages asks the pool to return it."""
    from concurrent.futures import ThreadPoolExecutor

    import psutil
    import pyarrow as pa
    import pyarrow.compute as pc

    from recommend.run.infra.memory import release_freed_memory

    me = psutil.Process()
    release_freed_memory()
    start = me.memory_info().rss
    base = pa.array(np.arange(200_000, dtype=np.int64))
    with ThreadPoolExecutor(4) as pool:  # allocated by Arrow in other threads, as Dask's and Parquet's are
        arrays = list(pool.map(lambda _: [pc.add(base, j) for j in range(10)], range(20)))  # 200 x 1.6 MB
    grown = me.memory_info().rss - start
    del arrays
    if not release_freed_memory():
        pytest.skip("no malloc_trim here (not glibc)")
    assert grown > 250 * 2**20 and me.memory_info().rss - start < 100 * 2**20, pa.default_memory_pool().backend_name


def test_survivors_are_frozen_within_a_run_and_thawed_after():
    """Collections in a run skip what earlier ones kept (a full walk was 0.36 s each); a cycle dropped
    after a freeze is still collected, and leaving the run unfreezes everything."""
    import gc
    import weakref

    from recommend.run.infra.memory import release_freed_memory, survivors_frozen

    class Node:
        pass

    with survivors_frozen():
        release_freed_memory()
        assert gc.get_freeze_count() > 0
        node = Node()
        node.self = node  # a reference cycle: only the collector frees it
        alive = weakref.ref(node)
        del node
        release_freed_memory()
        assert alive() is None
    assert gc.get_freeze_count() == 0


def test_empty_sources_stop_the_run_and_an_unjudged_run_does_not_replace_a_judged_one(tmp_path, sample_dir, tiny_model,
                                                                                      dask_client):
    from embedder.errors import InputError
    from recommend.quality.gate import GateFailed

    data = _copy_sample(sample_dir, tmp_path / "data", ("items", "users", "events"))
    config = load_config(write_config(tmp_path, data, tiny_model))
    good = refresh(config, quiet=True, client=dask_client)
    events = pd.read_parquet(sample_dir / "events.parquet")

    events.head(0).to_parquet(data / "events.parquet", index=False)  # the columns, no rows
    with pytest.raises(InputError, match=f"events.path: {data / 'events.parquet'} holds no data rows") as err:
        refresh(config, quiet=True, client=dask_client)
    assert err.value.exit_code == 2
    (data / "items.csv").write_text("item_id,title,description,category\n")  # a header only
    with pytest.raises(InputError, match="items.path: .*items.csv holds no data rows"):
        refresh(load_config(write_config(tmp_path, data, tiny_model, items={"path": str(data / "items.csv")})),
                quiet=True, client=dask_client)

    # one item per user: the gate holds nothing out, so it has no figure to judge this run by
    events.drop_duplicates("user_id").to_parquet(data / "events.parquet", index=False)
    with pytest.raises(GateFailed, match="an unjudged run does not replace a judged one"):
        refresh(config, quiet=True, client=dask_client)
    assert Recommender.from_config(config).live_version() == good.published_version
    allowed = load_config(write_config(tmp_path, data, tiny_model, gate={"allow_unjudged": True}))
    assert refresh(allowed, quiet=True, client=dask_client).published_version is not None


def test_old_run_folders_are_pruned_but_never_one_behind_a_published_version(tmp_path, sample_dir, tiny_model,
                                                                           dask_client):
    data = _copy_sample(sample_dir, tmp_path / "data", ("items", "users", "events"))
    config = load_config(write_config(tmp_path, data, tiny_model, runs={"keep": 1}, publish={"keep_versions": 2}))
    reports = [refresh(config, quiet=True, client=dask_client) for _ in range(3)]
    runs = tmp_path / "work" / "runs"
    kept = sorted(p.name for p in runs.iterdir())
    assert kept == sorted(r.run_id for r in reports[1:])  # the two behind the kept versions; the first is gone
    pd.DataFrame(columns=["user_id", "item_id", "timestamp", "event_type"]).to_parquet(data / "events.parquet")
    with pytest.raises(Exception):
        refresh(config, quiet=True, client=dask_client)  # a failed run is pruned like any other, but kept as newest
    assert len(list(runs.iterdir())) == 3 and {r.run_id for r in reports[1:]} <= {p.name for p in runs.iterdir()}


def test_the_gate_on_a_worker_scores_what_one_process_scores(tmp_path, sample_dir, tiny_model, dask_client):
    """Oracle: `holdout_score` over the run's events whole, in this process, where `hash_sample`
    picks the users. With 30 of the 80 users, the worker reads them from the first user blocks."""
    import pyarrow.parquet as pq

    from embedder.artifacts import arrow_to_vectors
    from recommend.config import stage_settings
    from recommend.quality.evaluate import holdout_score

    config = load_config(write_config(tmp_path, sample_dir, tiny_model, gate={"max_users": 30, "min_vs_popularity": 0},
                                      publish={"enabled": False}))
    report = refresh(config, quiet=True, client=dask_client)
    run = Path(report.run_dir)
    assert len(list((run / "events.parquet").glob("block-*.parquet"))) == 3  # 83 users, lists.block_size 32
    emb = pq.read_table(run / "embeddings.parquet")
    figures = holdout_score(pd.read_parquet(run / "events.parquet", columns=["user_id", "item_id", "ts", "event_type"]),
                            item_ids=emb["item_id"].to_pylist(), text=arrow_to_vectors(emb["vector"], np.float16),
                            settings=stage_settings(config).ranking, gate=config.gate.model_copy(update={"max_users": 30}))
    assert 0 < report.gate.users == figures.users <= 30
    assert report.gate.ndcg == pytest.approx(figures.ndcg, abs=1e-9) and report.gate.ndcg > 0
    assert report.gate.popularity_ndcg == pytest.approx(figures.popularity_ndcg, abs=1e-9)


def test_a_graph_build_that_fails_after_the_switch_leaves_the_version_live_and_the_next_refresh_builds_it(
        tmp_path, sample_dir, tiny_model, dask_client, monkeypatch):
    import recommend.run.stages as stages

    def fails(*args, **kwargs):
        raise OSError("No space left on device")  # injected: the build after the switch dies

    config = load_config(write_config(tmp_path, sample_dir, tiny_model, publish={"graph_min_items": 0}))
    monkeypatch.setattr(stages, "build_text_graph", fails)
    first = refresh(config, quiet=True, client=dask_client)
    assert first.status == "ok" and first.exit_code == 0 and first.text_graph.startswith("failed: OSError: No space")
    rec = Recommender.from_config(config)
    assert rec.live_version() == first.published_version
    assert len(rec.search("trail running shoes", k=3).items) == 3  # an exact scan meanwhile

    monkeypatch.undo()
    second = refresh(config, quiet=True, client=dask_client)
    assert second.text_graph == "built" and rec.live_version() == second.published_version
