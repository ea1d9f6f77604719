"""index/norm_head.py: an approximate index beside exact search of the longest documents. Oracle:
exact search (faiss's knn over every row)."""

import numpy as np

from index.build import build_index, load_index, save_index
from index.norm_head import NormHead, head_path, head_rows
from index.search import exact_search, recall_at_k, search_excluding
from index.tune import set_depth


def _spread(n, d=32, seed=0):
    """Topic vectors whose norms span about 1e8 : 1 (a few very long ones, as popular items' are)."""
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(40, d))[rng.integers(0, 40, n)] + 0.7 * rng.normal(size=(n, d))
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    return (x * np.exp(rng.standard_exponential(n) * 2.0)[:, None]).astype(np.float32)


def _profiles(items, n=300, seed=1):
    rng = np.random.default_rng(seed)
    return np.stack([items[rng.integers(0, len(items), 20)].sum(0) for _ in range(n)]).astype(np.float32)


def test_the_head_is_the_longest_rows():
    items = _spread(2000)
    rows = head_rows(items, 20)
    norms = np.linalg.norm(items, axis=1)
    assert len(rows) == 20 and np.all(np.diff(rows) > 0)
    assert norms[rows].min() >= np.sort(norms)[-20]


def test_beside_an_exact_body_the_answers_are_exact():
    items, users = _spread(3000), _profiles(_spread(3000))
    exclude = [np.arange(i % 7) for i in range(len(users))]
    want_scores, want_ids = exact_search(items, users, 10, exclude)
    got_scores, got_ids = search_excluding(NormHead.around(build_index(items, "exact"), items, 0.01), users, 10, exclude)
    np.testing.assert_allclose(got_scores, want_scores, rtol=1e-5)
    assert all(set(g) == set(w) for g, w in zip(got_ids, want_ids))


def test_beside_a_graph_every_true_neighbour_in_the_head_is_found():
    """The head's rows are searched exactly, so none of a query's true top k among them is ever
    missed, whatever the graph finds; recall can only rise over the graph's own."""
    items = _spread(5000)
    users = _profiles(items)
    _, truth = exact_search(items, users, 10)
    graph = build_index(items, "HNSW32,SQbf16")
    set_depth(graph, 16)
    index = NormHead.around(graph, items, 0.01)
    head = set(index.rows.tolist())
    scores, ids = search_excluding(index, users, 10)
    assert all(head & set(t) <= set(g) for g, t in zip(ids, truth))
    assert np.all(np.diff(scores, axis=1) <= 0) and np.all(ids >= 0)
    alone = recall_at_k(search_excluding(graph, users, 10)[1], truth)
    assert recall_at_k(ids, truth) >= alone and recall_at_k(ids, truth) >= 0.99


def test_saved_with_its_head_and_a_later_plain_index_drops_it(tmp_path):
    items, users = _spread(3000), _profiles(_spread(3000))
    graph = build_index(items, "HNSW32,SQbf16")
    set_depth(graph, 32)
    index = NormHead.around(graph, items, 0.01)
    path = save_index(index, tmp_path / "index.faiss")
    loaded = load_index(path, mmap=True)
    set_depth(loaded, 32)
    assert isinstance(loaded, NormHead) and np.array_equal(loaded.rows, index.rows)
    np.testing.assert_array_equal(loaded.search(users, 10)[1], index.search(users, 10)[1])
    save_index(build_index(items, "exact"), path)  # the same path, the next index without a head
    assert not head_path(path).exists() and not isinstance(load_index(path), NormHead)
