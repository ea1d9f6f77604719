"""Behaviour vectors learned from the interactions: a low-rank EASE, fitted in one truncated SVD.

EASE (Steck, 2019) scores a user's unseen items with x·B, where B = I - P·diag(1/diag P) and
P = (XᵀX + λI)⁻¹. With the Gram matrix's top-r eigenpairs XᵀX ≈ V diag(s²) Vᵀ (the right singular
vectors of X), P = V diag(1/(s²+λ)) Vᵀ + (I - VVᵀ)/λ, and for every item the user has NOT seen:

    score(u, j) ∝ (x_u V diag(s²/(s²+λ))) · (V_j / P_jj)

so a user is the vector x_u V diag(s²/(s²+λ)) and an item the vector V_j / P_jj, and one
inner-product search ranks exactly like rank-r EASE. The query side of an item (for "similar items",
the score a one-item history gives) is V_j diag(s²/(s²+λ)). It ranks nearly as full EASE does
(docs/performance.md, "Where the quality came from") and scales with the number of interactions, not
with the catalog squared as full EASE's n_items² inverse does.

Items with no interactions have V_j = 0. `project_cold` gives them behaviour vectors from their text,
with a ridge map learned on the items that have both.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import scipy.linalg
import scipy.sparse as sp


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
    model two (items x r) sides. With 192 MB: 64 at 100k users and items, over 900 for ml-latest-small.
    In the refresh the users' rows stay in blocks on the workers, yet they are still counted: the
    rank sets the cost of every user's list too. Counting the items only gave a higher rank at scale,
    and so slower lists and a slower refresh, for the same gate nDCG (docs/performance.md)."""
    per_factor = 4 * (3 * n_users + 5 * n_items)
    return max(MIN_FACTORS, int(memory_mb * 2**20 // max(per_factor, 1)))


EXACT_SIDE = 4096  # a smaller side up to this size is fitted exactly (a Gram matrix of at most 128 MB)


def exact_fit(shape: tuple[int, int], r: int) -> bool:
    """Whether the fit is exact (near full rank of a small side): then it is exactly full EASE."""
    small = min(shape)
    return r >= small // 2 and small <= EXACT_SIDE


class FitMatrix:
    """The matrix X (users x items) the model is fitted on, as the fit reads it: through its Gram
    matrix XᵀX and products with it, never whole unless its users side is small. This one holds X in
    this process; recommend/run/tasks/user_tasks.py has one whose rows stay in user blocks on the workers,
    each product a sum over the blocks (a map-reduce). Both give the same fit."""

    def __init__(self, matrix: sp.csr_matrix):
        self.matrix = matrix

    @property
    def shape(self) -> tuple[int, int]:
        return self.matrix.shape

    def gather(self) -> sp.csr_matrix:
        """X whole (asked for only when its users side is at most EXACT_SIDE)."""
        return self.matrix

    def gram(self) -> np.ndarray:
        """XᵀX in float64 (asked for only when its items side is at most EXACT_SIDE)."""
        x = self.matrix.astype(np.float64)
        return _dense(x.T @ x)

    def gram_times(self, z: np.ndarray) -> np.ndarray:
        """XᵀX z in float32, as Xᵀ(X z)."""
        return gram_times(self.matrix, z)

    def columns(self, keep: np.ndarray) -> "FitMatrix":
        """X's columns where `keep` (bool) is true. X in blocks gives itself: its products touch only
        the items each block has, and its arrays are on the workers."""
        return FitMatrix(self.matrix[:, np.flatnonzero(keep)].tocsr())

    def run(self, fn, *args):
        """fn(*args) where the fit's (items x r) arrays are kept: here. A FitMatrix in blocks runs it
        on a worker and returns a handle (a future) instead, which `gram_times` and `run` accept as
        arguments, so that those arrays never come to the driver; `fetch` brings a (small) result."""
        return fn(*args)

    def fetch(self, x):
        """The value behind what `run` or `gram_times` returned."""
        return x


def gram_times(x: sp.csr_matrix, z: np.ndarray) -> np.ndarray:
    """Xᵀ(X z) for one block of rows, float32: a user block's share of the product."""
    return np.asarray(x.T @ np.asarray(x @ z, dtype=np.float32), dtype=np.float32)


class WithTextRows(FitMatrix):
    """X with the items' texts as d extra rows, β·Tᵀ: XᵀX + β²·T Tᵀ (see `fit_behaviour`)."""

    def __init__(self, inner: FitMatrix, text: np.ndarray, weight: float):
        self.inner, self.rows = inner, np.float32(weight) * np.asarray(text[:], np.float32).T  # (d, items)

    @property
    def shape(self) -> tuple[int, int]:
        return self.inner.shape[0] + self.rows.shape[0], self.inner.shape[1]

    def gather(self) -> sp.csr_matrix:
        return sp.vstack([self.inner.gather(), sp.csr_matrix(self.rows)]).tocsr()

    def gram(self) -> np.ndarray:
        rows = self.rows.astype(np.float64)
        return self.inner.gram() + rows.T @ rows

    def gram_times(self, z: np.ndarray) -> np.ndarray:
        return self.inner.run(_plus_rows, self.inner.gram_times(z), self.rows, z)

    def columns(self, keep: np.ndarray) -> "WithTextRows":
        return self  # every item has a text row: none is left out

    def run(self, fn, *args):
        return self.inner.run(fn, *args)

    def fetch(self, x):
        return self.inner.fetch(x)


def _plus_rows(product: np.ndarray, rows: np.ndarray, z: np.ndarray) -> np.ndarray:
    product += rows.T @ (rows @ z)  # in place: the product is this sum's alone
    return product


OVERSAMPLE, POWER_ITERATIONS = 10, 6  # r + 10 columns as sklearn's randomized_svd; 6 products to reach its Krylov space


def right_singular(matrix: FitMatrix, r: int, seed: int = 0, warm: np.ndarray | None = None
                   ) -> tuple[np.ndarray, np.ndarray]:
    """(singular values, right singular vectors as (items, r)) of the top r. Near full rank of a small
    side (r at least half of it, and that side at most EXACT_SIDE) exactly, from that side's Gram
    matrix: then the low-rank EASE below is exactly full EASE. Otherwise by subspace iteration on
    XᵀX (`subspace_svd`), which reads X only through products, so X may stay in blocks. With `warm`
    (items with interactions) and X in this process, the iteration runs on X's warm columns only:
    the others' rows of every product are 0, so it is the same iteration on fewer rows (a sample of
    a few thousand users touches a small share of a million items)."""
    if exact_fit(matrix.shape, r):
        if matrix.shape[0] <= matrix.shape[1]:  # users x users: X Xᵀ = U S² Uᵀ, V = Xᵀ U / S
            x = matrix.gather().astype(np.float64)
            values, u = np.linalg.eigh(_dense(x @ x.T))
            order = np.argsort(values)[::-1][:r]
            keep = values[order] > values.max(initial=0) * 1e-10  # the rank of X, not beyond
            s = np.sqrt(values[order][keep])
            v = np.asarray(x.T @ u[:, order[keep]]) / s
        else:  # items x items: Xᵀ X = V S² Vᵀ
            values, vecs = np.linalg.eigh(matrix.gram())
            order = np.argsort(values)[::-1][:r]
            keep = values[order] > values.max(initial=0) * 1e-10
            s, v = np.sqrt(values[order][keep]), vecs[:, order[keep]]
        return s.astype(np.float32), np.ascontiguousarray(v, dtype=np.float32)
    if warm is not None and min(r + OVERSAMPLE, matrix.shape[1]) <= warm.sum() < len(warm):
        narrow = matrix.columns(warm)
        if narrow is not matrix:  # the same iteration on the items with interactions: the others' rows stay 0
            s, v = subspace_svd(narrow, r, seed, rows=np.flatnonzero(warm), n_rows=len(warm))
            whole = np.zeros((len(warm), v.shape[1]), dtype=np.float32)
            whole[warm] = v
            return s, whole
    return subspace_svd(matrix, r, seed)


def subspace_svd(matrix: FitMatrix, r: int, seed: int = 0, n_iter: int = POWER_ITERATIONS,
                 oversample: int = OVERSAMPLE, rows: np.ndarray | None = None, n_rows: int | None = None
                 ) -> tuple[np.ndarray, np.ndarray]:
    """The top r right singular pairs of X by subspace iteration on XᵀX (Halko et al. 2011, alg. 4.4
    from the items' side): Z ← orth(XᵀX Z) from a seeded Gaussian Z of r + `oversample` columns, then
    Rayleigh–Ritz on Zᵀ XᵀX Z. With 6 products Z spans (XᵀX)⁶Ω, as the right singular vectors of
    sklearn's randomized_svd(n_iter=5) do; every product is a sum over row blocks. Z and the products
    stay where `matrix.run` keeps them (on a worker for X in blocks): the singular vectors returned
    are a handle there too; only the (c x c) Rayleigh–Ritz matrix comes here. `rows` (of `n_rows`):
    X's columns are those items of a wider X, and the start is those rows of the wider one's."""
    n_items = matrix.shape[1]
    c = min(r + oversample, n_items if rows is None else n_rows)
    z = matrix.run(_gaussian, n_items if rows is None else n_rows, c, seed, rows)
    for i in range(n_iter):  # normalised by LU between products (as sklearn does), by QR before the last
        z = matrix.run(_lu_basis if i < n_iter - 1 else _qr_basis, matrix.gram_times(z))
    h = matrix.fetch(matrix.run(_ritz, z, matrix.gram_times(z)))  # Zᵀ XᵀX Z, (c, c)
    values, w = np.linalg.eigh((h + h.T) / 2)
    order = np.argsort(values)[::-1][:r]
    values = np.clip(values[order], 0.0, None)
    return np.sqrt(values).astype(np.float32), matrix.run(_rotate, z, w[:, order].astype(np.float32))


DRAW_ROWS = 1 << 16  # rows of the start drawn, and of the Ritz product summed, at a time


def _gaussian(n: int, c: int, seed: int, rows: np.ndarray | None = None) -> np.ndarray:
    """The seeded (n, c) Gaussian start, float32 (its `rows` only). Drawn a block of rows at a time:
    the generator fills rows in order, so the numbers are one draw's, without an (n x c) float64 array."""
    rng = np.random.default_rng(seed)
    z = np.empty((n if rows is None else len(rows), c), np.float32)
    done = 0
    for start in range(0, n, DRAW_ROWS):
        block = rng.standard_normal((min(DRAW_ROWS, n - start), c))
        if rows is None:
            z[start:start + len(block)] = block
        else:
            mine = rows[(rows >= start) & (rows < start + len(block))]  # `rows` sorted
            z[done:done + len(mine)] = block[mine - start]
            done += len(mine)
    return z


def _lu_basis(y: np.ndarray) -> np.ndarray:
    """P·L of y's LU (scipy's lu(y, permute_l=True)), made in y's memory when y is Fortran-ordered (the
    products are): LAPACK's getrf overwrites y with L and U, U's triangle is cleared, the unit
    diagonal set, and the c row swaps undone in reverse. No second (items x c) array."""
    lu, pivots = scipy.linalg.lu_factor(np.asfortranarray(y), overwrite_a=True, check_finite=False)
    c = lu.shape[1]
    lu[np.triu_indices(c)] = 0
    lu[np.arange(c), np.arange(c)] = 1
    for i in range(len(pivots) - 1, -1, -1):
        if pivots[i] != i:
            lu[[i, pivots[i]]] = lu[[pivots[i], i]]
    return lu


def _qr_basis(y: np.ndarray) -> np.ndarray:
    return scipy.linalg.qr(y, mode="economic", check_finite=False, overwrite_a=True)[0]


def _ritz(z: np.ndarray, gz: np.ndarray) -> np.ndarray:
    """Zᵀ (XᵀX Z) in float64, summed over blocks of rows (no float64 copy of either whole)."""
    h = np.zeros((z.shape[1], gz.shape[1]))
    for start in range(0, len(z), DRAW_ROWS):
        h += z[start:start + DRAW_ROWS].T.astype(np.float64) @ gz[start:start + DRAW_ROWS].astype(np.float64)
    return h


def _rotate(z: np.ndarray, w: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(z @ w, dtype=np.float32)


def _dense(x) -> np.ndarray:
    return x.toarray() if sp.issparse(x) else np.asarray(x)


@dataclass(frozen=True)
class FitStats:
    """What the fit needs to know of X beyond products: summed over the user blocks."""

    warm: np.ndarray     # (items,) bool: the item has interactions
    nnz: int             # interactions
    mean_square: float   # mean of X's squared values (1 for binary input)

    @classmethod
    def of(cls, matrix: sp.csr_matrix) -> "FitStats":
        return cls(np.asarray(matrix.getnnz(axis=0) > 0).ravel(), int(matrix.nnz),
                   float(np.mean(np.square(matrix.data, dtype=np.float64))) if matrix.nnz else 0.0)


def fit_behaviour(matrix: sp.csr_matrix | FitMatrix, factors: int = 1024, l2: float = 200.0, seed: int = 0,
                  memory_mb: float | None = None, text: np.ndarray | None = None, text_weight: float = 0.0,
                  stats: FitStats | None = None) -> Behaviour:
    """Fit rank-`factors` EASE with regularisation `l2` on a binary user x item matrix; the rank is
    at most min(users, items) (where it is full EASE) and, with `memory_mb`, what fits in it
    (`affordable_factors`). `l2` is in the units of binary input: for weighted input it is scaled by
    the mean squared weight. With `text` (items x d) and `text_weight` β > 0, and only where the fit is
    exact, the items' texts join the fit as d extra rows: G = XᵀX + β²·T Tᵀ. Items that go together in
    text then go together in behaviour too, and an item with no events gets its behaviour from its
    text within the fit (such items count as `warm`: `project_cold` leaves them be). At a low rank
    the dense text rows would crowd out the behaviour, so they are left out there. `matrix`: X, or a
    FitMatrix (X in blocks) with its `stats`; then the Behaviour is where `matrix.run` keeps it."""
    if not isinstance(matrix, FitMatrix):
        matrix, stats = FitMatrix(matrix), FitStats.of(matrix)
    n_users, n_items = matrix.shape
    if memory_mb is not None and min(n_users, n_items) > EXACT_SIDE:  # a small side is fitted exactly, in bounded memory
        factors = min(factors, affordable_factors(n_users, n_items, memory_mb))
    r = max(1, min(factors, n_users, n_items))
    warm = stats.warm
    if stats.nnz == 0:
        zeros = np.zeros((n_items, 1), dtype=np.float32)
        return Behaviour(zeros, zeros.copy(), warm)
    # λ in the units of binary input: weights (ratings/5, or counts) scale the Gram matrix by their mean square
    l2 = l2 * stats.mean_square
    fitted = warm
    if text is not None and text_weight > 0 and exact_fit((n_users + text.shape[1], n_items), min(factors, n_users + text.shape[1], n_items)):
        r = min(factors, n_users + text.shape[1], n_items)
        matrix = WithTextRows(matrix, text, text_weight)
        fitted = np.ones(n_items, dtype=bool)  # every item has a place in the fit through its text
    s, v = right_singular(matrix, r, seed, warm=warm)
    return matrix.run(behaviour_from_svd, s, v, warm, fitted, l2)  # where v is: on a worker for X in blocks


def behaviour_from_svd(s: np.ndarray, v: np.ndarray, warm: np.ndarray, fitted: np.ndarray, l2: float) -> Behaviour:
    """Rank-r EASE's two item sides from the top singular pairs (s, v) of X (see the module); `l2`
    already in the units of X. Float32 throughout: (items x r) float64 copies were the largest blocks
    at scale, and v is reused in place."""
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
    from sklearn.linear_model import Ridge  # here: sklearn is a large import; a refresh's driver never fits this

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
