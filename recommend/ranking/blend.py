"""One vector space that blends behaviour, text and popularity, searched with one inner product.

An item is [√w_b·behaviour, √w_t·text, √w_p·popularity] and a user [√w_b·b̂_u, √w_t·t̂_u, √w_p·α_u], so

    user · item = w_b·(behaviour score) + w_t·(text cosine) + w_p·α_u·(popularity of the item)

with w_t = 1 - w_b. b̂_u is the user's behaviour vector (sum of the query sides of their items,
see behaviour.py) and t̂_u their text profile, both unit length. α_u = m / (m + n_u) for a user with
n_u items in their history: a user with little history leans on popularity, a long history on its own.
The item→item query of an item is [√w_b·q̂_j, √w_t·text_j, 0].

`build_space` is the whole step from events to these vectors; the refresh and `recs eval` both call
it, so what is evaluated is what is published.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Callable

import numpy as np
import pandas as pd
import scipy.sparse as sp

from embedder.event_blocks import user_hash
from index.rows import Rows
from recommend.ranking.behaviour import FitMatrix, FitStats, behaviour_matrix, fit_behaviour, project_cold
from recommend.ranking.profiles import interactions, popularity, rows_dot, user_profiles
from recommend.ranking.settings import RankingSettings


@dataclass(frozen=True)
class Layout:
    """How the blended vectors are laid out and weighted (published with the version, so that the
    real-time path builds the same user vectors)."""

    behaviour_dim: int
    text_dim: int
    behaviour_weight: float
    popularity_weight: float
    few_events: float  # m in α_u = m / (m + n_u)
    behaviour_scale: float | None = None  # users' behaviour part is divided by it; None (older versions): unit length

    def to_dict(self) -> dict:
        return asdict(self)

    @property
    def text_weight(self) -> float:
        return 1.0 - self.behaviour_weight


def _unit(x: np.ndarray) -> np.ndarray:
    norms = np.linalg.norm(x, axis=1, keepdims=True)
    return np.divide(x, norms, out=np.zeros_like(x), where=norms > 0).astype(np.float32)


def project_text(text: np.ndarray, dims: int | None) -> np.ndarray:
    """Item text vectors (n, d: an array or a row source) onto their `dims` main directions (float32),
    for the blend: inner products are kept as far as that many dimensions can (the uncentred SVD, as
    for the behaviour side, from the d x d Gram matrix summed a block at a time), and every list
    search costs in proportion to the dimensions. `dims` None or >= d: as given (as an array)."""
    if dims is None or dims >= text.shape[1] or len(text) == 0:
        return text if isinstance(text, np.ndarray) else text[:]  # a row source (a file) as an array
    gram = np.zeros((text.shape[1], text.shape[1]), dtype=np.float64)
    for start in range(0, len(text), 65_536):
        block = np.asarray(text[start:start + 65_536], dtype=np.float64)
        gram += block.T @ block
    values, vectors = np.linalg.eigh(gram)
    order = np.argsort(values)[::-1][:min(dims, len(text))]  # fewer when there are fewer texts than dims
    basis = np.ascontiguousarray(vectors[:, order], dtype=np.float32)
    out = np.empty((len(text), basis.shape[1]), dtype=np.float32)
    for start in range(0, len(text), 65_536):  # a block at a time: no (n, d) float32 copy
        out[start:start + 65_536] = np.asarray(text[start:start + 65_536], dtype=np.float32) @ basis
    return out


def popularity_feature(pop: np.ndarray) -> np.ndarray:
    """Popularity on a 0..1 log scale (the most popular item is 1)."""
    top = np.log1p(pop.max()) if len(pop) and pop.max() > 0 else 1.0
    return (np.log1p(np.maximum(pop, 0)) / top).astype(np.float32)


def item_documents(behaviour_docs: np.ndarray, text: np.ndarray, pop_feature: np.ndarray, layout: Layout) -> np.ndarray:
    return side_by_side(len(text), (lambda: np.sqrt(layout.behaviour_weight) * behaviour_docs, behaviour_docs.shape[1]),
                        (lambda: np.sqrt(layout.text_weight) * text, text.shape[1]),
                        (lambda: np.sqrt(layout.popularity_weight) * pop_feature[:, None], 1))


def side_by_side(n: int, *parts: tuple[Callable[[], np.ndarray], int]) -> np.ndarray:
    """np.hstack of the parts, as float32: each part (a function giving it, and its width) made and
    cast into one float32 array in turn, so the whole is never held in float64 (the parts are, as
    numpy promotes them); the same numbers as hstack(...).astype(float32)."""
    out = np.empty((n, sum(width for _, width in parts)), np.float32)
    at = 0
    for make, width in parts:
        out[:, at:at + width] = make()
        at += width
    return out


SCALE_SAMPLE = 500  # users whose best behaviour scores set the behaviour part's scale (a mean of maxima)


def scale_sample(user_hashes: np.ndarray, n_history: np.ndarray, n: int = SCALE_SAMPLE) -> np.ndarray:
    """Rows of the `n` users with history whose id hashes (embedder.event_blocks.user_hash) are the
    smallest: the same users whether the rows are all in one process or in user blocks (which are
    ranges of that hash, so these users are in the first blocks)."""
    rows = np.flatnonzero(n_history > 0)
    return np.sort(rows[np.argsort(user_hashes[rows], kind="stable")[:n]])


def behaviour_scale(model, sample: sp.csr_matrix) -> float:
    """One constant for every user's behaviour part: the mean over a sample of users (`scale_sample`;
    `sample` is their rows of the fitted matrix) of their best behaviour score among items they have
    not seen. Divided by it, a user's top behaviour score is about 1, on the scale of the text cosine,
    so `behaviour_weight` shares the score between them as it says; a unit-length user vector made
    behaviour scores small beside the text."""
    sample = sp.csr_matrix(sample)
    if not sample.nnz:
        return 1.0
    sums = model.users(sample)
    best = np.full(sample.shape[0], -np.inf, dtype=np.float32)
    for start in range(0, model.item_vectors.shape[0], 65_536):  # a block of items at a time
        scores = sums @ model.item_vectors[start:start + 65_536].T
        seen = sample[:, start:start + 65_536].tocoo()
        scores[seen.row, seen.col] = -np.inf
        best = np.maximum(best, scores.max(axis=1, initial=-np.inf))
    scale = float(np.mean(best[np.isfinite(best)])) if np.isfinite(best).any() else 1.0
    return scale if scale > 0 else 1.0


def query_scale(behaviour_queries: np.ndarray) -> float:
    """The 99th percentile of the non-zero behaviour query norms (see `item_queries`)."""
    norms = np.linalg.norm(behaviour_queries, axis=1)
    return float(np.percentile(norms[norms > 0], 99)) if (norms > 0).any() else 1.0


def item_queries(behaviour_queries: np.ndarray, text: np.ndarray, layout: Layout, scale: float | None = None) -> np.ndarray:
    """Item→item queries. The behaviour part is divided by one constant (the 99th percentile of the
    norms over all items, `query_scale`), not per item, so that an item with little evidence (a cold
    item's damped prediction) asks with less weight on behaviour and more on its text."""
    scale = query_scale(behaviour_queries) if scale is None else scale
    return side_by_side(len(text), (lambda: np.sqrt(layout.behaviour_weight) * behaviour_queries / scale,
                                     behaviour_queries.shape[1]),
                        (lambda: np.sqrt(layout.text_weight) * text, text.shape[1]), (lambda: 0.0, 1))


def item_queries_from_raw(raw: np.ndarray, layout: Layout) -> np.ndarray:
    """Item→item queries from the published raw query rows (`blend_query`): behaviour part, then text."""
    return item_queries(raw[:, :layout.behaviour_dim], raw[:, layout.behaviour_dim:], layout)


def user_vectors(behaviour_sum: np.ndarray, text_profile: np.ndarray, n_history: np.ndarray, layout: Layout) -> np.ndarray:
    alpha = layout.few_events / (layout.few_events + np.asarray(n_history, dtype=np.float32))
    behaviour = _unit(behaviour_sum) if layout.behaviour_scale is None else behaviour_sum / np.float32(layout.behaviour_scale)
    return np.hstack([np.sqrt(layout.behaviour_weight) * behaviour, np.sqrt(layout.text_weight) * _unit(text_profile),
                      np.sqrt(layout.popularity_weight) * alpha[:, None]]).astype(np.float32)


def user_from_items(query_rows: np.ndarray, layout: Layout) -> np.ndarray:
    """The real-time path: a user vector from the published query-side rows (`blend_query` raw parts) of
    the items they just touched, built as `user_vectors` builds a batch user."""
    b, t = layout.behaviour_dim, layout.text_dim
    behaviour_sum = query_rows[:, :b].sum(axis=0, keepdims=True)
    text_profile = query_rows[:, b:b + t].sum(axis=0, keepdims=True)
    return user_vectors(behaviour_sum, text_profile, np.array([len(query_rows)]), layout)[0]


@dataclass
class ItemSide:
    """What every block of users or items is scored against: items x a few dozen dimensions, rows
    aligned with the item ids (fits one process; the refresh saves it in the run folder for the
    workers, recommend/run/tasks/list_tasks.py). The blended rows are computed from it a block at a time."""

    behaviour_docs: np.ndarray     # (items, r) the behaviour model's document side
    behaviour_queries: np.ndarray  # (items, r) its query side (a user is the sum over their history)
    text: np.ndarray               # (items, t) text vectors, projected (`project_text`)
    pop_feature: np.ndarray        # (items,) popularity on a 0..1 log scale
    popularity: np.ndarray         # (items,) decayed weights: the fallback ranking
    warm: np.ndarray               # (items,) bool: the item has interactions
    layout: Layout
    query_scale: float             # see `item_queries`

    def docs(self) -> Rows:
        """(items, D): what the index holds."""
        return Rows(len(self.text), self.layout.behaviour_dim + self.layout.text_dim + 1,
                    lambda idx: item_documents(self.behaviour_docs[idx], self.text[idx], self.pop_feature[idx], self.layout))

    def queries(self) -> Rows:
        """(items, D): the item->item queries."""
        return Rows(len(self.text), self.layout.behaviour_dim + self.layout.text_dim + 1,
                    lambda idx: item_queries(self.behaviour_queries[idx], self.text[idx], self.layout, self.query_scale))

    def raw_queries(self) -> Rows:
        """(items, r + t): unweighted behaviour query side and text, for the real-time path."""
        return Rows(len(self.text), self.layout.behaviour_dim + self.layout.text_dim,
                    lambda idx: np.hstack([self.behaviour_queries[idx], self.text[idx]]).astype(np.float32))


@dataclass
class UserBlock:
    """Some users' interactions, rows aligned: all a user block's vectors and exclusions come from."""

    weighted: sp.csr_matrix  # (users, items) decayed weights: the text profile
    binary: sp.csr_matrix    # (users, items) 1 per (user, item) pair: what they have seen
    fit_on: sp.csr_matrix    # (users, items) the behaviour model's input (`binary` or undecayed weights)

    def rows(self, idx) -> "UserBlock":
        """The rows `idx` (an index array or a slice), as a block of their own."""
        binary = self.binary[idx]
        return UserBlock(self.weighted[idx], binary, binary if self.fit_on is self.binary else self.fit_on[idx])

    @property
    def n_history(self) -> np.ndarray:
        return np.diff(self.binary.indptr)


def user_block_vectors(block: UserBlock, items: ItemSide) -> np.ndarray:
    """The blended vectors (users, D) of a block of users."""
    n_history = block.n_history
    profile, _ = user_profiles(block.weighted, items.text)
    faded = (n_history > 0) & ~np.any(profile, axis=1)  # weights that decayed to 0: the plain mean instead
    if faded.any():
        profile[faded] = _unit(rows_dot(block.binary[np.flatnonzero(faded)], items.text))
    return user_vectors(np.asarray(block.fit_on @ items.behaviour_queries, dtype=np.float32), profile, n_history,
                        items.layout)


@dataclass
class Space:
    """Everything the lists are searched from, rows aligned with `item_ids` and `user_ids`."""

    items: ItemSide
    user_rows: UserBlock         # every user's interactions
    item_docs: Rows              # (items, D) what the index holds, computed per block
    item_queries: Rows           # (items, D) queries for item -> item, computed per block
    item_raw_queries: Rows       # (items, r + d) unweighted behaviour query side and text, for the real-time path
    users: Rows                  # (users, D), computed per block from the interaction matrix
    has_history: np.ndarray      # (users,) bool
    few_events: np.ndarray       # (users,) bool: fewer than `layout.few_events` items of history
    seen: sp.csr_matrix          # (users, items) binary: what each user interacted with (excluded from their list)
    popularity: np.ndarray       # (items,) decayed weights
    warm: np.ndarray             # (items,) bool: the item has interactions
    layout: Layout
    cold_items_projected: int


def user_block(events: pd.DataFrame, *, n_items: int, user_ids, settings: RankingSettings,
               item_row: dict[str, int] | None = None, now: pd.Timestamp | None = None) -> UserBlock:
    """The interaction matrices of `user_ids` (rows in that order) from their events. `item_row`
    None: the events carry item rows (`item`); `now`: the newest event of the whole data."""
    weighted = interactions(events, item_row, n_items, settings.weights, settings.half_life_days, user_ids, now)
    binary = behaviour_matrix(weighted)
    fit_on = binary if settings.blend.fit_input == "binary" else interactions(
        events, item_row, n_items, settings.weights, float("inf"), user_ids, now)
    return UserBlock(weighted, binary, fit_on)


def fit_item_side(matrix: FitMatrix, stats: FitStats, pop: np.ndarray, text: np.ndarray, settings: RankingSettings,
                  scale_rows: sp.csr_matrix, bar: Callable[[str, int], Callable[[int], None]] | None = None):
    """The item side from the behaviour fit on `matrix` (X whole or in user blocks, with its `stats`),
    the items' decayed popularity `pop` and text vectors (an array or a row source; a
    `index.rows.ParquetRows` travels to a worker as its path); `scale_rows`: the fitted matrix's rows
    of the `scale_sample` users. Returns (ItemSide, how many items got behaviour from their text
    alone), where `matrix.run` keeps the fit's arrays: here for X whole, a future on a worker for X in
    blocks (recommend/run/tasks/item_tasks.py saves it there)."""
    blend = settings.blend
    tick = bar(f"behaviour fit ({matrix.shape[0]} users x {matrix.shape[1]} items)", 1) if bar else None
    model = fit_behaviour(matrix, blend.factors, blend.l2, memory_mb=blend.factor_memory_mb, text=text,
                          text_weight=blend.text_in_fit, stats=stats)
    side = matrix.run(item_side_of, model, text, pop, settings, scale_rows)
    if tick:
        tick(1)
    return side


def item_side_of(model, text: np.ndarray, pop: np.ndarray, settings: RankingSettings,
                 scale_rows: sp.csr_matrix) -> tuple[ItemSide, int]:
    """The item side from a fitted behaviour model (`fit_item_side`)."""
    blend = settings.blend
    # the text part shrinks with the rank at scale: every list search costs in proportion to the dimensions
    projected_text = project_text(text, min(blend.text_dims or text.shape[1], max(16, model.item_vectors.shape[1] // 2)))
    projected = project_cold(model, text, damping=blend.cold_damping)  # the ridge map reads all text dimensions
    layout = Layout(int(model.item_vectors.shape[1]), int(projected_text.shape[1]), float(blend.behaviour_weight),
                    float(blend.popularity_weight), float(blend.few_events), behaviour_scale(model, scale_rows))
    return ItemSide(model.item_vectors, model.item_queries, projected_text, popularity_feature(pop), pop, model.warm,
                    layout, query_scale(model.item_queries)), projected


def build_space(events: pd.DataFrame, *, item_ids: list[str], text: np.ndarray, user_ids: list[str],
                settings: RankingSettings, bar: Callable[[str, int], Callable[[int], None]] | None = None) -> Space:
    """From accepted events and item text vectors to the blended item and user vectors, all in this
    process (`recs eval`, the gate). The refresh builds the same from user blocks on the workers
    (recommend/run/tasks/user_tasks.py). `bar(description, total)`, when given, makes a progress callback
    for the behaviour fit."""
    rows = user_block(events, n_items=len(item_ids), user_ids=user_ids, settings=settings,
                      item_row={i: r for r, i in enumerate(item_ids)})
    n_history = rows.n_history
    sample = scale_sample(user_hash(user_ids), n_history)
    items, projected = fit_item_side(FitMatrix(rows.fit_on), FitStats.of(rows.fit_on), popularity(rows.weighted), text,
                                     settings, rows.fit_on[sample], bar)
    has_history = n_history > 0
    return Space(
        items=items, user_rows=rows, item_docs=items.docs(), item_queries=items.queries(),
        item_raw_queries=items.raw_queries(),
        users=Rows(len(user_ids), int(items.layout.behaviour_dim + items.layout.text_dim + 1),
                   lambda idx: user_block_vectors(rows.rows(idx), items)),
        has_history=has_history, few_events=has_history & (n_history < settings.blend.few_events),
        seen=rows.binary, popularity=items.popularity, warm=items.warm, layout=items.layout,
        cold_items_projected=projected)
