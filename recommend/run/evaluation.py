"""`recs eval`: score the lists a finished run produces, from that run's own artifacts.

Example:
    result = evaluate_run(load_config("config.yaml"), split="temporal")
    result.lists.at["10"].ndcg, result.baselines["popularity"].at["10"].ndcg
"""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import pyarrow.parquet as pq

from embedder.artifacts import arrow_to_vectors, write_json
from embedder.errors import RecsError
from recommend.config import Config, stage_settings
from recommend.quality.evaluate import EvalResult, Split, evaluate
from recommend.quality.plots import plot_eval
from recommend.run.check import verify_artifacts
from recommend.run.workdir import latest_report, runs_dir


def evaluate_run(config: Config, run_id: str | None = None, *, split: Split = "random", test_ratio: float = 0.25,
                 seed: int = 42, ks: tuple[int, ...] = (1, 5, 10, 20), sweep: tuple[float, ...] = (),
                 plots: bool = True) -> EvalResult:
    """Evaluate the lists a refresh run produces, from that run's own accepted events and
    embeddings (the newest completed run by default), with the config's settings. Writes
    eval-<split>.json, and plots when asked, into the run's folder (`result.written` lists them)."""
    report = latest_report(config.workdir, run_id)
    if report is None or report.status != "ok":
        raise RecsError(f"no completed refresh run in {runs_dir(config.workdir)}"
                        + (f" with id {run_id!r}" if run_id else "") + "; run `recs refresh` first")
    run = Path(report.run_dir)
    verify_artifacts(run, "embeddings.parquet", "events.parquet")
    emb = pq.read_table(run / "embeddings.parquet")
    events = pd.read_parquet(run / "events.parquet")
    result = evaluate(events, item_ids=emb["item_id"].to_pylist(), text=arrow_to_vectors(emb["vector"]),
                      settings=stage_settings(config).ranking, split=split, test_ratio=test_ratio, seed=seed,
                      ks=ks, sweep=sweep)
    result.run_id = report.run_id
    result.written = [str(run / f"eval-{split}.json")]
    if plots:
        result.written += plot_eval(result, run, prefix=f"eval-{split}")
    write_json(result, result.written[0])
    return result
