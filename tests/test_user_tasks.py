"""The events in user blocks (embedder/event_blocks.py) and the behaviour fit over them on the workers
(recommend/run/tasks/user_tasks.py), against oracles in one process: `ingest_events` (every accepted event
brought here), and the fit on the whole matrix (`build_space`, `FitMatrix`)."""

from dataclasses import replace

import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp

from embedder.event_blocks import blocks_from_frame, first_users, read_user_ids, user_hash
from embedder.ingest import ingest_events, ingest_events_to_blocks
from embedder.run_folder import RunFolder
from embedder.specs import EventMapping, SourceSpec
from run_helpers import blocks_in
from recommend.quality.evaluate import hash_sample
from recommend.ranking.behaviour import FitMatrix, FitStats, subspace_svd
from recommend.ranking.blend import build_space, user_block
from recommend.ranking.profiles import popularity
from recommend.ranking.settings import BlendSettings, RankingSettings
from recommend.run.tasks.item_tasks import fit_blocks, read_item_side
from recommend.run.tasks.user_tasks import BlockedFit, block_stats

COLUMNS = {"user_id": "user", "item_id": "item", "timestamp": "ts", "event_type": "kind"}


def _events(n_users=300, n_items=120, seed=0) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    rows = []
    for u in range(n_users):
        for i in rng.choice(n_items, rng.integers(1, 12), replace=False):
            rows.append((f"u{u}", f"i{i}", int(1_700_000_000 + rng.integers(0, 90 * 86400)), rng.choice(["view", "buy"])))
    return pd.DataFrame(rows, columns=["user", "item", "ts", "kind"])


def test_ingest_by_user_block_keeps_every_accepted_event_once(tmp_path, dask_client):
    """Two files that share events (exact duplicates across partitions) and hold bad rows: the blocks
    hold exactly `ingest_events`' accepted rows, each user in one block, and the counts match."""
    events = _events()
    items = [f"i{i}" for i in range(110)]  # i110.. are not in the catalog: quarantined
    events.iloc[:1800].to_csv(tmp_path / "a.csv", index=False)
    pd.concat([events.iloc[1500:], events.iloc[:3].assign(ts="not a time")]).to_csv(tmp_path / "b.csv", index=False)
    spec = SourceSpec(str(tmp_path / "*.csv"), "events.path")
    weights = {"view": 1.0, "buy": 3.0}
    whole = ingest_events(spec, COLUMNS, weights, items)
    run = RunFolder(tmp_path / "run")
    result, blocks = ingest_events_to_blocks(spec, EventMapping(COLUMNS, weights, "UTC"), items, run, block_size=64,
                                             extra_users=["only-in-users-file"])
    assert result.counts == whole.counts and result.counts.quarantined > 3
    assert result.counts.duplicates_dropped == events.iloc[1500:1800]["item"].isin(items).sum()
    pd.testing.assert_frame_equal(result.quarantine.sort_values(["source", "row"]).reset_index(drop=True),
                                  whole.quarantine.sort_values(["source", "row"]).reset_index(drop=True))
    back = pd.read_parquet(run.events)
    key = ["user_id", "item_id", "ts", "event_type"]
    pd.testing.assert_frame_equal(back[key].astype(str).sort_values(key).reset_index(drop=True),
                                  whole.rows[key].astype(str).sort_values(key).reset_index(drop=True))
    assert (back["item"].to_numpy() == pd.Index(items).get_indexer(back["item_id"])).all()
    assert not run.events_raw.exists()
    users = read_user_ids(run, blocks.n)
    assert blocks.n == -(-len(users) // 64) and len(users) == len(set(users)) == whole.rows["user_id"].nunique() + 1
    assert "only-in-users-file" in users


@pytest.fixture(scope="module")
def blocked(tmp_path_factory):
    events = _events(n_users=400, n_items=150, seed=1).rename(columns={"user": "user_id", "item": "item_id", "kind": "event_type"})
    events["ts"] = pd.to_datetime(events["ts"], unit="s", utc=True)
    item_ids = [f"i{i}" for i in range(160)]  # 10 items without events
    folder = tmp_path_factory.mktemp("run")
    blocks = blocks_from_frame(RunFolder(folder), events, item_ids, block_size=50, extra_users=["nobody"])
    return events, item_ids, blocks, read_user_ids(blocks.run, blocks.n)


def test_block_sums_equal_the_whole_matrix(blocked, dask_client):
    """Stats, XᵀX, X and XᵀXz summed over 8+ blocks on the workers equal the whole matrix's."""
    events, item_ids, blocks, user_ids = blocked
    settings = RankingSettings(weights={"view": 1.0, "buy": 3.0}, half_life_days=30.0,
                               blend=BlendSettings(fit_input="weights"))
    whole = user_block(events, n_items=len(item_ids), user_ids=user_ids, settings=settings,
                       item_row={i: r for r, i in enumerate(item_ids)})
    stats, pop = block_stats(dask_client, blocks, len(item_ids), settings)
    expected = FitStats.of(whole.fit_on)
    assert blocks.n >= 8 and stats.nnz == expected.nnz and (stats.warm == expected.warm).all()
    assert stats.mean_square == pytest.approx(expected.mean_square, rel=1e-9)
    np.testing.assert_allclose(pop, popularity(whole.weighted), rtol=1e-5)
    fit = BlockedFit(dask_client, blocks, len(item_ids), settings)
    assert fit.shape == whole.fit_on.shape
    assert (fit.gather() != whole.fit_on).nnz == 0
    np.testing.assert_allclose(fit.gram(), FitMatrix(whole.fit_on).gram(), rtol=1e-9)
    z = np.random.default_rng(0).standard_normal((len(item_ids), 5)).astype(np.float32)
    np.testing.assert_allclose(fit.fetch(fit.gram_times(z)), FitMatrix(whole.fit_on).gram_times(z), rtol=1e-4, atol=1e-3)


def test_chains_of_groups_and_slices_equal_the_whole_matrix(blocked, dask_client, monkeypatch):
    """One block per group (9 groups: 3 chains of 3, each adding into its running total), each
    block's product added 7 rows at a time: XᵀXz and X (rows in block order) equal the whole
    matrix's, in this process and on the workers, and both give the same numbers."""
    import recommend.run.tasks.user_tasks as user_tasks

    events, item_ids, blocks, user_ids = blocked
    settings = RankingSettings(weights={"view": 1.0, "buy": 3.0}, half_life_days=30.0)
    whole = user_block(events, n_items=len(item_ids), user_ids=user_ids, settings=settings,
                       item_row={i: r for r, i in enumerate(item_ids)}).fit_on
    monkeypatch.setattr(user_tasks, "GROUP", 1)
    monkeypatch.setattr(user_tasks, "ADD_ROWS", 7)  # in this process only: the workers add 65,536 at a time
    assert blocks.n >= 9
    z = np.asfortranarray(np.random.default_rng(2).standard_normal((len(item_ids), 5)).astype(np.float32))
    here, there = BlockedFit(None, blocks, len(item_ids), settings), BlockedFit(dask_client, blocks, len(item_ids), settings)
    product = here.gram_times(z)
    np.testing.assert_allclose(product, FitMatrix(whole).gram_times(z), rtol=1e-4, atol=1e-3)
    np.testing.assert_array_equal(there.fetch(there.gram_times(z)), product)
    assert (here.gather() != whole).nnz == 0 and (there.gather() != whole).nnz == 0


def test_subspace_iteration_over_blocks_is_the_one_in_process(blocked, dask_client):
    """The fit's SVD from products summed over the blocks on the workers equals the same iteration
    on the whole matrix in this process (rank 8 of 150 items: not the exact path)."""
    events, item_ids, blocks, user_ids = blocked
    settings = RankingSettings(weights={"view": 1.0, "buy": 3.0}, half_life_days=30.0)
    fit = BlockedFit(dask_client, blocks, len(item_ids), settings)
    s, v = subspace_svd(fit, 8)
    v = fit.fetch(v)  # the vectors stay on a worker until asked for
    x = user_block(events, n_items=len(item_ids), user_ids=user_ids, settings=settings,
                   item_row={i: r for r, i in enumerate(item_ids)}).fit_on
    s_whole, v_whole = subspace_svd(FitMatrix(x), 8)
    np.testing.assert_allclose(s, s_whole, rtol=1e-4)
    np.testing.assert_allclose(np.abs(np.sum(v * v_whole, axis=0)), 1.0, atol=1e-3)


def test_subspace_iteration_finds_the_top_singular_vectors():
    """Oracle: numpy's eigh of the Gram matrix, on a matrix whose spectrum decays as real
    interactions' does (a few strong directions, then noise)."""
    rng = np.random.default_rng(5)
    u, _ = np.linalg.qr(rng.standard_normal((600, 12)))
    w, _ = np.linalg.qr(rng.standard_normal((200, 12)))
    x = (u * (40.0 * 0.75 ** np.arange(12))) @ w.T + 0.05 * rng.standard_normal((600, 200))
    s, v = subspace_svd(FitMatrix(sp.csr_matrix(x.astype(np.float32))), 8)
    values, vectors = np.linalg.eigh(x.T @ x)
    np.testing.assert_allclose(s ** 2, values[::-1][:8], rtol=1e-4)
    np.testing.assert_allclose(np.abs(np.sum(v * vectors[:, ::-1][:, :8], axis=0)), 1.0, atol=1e-4)


def test_the_iterations_steps_in_place_are_the_whole_array_ones(monkeypatch):
    """Oracles: scipy's lu(permute_l=True), one seeded draw of the whole start, and the float64
    product. The steps made without a second (items x c) array give the same numbers: the LU in the
    product's own memory (a Fortran-ordered product, as the fit's sums are), the start drawn and the
    Ritz product summed a block of rows at a time."""
    import scipy.linalg

    import recommend.ranking.behaviour as behaviour

    monkeypatch.setattr(behaviour, "DRAW_ROWS", 1000)  # several blocks at test size
    rng = np.random.default_rng(3)
    y = rng.standard_normal((4500, 14)).astype(np.float32)
    expected = scipy.linalg.lu(y, permute_l=True, check_finite=False)[0]
    np.testing.assert_array_equal(behaviour._lu_basis(y.copy()), expected)  # C order: a copy, the same result
    product = np.asfortranarray(y)
    basis = behaviour._lu_basis(product)
    assert np.shares_memory(basis, product)
    np.testing.assert_array_equal(basis, expected)

    whole = np.random.default_rng(11).standard_normal((4500, 14)).astype(np.float32)
    np.testing.assert_array_equal(behaviour._gaussian(4500, 14, 11), whole)
    rows = np.sort(rng.choice(4500, 700, replace=False))
    np.testing.assert_array_equal(behaviour._gaussian(4500, 14, 11, rows), whole[rows])

    gz = rng.standard_normal((4500, 14)).astype(np.float32)
    np.testing.assert_allclose(behaviour._ritz(whole, gz), whole.T.astype(np.float64) @ gz.astype(np.float64), rtol=1e-12)


def test_the_fit_on_the_warm_columns_is_the_fit_on_all(monkeypatch):
    """A matrix whose last 700 of 1,000 items have no interactions (as a 5,000-user sample of a large
    catalog): the fit runs on the 300 warm columns, and gives the singular pairs of the whole (the
    same iteration, computed on all rows), with zero rows for the cold items."""
    from recommend.ranking.behaviour import right_singular

    rng = np.random.default_rng(7)
    u, _ = np.linalg.qr(rng.standard_normal((5000, 12)))
    w, _ = np.linalg.qr(rng.standard_normal((300, 12)))
    warm_part = np.abs((u * (60.0 * 0.8 ** np.arange(12))) @ w.T + 0.02 * rng.standard_normal((5000, 300)))
    x = sp.csr_matrix(np.hstack([warm_part, np.zeros((5000, 700))]).astype(np.float32))
    warm = np.asarray(x.getnnz(axis=0) > 0)
    import recommend.ranking.behaviour as behaviour

    shapes, iterate = [], behaviour.subspace_svd
    monkeypatch.setattr(behaviour, "subspace_svd", lambda m, *a, **k: shapes.append(m.shape) or iterate(m, *a, **k))
    s, v = right_singular(FitMatrix(x), 8, warm=warm)
    assert shapes == [(5000, 300)]  # the iteration's arrays are 300 rows, not 1,000
    monkeypatch.undo()
    s_all, v_all = subspace_svd(FitMatrix(x), 8)  # every row of every product, as before
    np.testing.assert_allclose(s, s_all, rtol=1e-4)
    np.testing.assert_allclose(np.abs(np.sum(v * v_all, axis=0)), 1.0, atol=1e-4)
    assert v.shape == (1000, 8) and not v[~warm].any() and warm.sum() == 300


def test_the_item_side_from_blocks_is_build_spaces(blocked, dask_client, tmp_path):
    """The refresh's fit over the blocks (exact here: 401 users) gives `build_space`'s item side,
    with the behaviour scale from the same hash-sampled users; a worker builds and saves it, and the
    saved files are what is compared."""
    events, item_ids, blocks, user_ids = blocked
    text = np.random.default_rng(3).standard_normal((len(item_ids), 16)).astype(np.float32)
    text /= np.linalg.norm(text, axis=1, keepdims=True)
    settings = RankingSettings(weights={"view": 1.0, "buy": 3.0}, half_life_days=30.0)
    space = build_space(events, item_ids=item_ids, text=text, user_ids=user_ids, settings=settings)
    blocks = blocks_in(blocks, tmp_path)
    saved = fit_blocks(dask_client, blocks, item_ids, text, settings)
    items = read_item_side(blocks.run)
    assert items.layout == saved.layout
    assert replace(items.layout, behaviour_scale=None) == replace(space.layout, behaviour_scale=None)
    assert items.layout.behaviour_scale == pytest.approx(space.layout.behaviour_scale, rel=1e-5)
    assert saved.users == len(user_ids) == 401
    assert saved.users_with_history == int(space.has_history.sum()) == 400
    assert saved.cold_items == int((~space.warm).sum())
    assert set(saved.files) == {p.relative_to(tmp_path).as_posix() for p in blocks.run.item_side.iterdir()}
    for name in ("behaviour_docs", "behaviour_queries", "text", "popularity"):
        np.testing.assert_allclose(getattr(items, name), getattr(space.items, name), rtol=1e-4, atol=1e-4)


def test_the_item_side_at_a_rank_below_full_stays_on_the_workers(blocked, dask_client, tmp_path):
    """Rank 8 of 150 items (the subspace iteration, not the exact path): the item side saved by a
    worker equals the one built in this process from the same blocks without a client, and the
    steps between the products (the start, LU, QR, Rayleigh–Ritz, the item side) ran as tasks."""
    events, item_ids, blocks, _ = blocked
    text = np.random.default_rng(4).standard_normal((len(item_ids), 16)).astype(np.float32)
    settings = RankingSettings(weights={"view": 1.0, "buy": 3.0}, half_life_days=30.0,
                               blend=BlendSettings(factors=8, text_in_fit=0.0))
    at_a, at_b = blocks_in(blocks, tmp_path / "a"), blocks_in(blocks, tmp_path / "b")
    on_workers = fit_blocks(dask_client, at_a, item_ids, text, settings)
    here = fit_blocks(None, at_b, item_ids, text, settings)
    assert on_workers.layout.behaviour_dim == 8 and on_workers.cold_items == here.cold_items == 10
    assert on_workers.layout.behaviour_scale == pytest.approx(here.layout.behaviour_scale, rel=1e-4)
    a, b = read_item_side(at_a.run), read_item_side(at_b.run)
    for name in ("behaviour_docs", "behaviour_queries", "text"):
        np.testing.assert_allclose(getattr(a, name), getattr(b, name), rtol=1e-3, atol=1e-4)
    prefixes = set(dask_client.run_on_scheduler(lambda dask_scheduler: list(dask_scheduler.task_prefixes)))
    assert {"gaussian", "lu-basis", "qr-basis", "ritz", "rotate", "behaviour-from-svd", "item-side-of", "save"} <= prefixes


def test_the_first_blocks_hold_the_hash_sample(blocked):
    """The gate's users (`hash_sample` of every user with events) are read from the first blocks only."""
    events, _, blocks, _ = blocked
    chosen, sampled = first_users(blocks.run, blocks.n, 60)
    assert sorted(chosen) == sorted(hash_sample(events["user_id"].unique(), 60))
    assert list(np.argsort(user_hash(chosen), kind="stable")) == list(range(60))
    pd.testing.assert_frame_equal(sampled[["user_id", "item_id"]].sort_values(["user_id", "item_id"]).reset_index(drop=True),
                                  events[events["user_id"].isin(chosen)][["user_id", "item_id"]].astype(str)
                                  .sort_values(["user_id", "item_id"]).reset_index(drop=True))


