"""Plots of an evaluation: each metric against K, and nDCG against the behaviour weight."""

from __future__ import annotations

from pathlib import Path

from recommend.quality.evaluate import EvalResult


def plot_eval(result: EvalResult, folder: Path, prefix: str = "eval") -> list[str]:
    """Write <prefix>-metrics-vs-k.png (lists and baselines) and, after a sweep, <prefix>-weight-sweep.png."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    written = []
    ks = result.k
    metrics = ["ndcg", "precision", "recall", "map", "hit_rate"]
    fig, axes = plt.subplots(1, len(metrics), figsize=(4 * len(metrics), 3.2))
    runs = {"lists": result.lists, **result.baselines}
    for ax, metric in zip(axes, metrics):
        for name, scored in runs.items():
            ax.plot(ks, [getattr(scored.at[str(k)], metric) for k in ks], marker="o", label=name)
        ax.set_title(f"{metric}@K"), ax.set_xlabel("K"), ax.grid(alpha=0.3)
    axes[0].legend()
    fig.suptitle(f"run {result.run_id or ''}: {result.split} split, {result.test_ratio:.0%} held out, seed {result.seed}")
    fig.tight_layout()
    path = Path(folder) / f"{prefix}-metrics-vs-k.png"
    fig.savefig(path, dpi=100)
    plt.close(fig)
    written.append(str(path))
    if result.sweep:
        sweep = result.sweep
        fig, ax = plt.subplots(figsize=(5, 3.2))
        ax.plot(sweep.behaviour_weight, sweep.value, marker="o", label="lists")
        ax.axhline(result.baselines["popularity"].at[str(sweep.k)].ndcg, color="gray", ls="--", label="popularity")
        ax.set_xlabel("blend.behaviour_weight (0 = text only)"), ax.set_ylabel(f"nDCG@{sweep.k}"), ax.grid(alpha=0.3)
        ax.legend()
        fig.tight_layout()
        path = Path(folder) / f"{prefix}-weight-sweep.png"
        fig.savefig(path, dpi=100)
        plt.close(fig)
        written.append(str(path))
    return written
