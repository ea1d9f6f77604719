"""FAISS search against exact brute force (the oracle), with exclusions; lists of exactly K."""

import faiss
import numpy as np
import pyarrow as pa
import pytest

from index.build import build_index, choose_factory, ivf_of, load_index, save_index
from conftest import brute_force
from index.search import search_excluding
from index.settings import IndexSettings
from index.tune import build_tuned, set_depth
from recommend.ranking.lists import Candidates, recommended_items, similar_items


def _unit(n, d=16, seed=0):
    v = np.random.default_rng(seed).normal(size=(n, d)).astype(np.float32)
    return v / np.linalg.norm(v, axis=1, keepdims=True)


def test_exact_index_matches_brute_force_with_exclusions():
    items, queries = _unit(300), _unit(40, seed=1)
    exclude = [np.random.default_rng(i).choice(300, i % 25, replace=False) for i in range(40)]
    scores, ids = search_excluding(build_index(items, kind="exact"), queries, 10, exclude, block_size=7)
    for q in range(40):
        sims = items @ queries[q]
        sims[exclude[q]] = -np.inf
        expected = np.argsort(-sims, kind="stable")[:10]
        assert set(ids[q]) == set(expected)
        assert not set(ids[q]) & set(exclude[q])
        np.testing.assert_allclose(np.sort(scores[q]), np.sort(sims[expected]), rtol=1e-5)


def _csr(rows, n_cols):
    import scipy.sparse as sp

    return sp.csr_matrix((np.ones(sum(len(r) for r in rows), np.int8), np.concatenate(rows).astype(np.int64),
                          np.concatenate([[0], np.cumsum([len(r) for r in rows])])), shape=(len(rows), n_cols))


def _topics(n, d=32, topics=40, spread=0.5, seed=0):
    rng = np.random.default_rng(seed)
    v = rng.normal(size=(topics, d))[rng.integers(0, topics, n)] + spread * rng.normal(size=(n, d))
    return (v / np.linalg.norm(v, axis=1, keepdims=True)).astype(np.float32)


@pytest.mark.parametrize("kind, target, structured", [("HNSW8", 0.97, False), ("IVF64,Flat", 0.95, True)])
def test_tuned_depth_is_the_smallest_that_reaches_the_target_recall(kind, target, structured):
    """The depth is tuned on one sample; recall on other queries, against the exact oracle, holds up."""
    items = _topics(3000) if structured else _unit(3000, d=32)  # IVF needs cells to find; HNSW copes with noise
    index, tuning = build_tuned(items, items, 10, IndexSettings(kind=kind, target_recall=target))
    tried = list(tuning.tried.items())
    assert tuning.reached and tried[-1] == (tuning.value, tuning.recall) and tuning.recall >= target
    assert all(recall < target for _, recall in tried[:-1])  # no shallower depth was enough
    assert len(tried) > 1  # the first candidate was not already enough: the tuning did something
    held_out = np.setdiff1d(np.arange(3000), np.arange(0, 3000, 6))[:300]
    _, truth = brute_force(items, items[held_out], 11)
    _, ids = search_excluding(index, items[held_out], 10, [np.array([r]) for r in held_out])
    recall = np.mean([len(set(a) & set(b[b != r])) / 10 for a, b, r in zip(ids, truth, held_out)])
    assert recall >= target - 0.05


def test_fixed_depth_without_a_target():
    index, tuning = build_tuned(_unit(3000, d=32), None, 10, IndexSettings(kind="IVF64,Flat", target_recall=None, search_depth=3))
    assert ivf_of(index).nprobe == 3 and tuning.value == 3
    _, exact = build_tuned(_unit(100), None, 10, IndexSettings(kind="auto"))
    assert exact.exact and exact.knob is None


def test_auto_kind_switches_at_threshold():
    assert choose_factory(999, "auto", exact_below=1000) == "Flat"
    assert choose_factory(1000, "auto", exact_below=1000) == "HNSW32,SQbf16"
    assert choose_factory(5, "IVF4,Flat") == "IVF4,Flat"


def test_save_and_load_round_trip(tmp_path):
    items = _unit(50)
    path = save_index(build_index(items), tmp_path / "index.faiss")
    assert not list(tmp_path.glob("*.tmp"))
    np.testing.assert_array_equal(search_excluding(load_index(path), items, 5)[1],
                                  search_excluding(build_index(items), items, 5)[1])


def test_item_lists_exclude_self_and_hold_k():
    items = _unit(30)
    scores, ids, filled = similar_items(build_index(items), items, 5, np.ones(30, np.float32))
    assert (ids >= 0).all() and ids.shape == (30, 5) and not filled.any()
    assert not (ids == np.arange(30)[:, None]).any()


@pytest.mark.parametrize("kind", ["exact", "HNSW32"])
def test_user_lists_exactly_k_unseen(kind):
    """A user who has seen all but 6 of 40 items still gets 5, none seen; a user with no history
    gets the most popular; a user who has seen 37 gets the 3 that exist."""
    items = _unit(40)
    pop = np.arange(40, 0, -1).astype(np.float32)  # item 0 most popular
    seen = _csr([np.arange(34), np.array([], np.int64), np.arange(37), np.array([0, 1])], 40)
    profiles = np.stack([items[:34].mean(0), np.zeros(16), items[:37].mean(0), items[5]]).astype(np.float32)
    profiles[[0, 2, 3]] /= np.linalg.norm(profiles[[0, 2, 3]], axis=1, keepdims=True)
    has_history = np.array([True, False, True, True])
    scores, ids, source = recommended_items(build_index(items, kind=kind), profiles, has_history, seen, 5, Candidates(items, pop))
    assert len(set(ids[0])) == 5 and set(ids[0]) <= set(range(34, 40))
    if kind == "exact":  # oracle: the 5 best unseen by brute force
        assert set(ids[0]) == set(34 + np.argsort(-(items[34:] @ profiles[0]))[:5])
    assert ids[1].tolist() == [0, 1, 2, 3, 4] and source[1] == "popular"
    assert sorted(ids[2][ids[2] >= 0]) == [37, 38, 39] and (ids[2] == -1).sum() == 2
    assert (ids[3] >= 0).all() and not {0, 1} & set(ids[3]) and source[3] == "history"
    for u in range(4):
        assert not set(ids[u][ids[u] >= 0]) & set(seen[u].indices.tolist())


def test_sampled_recall_is_one_for_exact_and_measures_an_approximate_index():
    from index.search import sampled_recall

    rng = np.random.default_rng(3)
    x = rng.normal(size=(2000, 16)).astype(np.float32)
    exact = build_index(x, kind="exact")
    _, ids = search_excluding(exact, x, 10, [np.array([i]) for i in range(len(x))])
    assert sampled_recall(exact, x, x, ids, 10).model_dump() == {"recall": 1.0, "k": 10, "sample": 0, "exact": True}
    coarse = build_index(x, kind="IVF64,Flat")  # nprobe 1: looks in one cell of 64, misses many neighbours
    _, approx = search_excluding(coarse, x, 10, [np.array([i]) for i in range(len(x))])
    measured = sampled_recall(coarse, x, x, approx, 10, sample=500)
    truth = np.mean([len(np.intersect1d(a[a >= 0], b)) / 10 for a, b in zip(approx, ids)])
    assert measured.sample == 500 and not measured.exact
    assert measured.recall < 0.9 and abs(measured.recall - truth) < 0.05


def test_exact_search_when_no_depth_worth_searching_reaches_the_target():
    """Uniform random vectors in 64 dimensions have no cells to speak of: IVF cannot reach 0.99 within
    a 16th of its cells, so the lists are searched exactly (and say so)."""
    from index.search import is_exact

    items = _unit(4000, d=64)
    index, tuning = build_tuned(items, items, 10, IndexSettings(kind="IVF256,Flat", target_recall=0.99))
    assert not tuning.reached and tuning.fallback == "exact" and is_exact(index)
    assert max(tuning.tried) == 256 // 16
    # when exact search would cost more than index.exact_budget_s: the depth where recall stops growing
    # stays (the smallest within 0.01 of the best tried), reported
    index, tuning = build_tuned(items, items, 10, IndexSettings(kind="IVF256,Flat", target_recall=0.99, exact_budget_s=1e-9))
    best = max(tuning.tried.values())
    assert tuning.fallback == "plateau" and not is_exact(index) and ivf_of(index).nprobe == tuning.value
    assert tuning.value == min(v for v, r in tuning.tried.items() if r >= best - 0.01)
    assert tuning.recall == tuning.tried[tuning.value] >= best - 0.01
    # HNSW on the same data nears recall 1 well before efSearch 512: a target above reach (one the config
    # would refuse, so built unvalidated) stops there
    settings = IndexSettings.model_construct(kind="HNSW32", target_recall=1.01, exact_budget_s=1e-9, search_depth=None)
    index, tuning = build_tuned(items, items, 10, settings)
    assert tuning.fallback == "plateau" and max(tuning.tried.values()) >= 0.99
    assert tuning.value < 512 and tuning.tried[tuning.value] >= max(tuning.tried.values()) - 0.01


def test_depth_is_tuned_for_user_profiles_too():
    """A profile that sums items from several topics falls between IVF cells: a depth tuned on item
    queries alone leaves such users' recall far below the target; tuned on both, both reach it."""
    from index.search import recall_at_k

    items = _topics(4000, topics=40, spread=0.5)
    rng = np.random.default_rng(5)
    users = items[rng.integers(0, 4000, (600, 8))].sum(axis=1)
    users /= np.linalg.norm(users, axis=1, keepdims=True)
    settings = IndexSettings(kind="IVF64,Flat", target_recall=0.95)
    index, items_only = build_tuned(items, items, 10, settings)
    _, truth = brute_force(items, users[300:], 10)
    set_depth(index, items_only.value)
    assert recall_at_k(search_excluding(index, users[300:], 10)[1], truth) < 0.9
    index, both = build_tuned(items, items, 10, settings, users[:300])
    assert both.query_sets == 2 and both.reached and both.value > items_only.value
    assert recall_at_k(search_excluding(index, users[300:], 10)[1], truth) >= 0.9  # held-out users


def test_scalar_quantized_index_padded_to_a_multiple_of_8_keeps_the_scores(tmp_path):
    """641 dimensions are padded with zeros inside the index: same neighbours as exact search, scores
    within float16 rounding, and the index saves, loads and is tuned like any other."""

    items = _unit(1500, d=41)
    index = build_index(items, kind="HNSW32,SQfp16")
    set_depth(index, 128)
    scores, ids = search_excluding(index, items[:100], 5)
    exact_scores, exact_ids = brute_force(items, items[:100], 5)
    assert np.mean([len(set(a) & set(b)) / 5 for a, b in zip(ids, exact_ids)]) >= 0.95
    np.testing.assert_allclose(scores[:, 0], exact_scores[:, 0], atol=2e-3)
    loaded = load_index(save_index(index, tmp_path / "sq.faiss"))
    set_depth(loaded, 128)
    np.testing.assert_array_equal(search_excluding(loaded, items[:100], 5)[1], ids)


def test_float16_index_refuses_values_beyond_its_range():
    """A value over 65504 becomes inf in float16 and every query would score that item infinite."""
    items = _unit(500, d=16)
    items[3, 0] = 1e5
    with pytest.raises(ValueError, match="beyond float16's range"):
        build_index(items, kind="HNSW32,SQfp16")
    assert build_index(items, kind="HNSW32").ntotal == 500


def test_default_approximate_index_keeps_huge_values_finite_and_ranks_like_exact():
    """bfloat16 storage (the default above exact_below) has float32's range: items whose behaviour
    side is 1e6 times the rest (popular items at a low rank) score finite, in exact search's order."""
    items = _unit(2000, d=37)
    items[:20, 0] *= np.geomspace(1e2, 1e6, 20)  # 20 very popular items, the largest above float16's range
    index = build_index(items, kind="auto", exact_below=1000)
    hnsw = faiss.downcast_index(faiss.downcast_index(index).index)  # inside the padding to 40 dimensions
    assert faiss.downcast_index(hnsw.storage).sq.qtype == faiss.ScalarQuantizer.QT_bf16
    set_depth(index, 128)
    queries = _unit(200, d=37, seed=1)
    scores, ids = search_excluding(index, queries, 10)
    exact_scores, exact_ids = brute_force(items, queries, 10)
    assert np.isfinite(scores).all()
    assert np.mean([len(set(a) & set(b)) / 10 for a, b in zip(ids, exact_ids)]) >= 0.95
    np.testing.assert_allclose(scores[:, 0], exact_scores[:, 0], rtol=1e-2)  # bfloat16 keeps 8 bits of mantissa


def test_labels_share_one_str_per_value():
    from recommend.ranking.lists import labels

    names = labels(np.array(["history", "popular", "history"]))
    assert names.dtype == object and names.tolist() == ["history", "popular", "history"]
    assert names[0] is names[2]  # one str per distinct value


def test_exact_search_equals_brute_force_block_by_block():
    """Oracle: numpy brute force. 1,000 items read in blocks of 96 (the last one short), with exclusions;
    and the one-block case, which must be faiss's answer as it is."""
    from index.rows import Rows
    from index.search import ExactIndex, exact_search, is_exact

    items, queries = _unit(1000, d=24), _unit(50, d=24, seed=3)
    rows = Rows(len(items), 24, lambda idx: items[idx])  # computed on demand, as the refresh's item vectors
    blocked = ExactIndex(rows, block=96)
    assert is_exact(blocked) and blocked.ntotal == 1000
    scores, ids = blocked.search(queries, 7)
    exact_scores, exact_ids = brute_force(items, queries, 7)
    np.testing.assert_array_equal(ids, exact_ids)
    np.testing.assert_allclose(scores, exact_scores, rtol=1e-5)
    exclude = [exact_ids[q, :3] for q in range(50)]  # each query's 3 best are excluded
    _, kept = search_excluding(blocked, queries, 4, exclude)
    np.testing.assert_array_equal(kept, exact_ids[:, 3:7])
    _, one_block = exact_search(rows, queries, 4, exclude)
    np.testing.assert_array_equal(one_block, exact_ids[:, 3:7])
    flat = faiss.IndexFlatIP(24)
    flat.add(items)
    np.testing.assert_array_equal(ExactIndex(items).search(queries, 7)[1], flat.search(queries, 7)[1])
    few_scores, few = ExactIndex(items[:3]).search(queries, 5)  # fewer vectors than k: -1 and -inf fill the rest
    assert (few[:, 3:] == -1).all() and np.isneginf(few_scores[:, 3:]).all() and (few[:, :3] >= 0).all()


def _rowwise_fill(scores, ids, exclude, popular_order, queries, item_vectors, popular_scores):
    """Oracle: the row-by-row top-up the block version replaced (c7dac01's lists.fill_from_popular)."""
    k = ids.shape[1]
    short = (ids < 0).any(axis=1)
    top = float(popular_scores.max()) if len(popular_scores) and popular_scores.max() > 0 else 1.0
    for row in np.flatnonzero(short):
        have = ids[row][ids[row] >= 0]
        n = len(have)
        taken = np.concatenate([have, exclude[row]]) if len(exclude[row]) else have
        cands = popular_order[: k + len(taken)]
        cands = cands[~np.isin(cands, taken)][: k - n]
        ids[row, n:n + len(cands)] = cands
        if queries is not None and np.any(queries[row]):
            scores[row, n:n + len(cands)] = item_vectors[cands] @ queries[row]
        else:
            scores[row, n:n + len(cands)] = popular_scores[cands] / top
    return short


def _rowwise_earn(scores, ids, queries, item_vectors, new_items, seen, rows, slots=1, boost=1.0):
    """Oracle: earning a place, one row and one new item at a time."""
    changed = np.zeros(len(ids), dtype=bool)
    k = ids.shape[1]
    for row in rows:
        if ids[row, k - 1] < 0:
            continue
        allowed = [n for n in new_items if n not in set(ids[row]) and n not in set(seen[row])]
        sims = item_vectors[allowed] @ queries[row] if allowed else np.zeros(0)
        for j in np.argsort(-sims, kind="stable")[:slots]:
            raw = sims[j]
            boosted = raw * boost if raw > 0 else raw / boost
            if boosted <= scores[row, k - 1]:
                continue
            at = int((scores[row] > boosted).sum())
            ids[row] = np.concatenate([ids[row, :at], [allowed[j]], ids[row, at:k - 1]])
            scores[row] = np.concatenate([scores[row, :at], [boosted], scores[row, at:k - 1]])
            changed[row] = True
    return changed


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_block_fills_and_new_item_places_equal_the_row_by_row_oracle(seed, monkeypatch):
    """Oracle: the per-row loops the block versions replaced, on random lists with short rows, users
    without history, heavy users (searched exactly with a mask) and new items."""
    import index.search as search
    from recommend.ranking.lists import earn_places, fill_from_popular, recommended_items

    monkeypatch.setattr(search, "HEAVY", 12)  # some users exclude more than this: the masked path runs too
    rng = np.random.default_rng(seed)
    n_items, n_users, k = 60, 40, 10
    items, profiles = _unit(n_items, seed=seed), _unit(n_users, seed=seed + 9)
    profiles[:5] = 0  # no history
    seen_rows = [rng.choice(n_items, int(rng.integers(0, 50 if u % 7 == 0 else 12)), replace=False) for u in range(n_users)]
    seen_rows[:5] = [np.array([], np.int64)] * 5
    seen = _csr(seen_rows, n_items)
    pop = rng.random(n_items).astype(np.float32)
    new = np.sort(rng.choice(n_items, 8, replace=False))
    candidates = Candidates(items, pop, new_items=new, new_slots=2, new_boost=1.5)
    s, i, source = recommended_items(build_index(items, kind="exact"), profiles, np.arange(n_users) >= 5, seen, k,
                                     candidates)
    # oracle: brute force without exclusions beyond seen, then the row-by-row fill and reserve
    exp_s = np.full((n_users, k), -np.inf, np.float32)
    exp_i = np.full((n_users, k), -1, np.int64)
    for u in range(5, n_users):
        sims = items @ profiles[u]
        sims[seen_rows[u]] = -np.inf
        order = np.argsort(-sims, kind="stable")[:k]
        order = order[np.isfinite(sims[order])]
        exp_i[u, :len(order)], exp_s[u, :len(order)] = order, sims[order]
    _rowwise_fill(exp_s, exp_i, seen_rows, np.argsort(-pop, kind="stable"), profiles, items, pop)
    _rowwise_earn(exp_s, exp_i, profiles, items, new, seen_rows, np.arange(5, n_users), slots=2, boost=1.5)
    np.testing.assert_array_equal(i, exp_i)
    np.testing.assert_allclose(s, exp_s, rtol=1e-5)
    assert (source[:5] == "popular").all() and "history+new" in set(source)
    # and each alone, from the same starting point
    start_s, start_i = exp_s.copy(), exp_i.copy()
    start_i[5:, 7:] = -1
    got_s, got_i, want_s, want_i = start_s.copy(), start_i.copy(), start_s.copy(), start_i.copy()
    assert (fill_from_popular(got_s, got_i, seen, np.argsort(-pop), profiles, items, pop) ==
            _rowwise_fill(want_s, want_i, seen_rows, np.argsort(-pop), profiles, items, pop)).all()
    np.testing.assert_array_equal(got_i, want_i)
    changed = earn_places(got_s, got_i, profiles, candidates, seen, np.arange(5, n_users))
    assert (changed == _rowwise_earn(want_s, want_i, profiles, items, new, seen_rows, np.arange(5, n_users), 2, 1.5)).all()
    np.testing.assert_array_equal(got_i, want_i)


def test_the_search_that_pays_is_chosen_by_its_measured_cost(monkeypatch):
    """Exact search is timed on a sample of the real queries; HNSW is built only when its estimated
    build costs less than exact search of every query, and kept only when it reaches the target
    recall for less. Exact search made expensive (as for millions of users) by injecting its timing."""
    import index.tune as tune
    from index.search import is_exact

    items = _topics(3000)
    index, tuning = build_tuned(items, items, 10, IndexSettings())
    assert is_exact(index) and tuning.exact and "times building HNSW32,SQbf16" in tuning.decision
    monkeypatch.setattr(tune, "_exact_seconds", lambda *args: 0.01)  # 10 ms a query: 10,000 s for a million
    index, tuning = build_tuned(items, items, 10, IndexSettings(), n_searches=10**6)
    assert not is_exact(index) and tuning.reached and tuning.knob == "efSearch"
    assert tuning.approx_estimate_s < tuning.exact_estimate_s == 10_000 and tuning.norm_head == 3  # 0.1% of 3,000
    assert tuning.decision.startswith("HNSW32,SQbf16 with the 3 longest items searched exactly at efSearch=")
    unreachable = dict(kind="auto", target_recall=1.01, search_depth=None)  # a target no depth reaches
    index, tuning = build_tuned(items, items, 10, IndexSettings.model_construct(**unreachable, exact_budget_s=1e5),
                                n_searches=10**6)
    assert is_exact(index) and tuning.fallback == "exact" and "within index.exact_budget_s" in tuning.decision
    index, tuning = build_tuned(items, items, 10, IndexSettings.model_construct(**unreachable, exact_budget_s=100),
                                n_searches=10**6)
    assert not is_exact(index) and tuning.fallback == "plateau" and "over index.exact_budget_s 100" in tuning.decision


def test_parquet_rows_read_the_file_a_row_group_at_a_time(tmp_path):
    """Oracle: the array written. Slices across row groups, single rows, index arrays out of order."""
    from embedder.artifacts import vectors_to_arrow, write_parquet_blocks
    from index.rows import parquet_rows

    vectors = np.random.default_rng(0).standard_normal((1000, 8)).astype(np.float16)
    write_parquet_blocks((pa.table({"vector": vectors_to_arrow(vectors[i:i + 300])}) for i in range(0, 1000, 300)),
                         tmp_path / "embeddings.parquet")
    rows = parquet_rows(tmp_path / "embeddings.parquet")
    assert rows.shape == (1000, 8) and rows[0:1].dtype == np.float16
    np.testing.assert_array_equal(rows[:], vectors)
    np.testing.assert_array_equal(rows[250:650], vectors[250:650])
    picked = np.array([999, 3, 301, 300, 299, 650])
    np.testing.assert_array_equal(rows[picked], vectors[picked])
    np.testing.assert_array_equal(rows[7], vectors[7])
    np.testing.assert_array_equal(parquet_rows(tmp_path / "embeddings.parquet", dtype=np.float32)[5:9], vectors[5:9].astype(np.float32))
    import pickle

    sent = pickle.dumps(parquet_rows(tmp_path / "embeddings.parquet", dtype=np.float32))
    assert len(sent) < 1000  # a task sent to a worker carries the path, not the rows
    np.testing.assert_array_equal(pickle.loads(sent)[picked], vectors[picked].astype(np.float32))
