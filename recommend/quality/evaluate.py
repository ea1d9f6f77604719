"""Offline evaluation: split the events, rebuild the lists on the training part with the same code the
refresh runs (`blend.build_space` + exact FAISS search), and score them on the held-out part against
popularity and random baselines computed in the same run.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np
import pandas as pd

from index.search import StreamedExact
from index.tune import EXACT_INDEX, IndexSettings, build_tuned
from recommend.ranking.blend import build_space, take_rows
from recommend.ranking.lists import picked, recommended_items
from recommend.quality.metrics import cold_share, coverage, ranking_metrics
from recommend.quality.splits import random_split, temporal_split


@dataclass(frozen=True)
class BlendSettings:
    """The list-building settings that evaluation varies (config: lists + blend sections)."""

    behaviour_weight: float = 0.95
    popularity_weight: float = 0.3
    factors: int = 256
    l2: float = 200.0
    few_events: float = 5.0
    cold_damping: float = 0.5
    new_item_slots: int = 1
    half_life_days: float = 14.0
    factor_memory_mb: float | None = 1024


def space_for(events: pd.DataFrame, item_ids: list[str], text: np.ndarray, user_ids: list[str],
              weights: dict[str, float], settings: BlendSettings):
    """`blend.build_space` with the settings of a config (see `pipeline.blend_settings`)."""
    return build_space(events, item_ids, text, user_ids, weights, settings.half_life_days, settings.behaviour_weight,
                       settings.popularity_weight, settings.factors, settings.l2, settings.few_events,
                       settings.cold_damping, settings.factor_memory_mb)


def split_events(events: pd.DataFrame, split: str, test_ratio: float, seed: int) -> tuple[pd.DataFrame, pd.DataFrame]:
    if split == "random":
        return random_split(events, test_ratio, seed)
    if split == "temporal":
        return temporal_split(events, test_ratio)
    raise ValueError(f"split must be 'random' or 'temporal', got {split!r}")


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


def _rank_by(scores: np.ndarray, seen: list[np.ndarray], k: int) -> np.ndarray:
    """Top-k item rows per user of a (users, items) score matrix or one shared (items,) ranking, seen removed."""
    shared = scores.ndim == 1
    order = np.argsort(-scores, kind="stable") if shared else None
    out = np.full((len(seen), k), -1, dtype=np.int64)
    for u, s in enumerate(seen):
        ranking = order if shared else np.argsort(-scores[u], kind="stable")
        ranking = ranking[~np.isin(ranking, s)] if len(s) else ranking
        out[u, :min(k, len(ranking))] = ranking[:k]
    return out


def rank_users(space, k: int, new_slots: int, rows: np.ndarray | None = None,
               index: IndexSettings = EXACT_INDEX) -> np.ndarray:
    """User lists (len(rows), k) from a built space, made as the refresh makes them (seen items
    excluded, popularity top-up, the last `new_slots` places for items with no events). `index`:
    exact by default, streamed over the item vectors a block at a time (index.search.StreamedExact),
    so that the figure is the model's and no index of all items is held; or other index settings."""
    rows = np.arange(len(space.users)) if rows is None else rows
    if index.kind == "exact":
        index = StreamedExact(space.item_docs)
    else:
        index, _ = build_tuned(space.item_docs, space.item_queries, k, index, space.users, np.flatnonzero(space.has_history))
    _, ids, _ = recommended_items(index, take_rows(space.users, rows), space.has_history[rows], picked(space.seen, rows), k,
                                  space.item_docs, space.popularity, new_items=np.flatnonzero(~space.warm),
                                  new_slots=new_slots)
    return ids


def lists_for(train: pd.DataFrame, item_ids: list[str], text: np.ndarray, user_ids: list[str],
              weights: dict[str, float], settings: BlendSettings, k: int, rows: np.ndarray | None = None,
              index: IndexSettings = EXACT_INDEX):
    """(ranked item rows (len(rows), k), space) built exactly as the refresh builds user lists;
    `rows`: the user rows to list (default all)."""
    space = space_for(train, item_ids, text, user_ids, weights, settings)
    return rank_users(space, k, settings.new_item_slots, rows, index), space


def holdout_score(events: pd.DataFrame, item_ids: list[str], text: np.ndarray, weights: dict[str, float],
                  settings: BlendSettings, holdout: float, k: int, max_users: int, seed: int = 42,
                  index: IndexSettings = EXACT_INDEX) -> dict:
    """nDCG@k of the lists and of popularity on each user's most recent `holdout` share of items,
    the lists rebuilt without them (the quality gate's figures). At most `max_users` users are scored,
    searched exactly by default: the gate judges the model, the index's recall is reported apart.
    At 1M items the refresh's tuned HNSW index, built here too, added 1.1 GB to the gate's peak."""
    train, held = temporal_split(events, holdout)
    item_row = {i: r for r, i in enumerate(item_ids)}
    user_ids = sorted(events["user_id"].unique())
    relevant = _relevant(held, user_ids, item_row)
    rows = np.flatnonzero([len(r) > 0 for r in relevant])
    if len(rows) > max_users:
        rows = np.sort(np.random.default_rng(seed).choice(rows, max_users, replace=False))
    if not len(rows):
        return {"ndcg": None, "popularity_ndcg": None, "users": 0, "holdout": holdout, "k": k}
    ranked, space = lists_for(train, item_ids, text, user_ids, weights, settings, k, rows, index)
    rel = [relevant[r] for r in rows]
    popular = _rank_by(plain_popularity(train, item_ids), [space.seen[r] for r in rows], k)
    return {"ndcg": ranking_metrics(ranked, rel, k)["ndcg"], "popularity_ndcg": ranking_metrics(popular, rel, k)["ndcg"],
            "users": int(len(rows)), "holdout": holdout, "k": k}


def evaluate(events: pd.DataFrame, item_ids: list[str], text: np.ndarray, weights: dict[str, float],
             settings: BlendSettings, split: str = "random", test_ratio: float = 0.25, seed: int = 42,
             ks: tuple[int, ...] = (1, 5, 10, 20), sweep: tuple[float, ...] = ()) -> dict:
    """Score the lists and the baselines at every K in `ks`; coverage and cold share are also given
    at `k_ref` (10, or the largest K below it); with `sweep`, nDCG@k_ref per behaviour weight.
    Returns a JSON-ready dict."""
    train, held = split_events(events, split, test_ratio, seed)
    item_row = {i: r for r, i in enumerate(item_ids)}
    user_ids = sorted(events["user_id"].unique())
    relevant = _relevant(held, user_ids, item_row)
    k_max = max(ks)
    space = space_for(train, item_ids, text, user_ids, weights, settings)
    # a list of K is made for each K (the last places of a list are special: new items, top-ups)
    lists = {k: rank_users(space, k, settings.new_item_slots) for k in ks}
    rng = np.random.default_rng(seed)
    baselines = {"popularity": _rank_by(plain_popularity(train, item_ids), space.seen, k_max),
                 "random": _rank_by(rng.random(len(item_ids)), space.seen, k_max)}
    cold = ~space.warm
    k_ref = max([k for k in ks if k <= 10] or [min(ks)])

    def scored(by_k: dict[int, np.ndarray]) -> dict:
        at = {str(k): {**ranking_metrics(r, relevant, k), "coverage": coverage(r[:, :k], len(item_ids)),
                       "cold_share": cold_share(r[:, :k], cold)} for k, r in by_k.items()}
        return {"at": at, "coverage": at[str(k_ref)]["coverage"], "cold_share": at[str(k_ref)]["cold_share"]}

    result = {"split": split, "test_ratio": test_ratio, "seed": seed, "k": list(ks), "k_ref": k_ref,
              "train_events": len(train), "held_out_pairs": len(held), "users": len(user_ids), "items": len(item_ids),
              "cold_items": int(cold.sum()), "cold_items_projected": space.cold_items_projected,
              "settings": settings.__dict__, "lists": scored(lists),
              "baselines": {name: scored({k: r for k in ks}) for name, r in baselines.items()}}
    if sweep:
        result["sweep"] = {"k": k_ref, "metric": "ndcg", "behaviour_weight": [], "value": []}
        for w in sweep:
            r, _ = lists_for(train, item_ids, text, user_ids, weights, replace(settings, behaviour_weight=w), k_ref)
            result["sweep"]["behaviour_weight"].append(w)
            result["sweep"]["value"].append(ranking_metrics(r, relevant, k_ref)["ndcg"])
    return result


def evaluate_run(config, run_id: str | None = None, split: str = "random", test_ratio: float = 0.25, seed: int = 42,
                 ks: tuple[int, ...] = (1, 5, 10, 20), sweep: tuple[float, ...] = (), plots: bool = True) -> dict:
    """Evaluate the lists a refresh run produces, from that run's own accepted items, events and
    embeddings (the newest completed run by default). Writes eval-<split>.json, and plots when asked,
    into the run's folder; returns the result with `written` listing those files."""
    from pathlib import Path

    import pyarrow.parquet as pq

    from embedder.artifacts import arrow_to_vectors, write_json
    from embedder.errors import RecsError
    from recommend.run.pipeline import blend_settings, event_weights
    from recommend.run.workdir import latest_report, runs_dir

    report = latest_report(config.workdir, run_id)
    if report is None:
        raise RecsError(f"no completed refresh run in {runs_dir(config.workdir)}"
                        + (f" with id {run_id!r}" if run_id else "") + "; run `recs refresh` first")
    run = Path(report["run_dir"])
    emb = pq.read_table(run / "embeddings.parquet")
    events = pd.read_parquet(run / "events.parquet")
    result = evaluate(events, emb["item_id"].to_pylist(), arrow_to_vectors(emb["vector"]), event_weights(config.events),
                      blend_settings(config), split, test_ratio, seed, ks, sweep)
    result["run_id"] = report["run_id"]
    written = [str(write_json(result, run / f"eval-{split}.json"))]
    if plots:
        from recommend.quality.plots import plot_eval

        written += plot_eval(result, run, prefix=f"eval-{split}")
    result["written"] = written
    return result
