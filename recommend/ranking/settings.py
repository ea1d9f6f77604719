"""The ranking settings: the config's `blend` and `lists` sections, each setting defined once here.

`RankingSettings` is what building the vector space takes from a config (recommend/config.py maps
the sections to it); the defaults come from `recs eval` on ml-latest-small (README, "Quality").
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator


class BlendSettings(BaseModel):
    """How lists blend behaviour (learned from events), text and popularity (recommend/ranking/blend.py)."""

    model_config = ConfigDict(extra="forbid")

    behaviour_weight: float = Field(0.7, ge=0, le=1, description="share of behaviour vs text in the score; 0 = text only")
    popularity_weight: float = Field(0.3, ge=0, description="pull towards popular items for users with little history")
    few_events: float = Field(5.0, gt=0, description="a user with this many items leans half on popularity")
    factors: int = Field(4096, ge=1, description="highest rank of the behaviour model (low-rank EASE); it is also at "
                         "most min(users, items), where it is exactly full EASE (fitted exactly up to 4,096)")
    fit_input: Literal["binary", "weights"] = Field("binary", description="what the behaviour model is fitted on: 1 "
                                                    "for each user-item pair, or the events' weights (events.weights, "
                                                    "summed, no decay), e.g. ratings mapped to weights")
    factor_memory_mb: float | None = Field(192, gt=0, description="memory the behaviour model may take: at scale it "
                                           "sets the rank (never below 64; 64 at 100k users and items), and with it "
                                           "the cost of every list; null: no limit")
    text_in_fit: float = Field(4.0, ge=0, description="weight of the item texts as extra rows of the behaviour fit "
                               "where it is exact (full rank of a small side); 0: the fit sees events only")
    text_dims: int | None = Field(64, ge=1, description="dimensions of the text part of the blended vectors: the "
                                  "encoder's vectors projected onto their main directions, and at most half the "
                                  "behaviour rank (32 at rank 64); null: all of them, up to that")
    l2: float = Field(200.0, gt=0, description="the behaviour model's regularisation (EASE lambda)")
    cold_damping: float = Field(0.5, ge=0, le=1, description="weight of text-predicted behaviour for items with no events")
    new_item_slots: int = Field(1, ge=0, description="places in a user's list that items with no events yet may earn")
    new_item_boost: float = Field(1.5, ge=1, description="a new item earns a place where this times its predicted "
                                  "score beats the list's last score; 1: no help beyond its score")


class ListsSettings(BaseModel):
    """How long the lists are and how fast an event's weight fades."""

    model_config = ConfigDict(extra="forbid")

    k: int = Field(10, ge=1, le=1000, description="items in each precomputed list (and the default of a query)")
    half_life_days: float = Field(14.0, gt=0, description="an event this old counts half in a user's profile")
    block_size: int = Field(8192, ge=1, description="items, or users (about: a user block is a range of a hash of "
                            "the ids), per task on the Dask workers")
    keep: int | None = Field(None, ge=1, le=1000, description="entries stored in each list when more than k "
                             "(a query answers k by default): a filter then finds more of its items in the stored list, "
                             "without a vector query, for keep/k times the lists' size in the store; none: k")

    @model_validator(mode="after")
    def _keep_at_least_k(self):
        if self.keep is not None and self.keep < self.k:
            raise ValueError(f"keep ({self.keep}) is fewer than k ({self.k}): the stored lists hold at least k")
        return self


@dataclass(frozen=True)
class RankingSettings:
    """What building the vector space takes from a config: how events weigh and fade, and the blend."""

    weights: dict[str, float]  # by event type (events.weights; 'default' when there is no event type column)
    half_life_days: float = ListsSettings.model_fields["half_life_days"].default
    blend: BlendSettings = field(default_factory=BlendSettings)
