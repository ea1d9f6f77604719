"""The GPU's exact search (index/device_search.py), run here by torch on the CPU, against faiss's
exact search on the same vectors: the same (scores, ids), exclusions and short lists included."""

import numpy as np
import pytest
import scipy.sparse as sp

import index.search as search
from index.device_search import device_top_k, resident
from index.search import exact_search, exclusions


def _vectors(n, d, seed):
    x = np.random.default_rng(seed).standard_normal((n, d)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def assert_same_answer(got, expected, tol=1e-5):
    """Equal scores (to float rounding) and equal ids, except that ids of equal scores may swap."""
    (gs, gi), (es, ei) = got, expected
    np.testing.assert_array_equal(np.isfinite(gs), np.isfinite(es))
    np.testing.assert_allclose(np.where(np.isfinite(gs), gs, 0), np.where(np.isfinite(es), es, 0), atol=tol)
    np.testing.assert_array_equal(gi < 0, ei < 0)
    for row in range(len(gi)):
        if np.array_equal(gi[row], ei[row]):
            continue
        finite = es[row][np.isfinite(es[row])]
        clear = es[row] > finite.min() + tol  # ids whose place no tie can take
        assert set(ei[row][clear]) <= set(gi[row]), (row, gi[row], ei[row])


@pytest.fixture(autouse=True)
def faiss_on_the_cpu(monkeypatch):
    """The oracle is faiss's CPU search, whatever this machine has."""
    monkeypatch.setenv("RECS_SEARCH_DEVICE", "cpu")


def test_same_answer_as_faiss_with_exclusions():
    vectors, queries = _vectors(5000, 24, 0), _vectors(700, 24, 1)
    rng = np.random.default_rng(2)
    exclude = [rng.choice(5000, size=int(rng.integers(0, 400)), replace=False) for _ in range(700)]  # some over HEAVY
    expected = exact_search(vectors, queries, 10, exclude)
    got = device_top_k(vectors, queries, 10, exclusions(exclude, 0, 700, 5000), device="cpu")
    assert_same_answer(got, expected)
    assert not np.isin(got[1][5], exclude[5]).any()


def test_fewer_than_k_left_gives_minus_one_like_faiss():
    vectors, queries = _vectors(12, 8, 3), _vectors(3, 8, 4)
    exclude = sp.csr_matrix(np.array([[1] * 9 + [0] * 3, [0] * 12, [1] * 12], dtype=np.int8))
    got = device_top_k(vectors, queries, 5, exclude, device="cpu")
    assert (got[1][0] >= 0).sum() == 3 and (got[1][1] >= 0).sum() == 5 and (got[1][2] == -1).all()
    assert np.isneginf(got[0][2]).all()
    assert_same_answer(got, exact_search(vectors, queries, 5, [np.arange(9), [], np.arange(12)]))
    more_than_all = device_top_k(vectors, queries, 20, None, device="cpu")
    assert (more_than_all[1][:, 12:] == -1).all() and set(more_than_all[1][0, :12]) == set(range(12))


def test_small_blocks_and_a_changed_array_give_the_same_answer(monkeypatch):
    import index.device_search as device_search

    vectors, queries = _vectors(3000, 16, 5), _vectors(257, 16, 6)
    monkeypatch.setattr(device_search, "BLOCK_BYTES", 4 * 3000 * 10)  # blocks of 10 queries
    assert_same_answer(device_top_k(vectors, queries, 7, device="cpu"), exact_search(vectors, queries, 7))
    first = resident(vectors, "cpu")
    assert resident(vectors, "cpu") is first  # copied once while the same array is searched
    vectors[::7] = _vectors(len(vectors[::7]), 16, 7)  # changed in place: copied again
    assert_same_answer(device_top_k(vectors, queries, 7, device="cpu"), exact_search(vectors, queries, 7))


def test_exact_searches_take_the_device_path_where_one_is_visible(monkeypatch):
    """With a device (here: the CPU standing in for a GPU), a flat index's search with exclusions,
    `ExactIndex` and `exact_search` all answer from the device path, and answer as faiss does."""
    from index.build import build_index

    vectors, queries = _vectors(4000, 16, 8), _vectors(300, 16, 9)
    exclude = [np.arange(i, i + 3 * (i % 5)) % 4000 for i in range(300)]
    flat = build_index(vectors, "exact")
    expected = search.search_excluding(flat, queries, 6, exclude)
    calls = []
    real = search.device_top_k
    monkeypatch.setattr(search, "search_device", lambda: "cpu")
    monkeypatch.setattr(search, "device_top_k", lambda *a, **kw: calls.append(1) or real(*a, **kw))
    assert_same_answer(search.search_excluding(flat, queries, 6, exclude), expected)
    assert_same_answer(exact_search(vectors, queries, 6, exclude), expected)
    assert len(calls) == 2
