"""The quality gate: a refresh publishes only lists that score well enough on recent behaviour.

Figures come from `evaluate.holdout_score` (lists rebuilt without each user's most recent items,
scored on them). The run stops before publishing, naming the figures, when nDCG is below the floor,
below a multiple of the popularity baseline of the same run, or too far below the live version's
figure (stored with each published version).
"""

from __future__ import annotations

from embedder.errors import RecsError


class GateFailed(RecsError):
    """The new lists scored too low; nothing was published. Exit code 1."""


def gate_problems(figures: dict, live: dict | None, min_ndcg: float, min_vs_popularity: float, max_drop: float) -> list[str]:
    """What is wrong with `figures` (empty when the gate passes). `live`: the live version's figures."""
    ndcg, pop, k = figures.get("ndcg"), figures.get("popularity_ndcg"), figures.get("k")
    if ndcg is None:
        return []  # no user has a held-out item: nothing to judge by
    problems = []
    if ndcg < min_ndcg:
        problems.append(f"nDCG@{k} {ndcg:.4f} is below gate.min_ndcg {min_ndcg:g}")
    if pop and ndcg < min_vs_popularity * pop:
        problems.append(f"nDCG@{k} {ndcg:.4f} is below gate.min_vs_popularity {min_vs_popularity:g} x popularity's {pop:.4f}")
    live_ndcg = (live or {}).get("ndcg")
    if live_ndcg and ndcg < (1 - max_drop) * live_ndcg:
        problems.append(f"nDCG@{k} {ndcg:.4f} is more than gate.max_drop {max_drop:.0%} below the live version's "
                        f"{live_ndcg:.4f} ({live.get('run_id', '?')})")
    return problems


def check_gate(figures: dict, live: dict | None, min_ndcg: float, min_vs_popularity: float, max_drop: float) -> None:
    problems = gate_problems(figures, live, min_ndcg, min_vs_popularity, max_drop)
    if problems:
        raise GateFailed("quality gate: " + "; ".join(problems) + f" (scored on {figures['users']} users' most recent "
                         f"{figures['holdout']:.0%} of items). Nothing was published; the live version stays live.")
