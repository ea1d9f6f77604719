"""Offline evaluation: split the events, rebuild the lists on the training part with the same code the
refresh runs (`ranking.blend.build_space` and the same list rules, searched exactly), and score them
on the held-out part against popularity and random baselines computed in the same run.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Callable, Literal

import numpy as np
import pandas as pd
import scipy.sparse as sp
from pydantic import BaseModel

from embedder.event_blocks import user_hash
from index.rows import take_rows
from index.search import ExactIndex, keep_allowed
from index.settings import EXACT_INDEX, IndexSettings
from index.tune import build_tuned
from recommend.quality.baselines import implicit_als, item_knn
from recommend.quality.gate import GateFigures, GateSettings
from recommend.quality.metrics import cold_reach, cold_share, coverage, ranking_metrics
from recommend.quality.splits import random_split, temporal_split
from recommend.ranking.blend import Space, build_space
from recommend.ranking.lists import Candidates, recommended_items
from recommend.ranking.settings import BlendSettings, RankingSettings

Split = Literal["random", "temporal"]


class Metrics(BaseModel):
    """One ranker at one K."""

    ndcg: float
    precision: float
    recall: float
    map: float
    hit_rate: float
    users: int
    coverage: float
    cold_share: float     # share of list places holding an item with no training events
    cold_reach: float     # share of lists holding at least one such item
    cold_hit_rate: float  # share of those places that hit a held-out item


class Scored(BaseModel):
    """One ranker at every K; coverage and cold share at the reference K."""

    at: dict[str, Metrics]
    coverage: float
    cold_share: float


class Sweep(BaseModel):
    k: int
    metric: Literal["ndcg"] = "ndcg"
    behaviour_weight: list[float]
    value: list[float]


class EvalResult(BaseModel):
    """`recs eval`'s answer: the lists and the baselines scored on one split."""

    run_id: str | None = None
    split: Split
    test_ratio: float
    seed: int
    k: list[int]
    k_ref: int                # the K that coverage, cold share and the sweep are given at
    train_events: int
    held_out_pairs: int
    users: int
    items: int
    cold_items: int           # items with no training events
    cold_items_projected: int
    half_life_days: float
    blend: BlendSettings
    lists: Scored
    baselines: dict[str, Scored]
    sweep: Sweep | None = None
    written: list[str] = []   # files written beside the run's report


def split_events(events: pd.DataFrame, split: Split, test_ratio: float, seed: int) -> tuple[pd.DataFrame, pd.DataFrame]:
    if split == "random":
        return random_split(events, test_ratio, seed)
    if split == "temporal":
        return temporal_split(events, test_ratio)
    raise ValueError(f"split must be 'random' or 'temporal', got {split!r}")


@dataclass(frozen=True)
class Holdout:
    """How the events are split to score the lists: `split` "random" (each user's pairs, stratified)
    or "temporal" (each user's most recent), the share held out, and a random split's seed."""

    split: Split = "random"
    test_ratio: float = 0.25
    seed: int = 42

    def apply(self, events: pd.DataFrame) -> tuple[pd.DataFrame, pd.DataFrame]:
        """(train, held out)."""
        return split_events(events, self.split, self.test_ratio, self.seed)


def _relevant(held: pd.DataFrame, user_ids: list[str], item_row: dict[str, int]) -> list[np.ndarray]:
    user_row = {u: i for i, u in enumerate(user_ids)}
    out: list[list[int]] = [[] for _ in user_ids]
    for u, i in zip(held["user_id"], held["item_id"]):
        out[user_row[u]].append(item_row[i])
    return [np.asarray(x, dtype=np.int64) for x in out]


def plain_popularity(train: pd.DataFrame, item_ids: list[str]) -> np.ndarray:
    """Per item, how many users interacted with it in `train`: the popularity baseline (no weights,
    no decay, so that it means the same whatever the config)."""
    counts = train.drop_duplicates(["user_id", "item_id"])["item_id"].value_counts()
    return counts.reindex(item_ids, fill_value=0).to_numpy(dtype=np.float64)


def _rank_by(scores: np.ndarray, seen: sp.csr_matrix, k: int) -> np.ndarray:
    """Top-k item rows per user of one shared (items,) ranking, each user's seen items removed."""
    order = np.argsort(-scores, kind="stable")
    seen = sp.csr_matrix(seen)
    depth = min(k + int(np.diff(seen.indptr).max(initial=0)), len(order))
    candidates = np.broadcast_to(order[:depth], (seen.shape[0], depth))
    return keep_allowed(np.zeros(candidates.shape, np.float32), candidates, seen, k, len(order))[1]


def rank_users(space: Space, k: int, blend: BlendSettings, rows: np.ndarray | None = None,
               index: IndexSettings = EXACT_INDEX, progress: Callable[[int], None] | None = None) -> np.ndarray:
    """User lists (len(rows), k) from a built space, made as the refresh makes them (seen items
    excluded, popularity top-up, places new items earn as `blend` says). `index`:
    exact by default, over the item vectors a block at a time (index.search.ExactIndex), so that the
    figure is the model's and no index of all items is held; or other index settings."""
    rows = np.arange(len(space.users)) if rows is None else rows
    if index.kind == "exact":
        index = ExactIndex(space.item_docs)
    else:
        index, _ = build_tuned(space.item_docs, space.item_queries, k, index, space.users, np.flatnonzero(space.has_history))
    candidates = Candidates(space.item_docs, space.popularity, new_items=np.flatnonzero(~space.warm),
                            new_slots=blend.new_item_slots, new_boost=blend.new_item_boost)
    _, ids, _ = recommended_items(index, take_rows(space.users, rows), space.has_history[rows], space.seen[rows], k,
                                  candidates, progress=progress)
    return ids


def lists_for(train: pd.DataFrame, *, item_ids: list[str], text: np.ndarray, user_ids: list[str],
              settings: RankingSettings, k: int, rows: np.ndarray | None = None,
              index: IndexSettings = EXACT_INDEX) -> tuple[np.ndarray, Space]:
    """(ranked item rows (len(rows), k), space) built exactly as the refresh builds user lists;
    `rows`: the user rows to list (default all)."""
    space = build_space(train, item_ids=item_ids, text=text, user_ids=user_ids, settings=settings)
    return rank_users(space, k, settings.blend, rows, index), space


def holdout_score(events: pd.DataFrame, *, item_ids: list[str], text: np.ndarray, settings: RankingSettings,
                  gate: GateSettings, index: IndexSettings = EXACT_INDEX,
                  bar: Callable[[str, int], Callable[[int], None]] | None = None) -> GateFigures:
    """nDCG@k (`gate.k`) of the lists and of popularity on each user's most recent `gate.holdout`
    share of items, the lists rebuilt without them (the quality gate's figures). The model is fitted
    and scored on `gate.max_users` users chosen by a hash of their ids (`hash_sample`: the same users
    from run to run), so the gate costs a small share of the lists; searched exactly by default: the
    gate judges the model, the index's recall is reported apart."""
    holdout, k, max_users = gate.holdout, gate.k, gate.max_users
    sampled = hash_sample(events["user_id"].unique(), max_users)
    events = events[events["user_id"].isin(sampled)]
    train, held = temporal_split(events, holdout)
    item_row = {i: r for r, i in enumerate(item_ids)}
    user_ids = sorted(sampled)
    relevant = _relevant(held, user_ids, item_row)
    rows = np.flatnonzero([len(r) > 0 for r in relevant])
    method = f"hash sample of {max_users} users, temporal holdout {holdout:g}"
    if not len(rows):
        return GateFigures(users=0, holdout=holdout, k=k, method=method)
    space = build_space(train, item_ids=item_ids, text=text, user_ids=user_ids, settings=settings, bar=bar)
    ranked = rank_users(space, k, settings.blend, rows, index,
                        progress=bar("lists of the scored users", int(space.has_history[rows].sum())) if bar else None)
    rel = [relevant[r] for r in rows]
    popular = _rank_by(plain_popularity(train, item_ids), space.seen[rows], k)
    return GateFigures(ndcg=ranking_metrics(ranked, rel, k)["ndcg"], popularity_ndcg=ranking_metrics(popular, rel, k)["ndcg"],
                       users=int(len(rows)), holdout=holdout, k=k, method=method)


TUNE_GRID = {"behaviour_weight": (0.5, 0.7, 0.9), "l2": (100.0, 200.0, 400.0), "text_in_fit": (0.0, 4.0),
             "fit_input": ("binary", "weights")}


class Tried(BaseModel):
    settings: dict
    ndcg: dict[str, float]  # by split


def tune(events: pd.DataFrame, *, item_ids: list[str], text: np.ndarray, settings: RankingSettings,
         holdouts: tuple[Holdout, ...] = (Holdout("random"), Holdout("temporal")), k: int = 10,
         grid: dict | None = None) -> list[Tried]:
    """nDCG@k of every combination of `grid` (blend settings; default TUNE_GRID) on each of the
    `holdouts` (by their split's name), best first by their mean over them. `fit_input: weights` is tried only when the events' weights
    differ from one another. Each is the lists the refresh would make, fitted on the training part."""
    grid = dict(grid or TUNE_GRID)
    if len(set(settings.weights.values())) < 2:
        grid["fit_input"] = ("binary",)
    names = list(grid)
    combos = [dict(zip(names, values)) for values in np.array(np.meshgrid(*[np.array(grid[n], dtype=object) for n in names]))
              .T.reshape(-1, len(names))]
    prepared = {}
    for holdout in holdouts:
        train, held = holdout.apply(events)
        user_ids = sorted(events["user_id"].unique())
        prepared[holdout.split] = (train, _relevant(held, user_ids, {i: r for r, i in enumerate(item_ids)}), user_ids)
    tried = []
    for combo in combos:
        blend = settings.blend.model_copy(update=combo)
        ndcg = {}
        for split, (train, relevant, user_ids) in prepared.items():
            ranked, _ = lists_for(train, item_ids=item_ids, text=text, user_ids=user_ids,
                                  settings=replace(settings, blend=blend), k=k)
            ndcg[split] = round(ranking_metrics(ranked, relevant, k)["ndcg"], 4)
        tried.append(Tried(settings=combo, ndcg=ndcg))
    return sorted(tried, key=lambda t: -np.mean(list(t.ndcg.values())))


def hash_sample(user_ids, n: int) -> list:
    """The `n` users with the smallest hash of their id (all of them when there are fewer): a sample
    that changes only as users come and go, not from run to run (the refresh reads these same users
    from its first user blocks, embedder/event_blocks.py)."""
    ids = pd.Series(np.asarray(user_ids, dtype=object))
    if len(ids) <= n:
        return ids.tolist()
    hashes = user_hash(ids)
    return ids.iloc[np.argpartition(hashes, n - 1)[:n]].tolist()


def evaluate(events: pd.DataFrame, *, item_ids: list[str], text: np.ndarray, settings: RankingSettings,
             holdout: Holdout = Holdout(), ks: tuple[int, ...] = (1, 5, 10, 20), sweep: tuple[float, ...] = ()) -> EvalResult:
    """Score the lists and the baselines at every K in `ks`, on the `holdout` split of the events;
    coverage and cold share are also given at `k_ref` (10, or the largest K below it); with `sweep`,
    nDCG@k_ref per behaviour weight."""
    split, test_ratio, seed = holdout.split, holdout.test_ratio, holdout.seed
    train, held = holdout.apply(events)
    item_row = {i: r for r, i in enumerate(item_ids)}
    user_ids = sorted(events["user_id"].unique())
    relevant = _relevant(held, user_ids, item_row)
    k_max = max(ks)
    space = build_space(train, item_ids=item_ids, text=text, user_ids=user_ids, settings=settings)
    # a list of K is made for each K (the last places of a list are special: new items, top-ups)
    lists = {k: rank_users(space, k, settings.blend) for k in ks}
    rng = np.random.default_rng(seed)
    baselines = {"popularity": _rank_by(plain_popularity(train, item_ids), space.seen, k_max),
                 "random": _rank_by(rng.random(len(item_ids)), space.seen, k_max),
                 "item-knn": item_knn(space.seen, k_max)}
    als = implicit_als(space.seen, k_max)  # when the bench extra (implicit) is installed
    if als is not None:
        baselines["als"] = als
    cold = ~space.warm
    k_ref = max([k for k in ks if k <= 10] or [min(ks)])

    def scored(by_k: dict[int, np.ndarray]) -> Scored:
        at = {}
        for k, r in by_k.items():
            reach, hit_rate = cold_reach(r[:, :k], cold, relevant)
            at[str(k)] = Metrics(**ranking_metrics(r, relevant, k), coverage=coverage(r[:, :k], len(item_ids)),
                                 cold_share=cold_share(r[:, :k], cold), cold_reach=reach, cold_hit_rate=hit_rate)
        return Scored(at=at, coverage=at[str(k_ref)].coverage, cold_share=at[str(k_ref)].cold_share)

    result = EvalResult(split=split, test_ratio=test_ratio, seed=seed, k=list(ks), k_ref=k_ref, train_events=len(train),
                        held_out_pairs=len(held), users=len(user_ids), items=len(item_ids), cold_items=int(cold.sum()),
                        cold_items_projected=space.cold_items_projected, half_life_days=settings.half_life_days,
                        blend=settings.blend, lists=scored(lists),
                        baselines={name: scored({k: r for k in ks}) for name, r in baselines.items()})
    if sweep:
        values = []
        for w in sweep:
            blend = settings.blend.model_copy(update={"behaviour_weight": w})
            r, _ = lists_for(train, item_ids=item_ids, text=text, user_ids=user_ids,
                             settings=replace(settings, blend=blend), k=k_ref)
            values.append(ranking_metrics(r, relevant, k_ref)["ndcg"])
        result.sweep = Sweep(k=k_ref, behaviour_weight=list(sweep), value=values)
    return result
