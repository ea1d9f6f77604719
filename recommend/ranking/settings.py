"""The ranking settings: the config's `blend` and `lists` sections, each setting defined once here.

`RankingSettings` is what building the vector space takes from a config (recommend/config.py maps
the sections to it); the defaults come from `recs eval` on ml-latest-small (README, "Quality").
"""

from __future__ import annotations

from dataclasses import dataclass, field

from pydantic import BaseModel, ConfigDict, Field


class BlendSettings(BaseModel):
    """How lists blend behaviour (learned from events), text and popularity (recommend/ranking/blend.py)."""

    model_config = ConfigDict(extra="forbid")

    behaviour_weight: float = Field(0.95, ge=0, le=1, description="share of behaviour vs text in the score; 0 = text only")
    popularity_weight: float = Field(0.3, ge=0, description="pull towards popular items for users with little history")
    few_events: float = Field(5.0, gt=0, description="a user with this many items leans half on popularity")
    factors: int = Field(256, ge=1, description="rank of the behaviour model (low-rank EASE)")
    factor_memory_mb: float | None = Field(1024, gt=0, description="lower the rank to what fits in this much memory "
                                           "(256 stands up to ~130k users and items); null: no limit")
    l2: float = Field(200.0, gt=0, description="the behaviour model's regularisation (EASE lambda)")
    cold_damping: float = Field(0.5, ge=0, le=1, description="weight of text-predicted behaviour for items with no events")
    new_item_slots: int = Field(1, ge=0, description="last places of a user's list kept for the best-matching items with no events yet")


class ListsSettings(BaseModel):
    """How long the lists are and how fast an event's weight fades."""

    model_config = ConfigDict(extra="forbid")

    k: int = Field(10, ge=1, le=1000)
    half_life_days: float = Field(14.0, gt=0, description="an event this old counts half in a user's profile")


@dataclass(frozen=True)
class RankingSettings:
    """What building the vector space takes from a config: how events weigh and fade, and the blend."""

    weights: dict[str, float]  # by event type (events.weights; 'default' when there is no event type column)
    half_life_days: float = ListsSettings.model_fields["half_life_days"].default
    blend: BlendSettings = field(default_factory=BlendSettings)
