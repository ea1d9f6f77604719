"""Offline evaluation and the behaviour model, checked against values computed by hand and against
exact EASE (the oracle for the low-rank fit)."""

import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp

from recommend.ranking.behaviour import fit_behaviour, project_cold
from recommend.quality.gate import GateFigures, GateSettings, gate_problems
from recommend.quality.metrics import cold_share, coverage, ranking_metrics
from recommend.quality.splits import random_split, temporal_split


def test_metrics_by_hand():
    # user 0: relevant {1, 5}, list [3, 1, 2] -> one hit at rank 2
    # user 1: relevant {7}, list [7, 8, 9] -> hit at rank 1
    # user 2: nothing held out -> left out of every mean
    ranked = np.array([[3, 1, 2], [7, 8, 9], [1, 2, 3]])
    relevant = [np.array([1, 5]), np.array([7]), np.array([], dtype=np.int64)]
    m = ranking_metrics(ranked, relevant)
    ndcg0 = (1 / np.log2(3)) / (1 + 1 / np.log2(3))
    assert m["users"] == 2
    assert m["ndcg"] == pytest.approx((ndcg0 + 1.0) / 2)
    assert m["precision"] == pytest.approx((1 / 3 + 1 / 3) / 2)
    assert m["recall"] == pytest.approx((1 / 2 + 1) / 2)
    assert m["map"] == pytest.approx(((1 / 2) / 2 + 1.0) / 2)  # user 0: precision@2 = 1/2 over min(2, 3)
    assert m["hit_rate"] == 1.0
    assert ranking_metrics(ranked, relevant, k=1)["ndcg"] == pytest.approx(0.5)  # only user 1 hits at rank 1


def test_no_hit_scores_zero_and_empty_slots_never_hit():
    m = ranking_metrics(np.array([[4, -1, -1]]), [np.array([-1, 9])])
    assert m == {"ndcg": 0.0, "precision": 0.0, "recall": 0.0, "map": 0.0, "hit_rate": 0.0, "users": 1}
    assert coverage(np.array([[0, 1], [1, -1]]), 4) == 0.5
    assert cold_share(np.array([[0, 1], [2, -1]]), np.array([True, False, False])) == pytest.approx(1 / 3)


def _events(n_users=40, n_items=30, per_user=8, seed=0):
    rng = np.random.default_rng(seed)
    rows = [(f"u{u}", f"i{i}", pd.Timestamp("2026-01-01", tz="UTC") + pd.Timedelta(hours=int(h)))
            for u in range(n_users) for i, h in zip(rng.choice(n_items, per_user, replace=False), rng.permutation(per_user))]
    return pd.DataFrame(rows, columns=["user_id", "item_id", "ts"]).assign(event_type="view")


def test_splits_hold_out_a_share_per_user_and_never_split_a_pair():
    events = _events()
    events = pd.concat([events, events.iloc[:5].assign(event_type="purchase")])  # a pair with two events
    train, held = random_split(events, 0.25, seed=42)
    again, held_again = random_split(events, 0.25, seed=42)
    assert held.equals(held_again) and not held.equals(random_split(events, 0.25, seed=7)[1])
    assert (held.groupby("user_id").size() == 2).all()  # 25% of 8 items
    pairs = set(zip(train.user_id, train.item_id))
    assert not pairs & set(zip(held.user_id, held.item_id))
    held_pairs = set(zip(held.user_id, held.item_id))
    events_held = sum((u, i) in held_pairs for u, i in zip(events.user_id, events.item_id))
    assert len(train) == len(events) - events_held  # every event of a held-out pair, and only those, left out
    train, held = temporal_split(events, 0.25)
    last = events.groupby(["user_id", "item_id"])["ts"].max().reset_index()
    for user, group in last.groupby("user_id"):
        newest = set(group.nlargest(2, "ts")["item_id"])
        assert set(held[held.user_id == user]["item_id"]) == newest


def test_low_rank_ease_ranks_like_exact_ease():
    """At full rank the fitted vectors give exact EASE's scores (times a constant) on unseen items."""
    rng = np.random.default_rng(1)
    x = sp.csr_matrix((rng.random((60, 25)) < 0.2).astype(np.float32))
    l2 = 10.0
    model = fit_behaviour(x, factors=25, l2=l2)
    mine = model.users(x) @ model.item_vectors.T
    g = (x.T @ x).toarray() + l2 * np.eye(25)
    p = np.linalg.inv(g)
    b = -p / np.diag(p)
    np.fill_diagonal(b, 0)
    exact = x.toarray() @ b
    unseen = x.toarray() == 0
    ratio = mine[unseen & model.warm[None, :]] / exact[unseen & model.warm[None, :]]
    assert np.allclose(ratio, ratio[0], rtol=1e-3) and ratio[0] > 0


def test_cold_items_get_vectors_from_text():
    rng = np.random.default_rng(2)
    text = rng.normal(size=(500, 8)).astype(np.float32)
    x = sp.csr_matrix((rng.random((300, 500)) < 0.05).astype(np.float32))
    x = x.tolil()
    x[:, 490:] = 0
    x = x.tocsr()
    x.eliminate_zeros()
    model = fit_behaviour(x, factors=16, l2=5.0)
    assert not model.warm[490:].any() and not model.item_vectors[490:].any()
    assert project_cold(model, text, damping=0.5) == 10
    assert np.abs(model.item_vectors[490:]).sum() > 0 and np.abs(model.item_queries[490:]).sum() > 0


def test_gate_rules():
    ok = GateFigures(ndcg=0.30, popularity_ndcg=0.20, k=10, users=100, holdout=0.1)
    rules = GateSettings(min_ndcg=0.0, min_vs_popularity=0.5, max_drop=0.2)
    assert gate_problems(ok, GateFigures(ndcg=0.32, run_id="a"), rules) == []
    assert "min_ndcg" in gate_problems(ok, None, rules.model_copy(update={"min_ndcg": 0.35}))[0]
    assert "popularity" in gate_problems(ok.model_copy(update={"ndcg": 0.05}), None, rules)[0]
    assert "live version" in gate_problems(ok, GateFigures(ndcg=0.40, run_id="a"), rules)[0]
    assert gate_problems(ok.model_copy(update={"ndcg": None}), None, rules.model_copy(update={"min_ndcg": 0.5})) == []
    # a live figure made another way (older versions, another sample) is not compared
    assert gate_problems(ok, GateFigures(ndcg=0.40, run_id="a", method="other"), rules) == []
    unjudged = GateFigures(ndcg=None, users=0, k=10, holdout=0.1)
    assert "unjudged run does not replace a judged one" in gate_problems(unjudged, GateFigures(ndcg=0.3, run_id="a"), rules)[0]
    assert gate_problems(unjudged, GateFigures(ndcg=0.3, run_id="a"), rules.model_copy(update={"allow_unjudged": True})) == []


def test_popularity_baseline_counts_users_not_events_or_weights():
    from recommend.quality.evaluate import plain_popularity

    train = pd.DataFrame({"user_id": ["a", "a", "a", "b"], "item_id": ["x", "x", "y", "y"]})
    assert plain_popularity(train, ["x", "y", "z"]).tolist() == [1.0, 2.0, 0.0]


def test_rows_dot_equals_the_sparse_product():
    """Oracle: scipy's own product, in float64, for a float16 dense side and rows with no entries."""
    import scipy.sparse as sp

    from recommend.ranking.profiles import rows_dot

    rng = np.random.default_rng(0)
    m = sp.random(50, 400, density=0.02, format="lil", dtype=np.float32, random_state=1)
    m[3, :] = 0  # a user with no history
    m = m.tocsr()
    m.eliminate_zeros()
    dense = rng.normal(size=(400, 16)).astype(np.float16)
    got = rows_dot(m, dense)
    assert got.dtype == np.float32 and got.shape == (50, 16) and not got[3].any()
    np.testing.assert_allclose(got, m.astype(np.float64) @ dense.astype(np.float64), rtol=1e-5, atol=1e-5)


def test_the_gate_sample_is_chosen_by_id_and_stays_put():
    """The gate's users: the same ids give the same sample, whatever the order or the other users;
    a user joining changes it by at most one."""
    from recommend.quality.evaluate import hash_sample

    ids = [f"U{i:05d}" for i in range(10_000)]
    sample = set(hash_sample(ids, 500))
    assert len(sample) == 500 and set(hash_sample(ids[::-1], 500)) == sample
    grown = set(hash_sample(ids + ["a-new-user"], 500))
    assert len(grown - sample) <= 1 and set(hash_sample(ids[:300], 500)) == set(ids[:300])


def test_tuning_scores_every_combination_and_ranks_them(tmp_path, sample_dir, tiny_model):
    """`recs eval --tune`'s search: every combination of the grid, each scored as the refresh would
    list (oracle: the same settings scored alone), best first."""
    from recommend.quality.evaluate import Holdout, lists_for, ranking_metrics, split_events, tune, _relevant
    from recommend.ranking.settings import RankingSettings

    events = pd.read_parquet(sample_dir / "events.parquet")
    events["ts"] = pd.to_datetime(events.pop("timestamp"), utc=True)
    items = pd.read_parquet(sample_dir / "items.parquet")
    text = np.random.default_rng(0).normal(size=(len(items), 16)).astype(np.float32)
    text /= np.linalg.norm(text, axis=1, keepdims=True)
    settings = RankingSettings(weights={"view": 1.0, "cart": 3.0, "purchase": 5.0}, half_life_days=14)
    grid = {"behaviour_weight": (0.5, 0.9), "text_in_fit": (0.0,), "fit_input": ("binary", "weights")}
    tried = tune(events, item_ids=items["item_id"].tolist(), text=text, settings=settings, holdouts=(Holdout("random"),), grid=grid)
    assert len(tried) == 4 and tried[0].ndcg["random"] == max(t.ndcg["random"] for t in tried)
    train, held = split_events(events, "random", 0.25, 42)
    user_ids = sorted(events["user_id"].unique())
    best = settings.blend.model_copy(update=tried[0].settings)
    from dataclasses import replace
    ranked, _ = lists_for(train, item_ids=items["item_id"].tolist(), text=text, user_ids=user_ids,
                          settings=replace(settings, blend=best), k=10)
    relevant = _relevant(held, user_ids, {i: r for r, i in enumerate(items["item_id"])})
    assert round(ranking_metrics(ranked, relevant, 10)["ndcg"], 4) == tried[0].ndcg["random"]
    binary_only = tune(events, item_ids=items["item_id"].tolist(), text=text, holdouts=(Holdout("random"),), grid=grid,
                       settings=RankingSettings(weights={"default": 1.0}, half_life_days=14))
    assert {t.settings["fit_input"] for t in binary_only} == {"binary"}  # one weight: nothing else to try
