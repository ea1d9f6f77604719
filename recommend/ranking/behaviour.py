"""Behaviour vectors learned from the interactions: a low-rank EASE, fitted in one truncated SVD.

EASE (Steck, 2019) scores a user's unseen items with x·B, where B = I - P·diag(1/diag P) and
P = (XᵀX + λI)⁻¹. With the Gram matrix's top-r eigenpairs XᵀX ≈ V diag(s²) Vᵀ (the right singular
vectors of X), P = V diag(1/(s²+λ)) Vᵀ + (I - VVᵀ)/λ, and for every item the user has NOT seen:

    score(u, j) ∝ (x_u V diag(s²/(s²+λ))) · (V_j / P_jj)

so a user is the vector x_u V diag(s²/(s²+λ)) and an item the vector V_j / P_jj, and one
inner-product search ranks exactly like rank-r EASE. The query side of an item (for "similar items",
the score a one-item history gives) is V_j diag(s²/(s²+λ)). It ranks nearly as full EASE does (the
README's quality section compares them) and scales with the number of interactions, not with the
catalog squared as full EASE's n_items² inverse does.

Items with no interactions have V_j = 0. `project_cold` gives them behaviour vectors from their text,
with a ridge map learned on the items that have both.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import scipy.sparse as sp
from sklearn.linear_model import Ridge
from sklearn.utils.extmath import randomized_svd


@dataclass
class Behaviour:
    """Fitted behaviour space. Rows follow the interaction matrix's columns (items)."""

    item_vectors: np.ndarray   # (items, r) document side: V_j / P_jj, scaled so that the 99th percentile norm is 1
    item_queries: np.ndarray   # (items, r) query side: V_j diag(s²/(s²+λ)); a user is the sum over their history
    warm: np.ndarray           # (items,) bool: the item has interactions
    fitted: np.ndarray | None = None  # (items,) bool: the fit gave it vectors (warm, or text rows); None: warm

    def users(self, matrix: sp.csr_matrix) -> np.ndarray:
        """User vectors (users, r), unnormalised, for rows of a binary user x item matrix over the same items."""
        return np.asarray(matrix @ self.item_queries, dtype=np.float32)


def behaviour_matrix(matrix: sp.csr_matrix) -> sp.csr_matrix:
    """The matrix the model is fitted on: 1 for every (user, item) pair with an interaction.
    Which items go together is in who touched them; weights and recency shape the popularity list
    and the text profile instead (binary input is also the setting EASE's λ range was found for)."""
    binary = matrix.copy().astype(np.float32)
    binary.data[:] = 1.0
    binary.eliminate_zeros()
    return binary


MIN_FACTORS = 64  # the rank never goes below this, whatever the memory budget says


def affordable_factors(n_users: int, n_items: int, memory_mb: float) -> int:
    """The largest rank whose float32 blocks fit in `memory_mb`, but at least MIN_FACTORS: the SVD's
    range finder holds about three (users x r) and three (items x r) blocks at once, and the fitted
    model two (items x r) sides. With 192 MB: 64 at 100k users and items, over 900 for ml-latest-small."""
    per_factor = 4 * (3 * n_users + 5 * n_items)
    return max(MIN_FACTORS, int(memory_mb * 2**20 // max(per_factor, 1)))


EXACT_SIDE = 4096  # a smaller side up to this size is fitted exactly (a Gram matrix of at most 128 MB)


def exact_fit(shape: tuple[int, int], r: int) -> bool:
    """Whether the fit is exact (near full rank of a small side): then it is exactly full EASE."""
    small = min(shape)
    return r >= small // 2 and small <= EXACT_SIDE


def right_singular(matrix, r: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """(singular values, right singular vectors as (items, r)) of the top r. Near full rank of a small
    side (r at least half of it, and that side at most 8,192) exactly, from that side's Gram matrix:
    then the low-rank EASE below is exactly full EASE. Otherwise a randomized SVD in float32."""
    if exact_fit(matrix.shape, r):
        x = matrix.astype(np.float64)
        if matrix.shape[0] <= matrix.shape[1]:  # users x users: X Xᵀ = U S² Uᵀ, V = Xᵀ U / S
            values, u = np.linalg.eigh(_dense(x @ x.T))
            order = np.argsort(values)[::-1][:r]
            keep = values[order] > values.max(initial=0) * 1e-10  # the rank of X, not beyond
            s = np.sqrt(values[order][keep])
            v = np.asarray(x.T @ u[:, order[keep]]) / s
        else:  # items x items: Xᵀ X = V S² Vᵀ
            values, vecs = np.linalg.eigh(_dense(x.T @ x))
            order = np.argsort(values)[::-1][:r]
            keep = values[order] > values.max(initial=0) * 1e-10
            s, v = np.sqrt(values[order][keep]), vecs[:, order[keep]]
        return s.astype(np.float32), np.ascontiguousarray(v, dtype=np.float32)
    _, s, vt = randomized_svd(matrix.astype(np.float32), r, n_iter=5, random_state=seed)
    return s, np.ascontiguousarray(vt.T, dtype=np.float32)


def _dense(x) -> np.ndarray:
    return x.toarray() if sp.issparse(x) else np.asarray(x)


def fit_behaviour(matrix: sp.csr_matrix, factors: int = 1024, l2: float = 200.0, seed: int = 0,
                  memory_mb: float | None = None, text: np.ndarray | None = None, text_weight: float = 0.0
                  ) -> Behaviour:
    """Fit rank-`factors` EASE with regularisation `l2` on a binary user x item matrix; the rank is
    at most min(users, items) (where it is full EASE) and, with `memory_mb`, what fits in it
    (`affordable_factors`). `l2` is in the units of binary input: for weighted input it is scaled by
    the mean squared weight. With `text` (items x d) and `text_weight` β > 0, and only where the fit is
    exact, the items' texts join the fit as d extra rows: G = XᵀX + β²·T Tᵀ. Items that go together in
    text then go together in behaviour too, and an item with no events gets its behaviour from its
    text within the fit (such items count as `warm`: `project_cold` leaves them be). At a low rank
    the dense text rows would crowd out the behaviour, so they are left out there."""
    n_users, n_items = matrix.shape
    if memory_mb is not None and min(n_users, n_items) > EXACT_SIDE:  # a small side is fitted exactly, in bounded memory
        factors = min(factors, affordable_factors(n_users, n_items, memory_mb))
    r = max(1, min(factors, n_users, n_items))
    warm = np.asarray(matrix.getnnz(axis=0) > 0).ravel()
    if matrix.nnz == 0:
        zeros = np.zeros((n_items, 1), dtype=np.float32)
        return Behaviour(zeros, zeros.copy(), warm)
    # λ in the units of binary input: weights (ratings/5, or counts) scale the Gram matrix by their mean square
    l2 = l2 * float(np.mean(np.square(matrix.data, dtype=np.float64)))
    fitted = warm
    if text is not None and text_weight > 0 and exact_fit((n_users + text.shape[1], n_items), min(factors, n_users + text.shape[1], n_items)):
        r = min(factors, n_users + text.shape[1], n_items)
        matrix = sp.vstack([matrix, sp.csr_matrix(np.float32(text_weight) * np.asarray(text, np.float32).T)]).tocsr()
        fitted = np.ones(n_items, dtype=bool)  # every item has a place in the fit through its text
    s, v = right_singular(matrix, r, seed)
    # float32 throughout: (items x r) float64 copies were the largest blocks at scale
    s2 = s.astype(np.float64) ** 2
    shrink, inv = (s2 / (s2 + l2)).astype(np.float32), (1.0 / (s2 + l2)).astype(np.float32)
    squared = v ** 2
    diag_p = squared @ inv + np.clip(1.0 - squared.sum(axis=1), 0.0, None) / np.float32(l2)
    del squared
    docs = v / diag_p[:, None]
    docs[~fitted] = 0.0
    v[~fitted] = 0.0
    norms = np.linalg.norm(docs[warm], axis=1)
    scale = float(np.percentile(norms, 99)) if len(norms) else 1.0
    docs /= np.float32(scale)
    v *= shrink
    return Behaviour(docs, v, warm, fitted)


RIDGE_SAMPLE = 50_000  # warm items the text -> behaviour map is fitted on, at most


def project_cold(behaviour: Behaviour, text_vectors: np.ndarray, alpha: float = 1.0, damping: float = 1.0,
                 seed: int = 0) -> int:
    """Give items without interactions behaviour vectors predicted from their text (in place).

    A ridge regression from text space to both behaviour sides is fitted on the warm items (when
    there are at least as many as text dimensions). Both sides are multiplied by `damping`: a
    prediction from text is less certain than observed behaviour, and undamped it gave cold items more
    list places than they earn. Returns the number of items projected."""
    warm = behaviour.warm
    cold = ~(behaviour.fitted if behaviour.fitted is not None else warm)  # what the fit gave no vectors
    if not cold.any() or warm.sum() < text_vectors.shape[1]:
        return 0  # fewer warm items than text dimensions: a map that can fit anything predicts nothing
    fit_rows = np.flatnonzero(warm)
    if len(fit_rows) > RIDGE_SAMPLE:  # a linear map from d text dimensions needs no million examples
        fit_rows = np.sort(np.random.default_rng(seed).choice(fit_rows, RIDGE_SAMPLE, replace=False))
    targets = np.hstack([behaviour.item_vectors[fit_rows], behaviour.item_queries[fit_rows]])
    model = Ridge(alpha=alpha, fit_intercept=True).fit(np.asarray(text_vectors[fit_rows], np.float32), targets)
    r = behaviour.item_vectors.shape[1]
    cold_rows = np.flatnonzero(cold)
    for start in range(0, len(cold_rows), 65_536):  # predicted in blocks: no (cold x 2r) float64 array
        rows = cold_rows[start:start + 65_536]
        predicted = model.predict(np.asarray(text_vectors[rows], np.float32)).astype(np.float32)
        behaviour.item_vectors[rows] = damping * predicted[:, :r]
        behaviour.item_queries[rows] = damping * predicted[:, r:]
    return int(cold.sum())
