"""The quality gate: a refresh publishes only lists that score well enough on recent behaviour.

Figures come from `evaluate.holdout_score` (lists rebuilt without each user's most recent items,
scored on them). The run stops before publishing, naming the figures, when nDCG is below the floor,
below a multiple of the popularity baseline of the same run, or too far below the live version's
figure (stored with each published version).
"""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field

from embedder.errors import RecsError


class GateFailed(RecsError):
    """The new lists scored too low; nothing was published. Exit code 1."""


class GateSettings(BaseModel):
    """Before publishing, lists rebuilt without each user's most recent events are scored on them
    (config: the `gate` section)."""

    model_config = ConfigDict(extra="forbid")

    enabled: bool = Field(True, description="false: publish without scoring the lists first")
    holdout: float = Field(0.1, gt=0, lt=1, description="share of each user's most recent items held out")
    k: int = Field(10, ge=1, description="the K of the gate's nDCG@K")
    min_ndcg: float = Field(0.0, ge=0, le=1, description="the floor: below it nothing is published")
    min_vs_popularity: float = Field(0.5, ge=0, description="nDCG must reach this multiple of the popularity baseline's")
    max_drop: float = Field(0.2, ge=0, le=1, description="stop when nDCG is this share below the live version's")
    max_users: int = Field(5_000, ge=1, description="users the gate fits and scores on: a sample chosen by a hash "
                           "of their ids, the same users from run to run")
    allow_unjudged: bool = Field(False, description="publish a run the gate could not score (too few users with "
                                 "held-out items) over a live version that has a figure")


class GateFigures(BaseModel):
    """nDCG@k of the lists and of popularity on the held-out part; None when no user had any."""

    ndcg: float | None = None
    popularity_ndcg: float | None = None
    users: int = 0
    holdout: float | None = None
    k: int | None = None
    method: str | None = None  # how the figures were made: a live figure is compared only when it is the same
    run_id: str | None = None  # the version these figures were published with (the live version's)


class GateReport(GateFigures):
    """The gate of one run: its figures, the live version's, and what was wrong (empty: passed)."""

    enabled: bool = True
    live: GateFigures | None = None
    problems: list[str] = Field(default_factory=list)


def gate_problems(figures: GateFigures, live: GateFigures | None, settings: GateSettings) -> list[str]:
    """What is wrong with `figures` (empty when the gate passes). `live`: the live version's figures."""
    ndcg, pop, k = figures.ndcg, figures.popularity_ndcg, figures.k
    live_ndcg = live.ndcg if live is not None and live.method == figures.method else None  # another method: not comparable
    if ndcg is None:  # no user has a held-out item: nothing to judge by
        if live_ndcg is not None and not settings.allow_unjudged:
            return [f"the gate could not score this run ({figures.users} users with held-out items), and the live "
                    f"version {live.run_id or '?'} scored nDCG@{live.k or k} {live_ndcg:.4f}: an unjudged run does "
                    "not replace a judged one (gate.allow_unjudged: true to publish anyway)"]
        return []
    problems = []
    if ndcg < settings.min_ndcg:
        problems.append(f"nDCG@{k} {ndcg:.4f} is below gate.min_ndcg {settings.min_ndcg:g}")
    if pop and ndcg < settings.min_vs_popularity * pop:
        problems.append(f"nDCG@{k} {ndcg:.4f} is below gate.min_vs_popularity {settings.min_vs_popularity:g} "
                        f"x popularity's {pop:.4f}")
    if live_ndcg and ndcg < (1 - settings.max_drop) * live_ndcg:
        problems.append(f"nDCG@{k} {ndcg:.4f} is more than gate.max_drop {settings.max_drop:.0%} below the live "
                        f"version's {live_ndcg:.4f} ({live.run_id or '?'})")
    return problems


def check_gate(report: GateReport) -> None:
    """Raise GateFailed naming the figures when the report lists problems."""
    if report.problems:
        raise GateFailed("quality gate: " + "; ".join(report.problems) + f" (scored on {report.users} users' most "
                         f"recent {report.holdout or 0:.0%} of items). Nothing was published; the live version stays live.")
