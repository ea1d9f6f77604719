"""Train/test splits of an event log for offline evaluation.

Splits are made over (user, item) pairs, not events, so that an item a user viewed and then bought is
never in both parts. A user keeps at least one pair for training.
- `random_split`: per user, a seeded random `test_ratio` of their pairs is held out (stratified by user).
- `temporal_split`: per user, the pairs they touched most recently are held out.
"""

from __future__ import annotations

import numpy as np
import pandas as pd


def _pairs(events: pd.DataFrame) -> pd.DataFrame:
    """One row per (user, item) with the time of its latest event, in a stable order."""
    return (events.groupby(["user_id", "item_id"], sort=True, observed=True)["ts"].max()
            .reset_index())


def _held_out_count(sizes: pd.Series, test_ratio: float) -> pd.Series:
    return np.minimum(np.round(sizes * test_ratio).astype(int), sizes - 1)


def _apply(events: pd.DataFrame, pairs: pd.DataFrame, test: np.ndarray) -> tuple[pd.DataFrame, pd.DataFrame]:
    held = pairs.loc[test, ["user_id", "item_id"]]
    key = pd.MultiIndex.from_frame(events[["user_id", "item_id"]])
    in_test = key.isin(pd.MultiIndex.from_frame(held))
    return events[~in_test].reset_index(drop=True), held.reset_index(drop=True)


def random_split(events: pd.DataFrame, test_ratio: float = 0.25, seed: int = 42) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(training events, held-out pairs (user_id, item_id)). The same seed gives the same split."""
    pairs = _pairs(events)
    rng = np.random.default_rng(seed)
    pairs["_r"] = rng.random(len(pairs))
    rank = pairs.groupby("user_id", sort=False)["_r"].rank(method="first").to_numpy() - 1
    sizes = pairs.groupby("user_id", sort=False)["item_id"].transform("size")
    return _apply(events, pairs, rank < _held_out_count(sizes, test_ratio).to_numpy())


def temporal_split(events: pd.DataFrame, test_ratio: float = 0.25) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(training events, held-out pairs): each user's most recent `test_ratio` of pairs held out."""
    pairs = _pairs(events)
    rank = pairs.groupby("user_id", sort=False)["ts"].rank(method="first", ascending=False).to_numpy() - 1
    sizes = pairs.groupby("user_id", sort=False)["item_id"].transform("size")
    return _apply(events, pairs, rank < _held_out_count(sizes, test_ratio).to_numpy())
