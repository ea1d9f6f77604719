"""`recs eval`: score the lists a finished run produces, from that run's own artifacts.

Example:
    result = evaluate_run(load_config("config.yaml"), split="temporal")
    result.lists.at["10"].ndcg, result.baselines["popularity"].at["10"].ndcg
"""

from __future__ import annotations


import pandas as pd
import pyarrow.parquet as pq

from embedder.artifacts import arrow_to_vectors, write_json
from embedder.errors import RecsError
from embedder.run_folder import RunFolder
from recommend.config import Config, stage_settings
from recommend.quality.evaluate import EvalResult, Holdout, Split, Tried, evaluate, tune
from recommend.quality.plots import plot_eval
from recommend.run.commands.check import verify_artifacts
from recommend.run.workdir import latest_report, runs_dir


def evaluate_run(config: Config, run_id: str | None = None, *, split: Split = "random", test_ratio: float = 0.25,
                 seed: int = 42, ks: tuple[int, ...] = (1, 5, 10, 20), sweep: tuple[float, ...] = (),
                 plots: bool = True) -> EvalResult:
    """Evaluate the lists a refresh run produces, from that run's own accepted events and
    embeddings (the newest completed run by default), with the config's settings. Writes
    eval-<split>.json, and plots when asked, into the run's folder (`result.written` lists them)."""
    report, events, item_ids, text = _load(config, run_id)
    result = evaluate(events, item_ids=item_ids, text=text, settings=stage_settings(config).ranking,
                      holdout=Holdout(split, test_ratio, seed), ks=ks, sweep=sweep)
    run = RunFolder(report.run_dir)
    result.run_id = report.run_id
    result.written = [str(run.evaluation(split))]
    if plots:
        result.written += plot_eval(result, run.root, prefix=run.evaluation(split).stem)
    write_json(result, result.written[0])
    return result


def tune_run(config: Config, run_id: str | None = None, *, test_ratio: float = 0.25, seed: int = 42) -> list[Tried]:
    """`recs eval --tune`: the blend settings of `quality.evaluate.TUNE_GRID` scored on both splits of
    a run's events (the newest completed run by default), best first. Writes tune.json beside the run."""
    report, events, item_ids, text = _load(config, run_id)
    tried = tune(events, item_ids=item_ids, text=text, settings=stage_settings(config).ranking,
                 holdouts=tuple(Holdout(split, test_ratio, seed) for split in ("random", "temporal")))
    write_json({"run_id": report.run_id, "tried": [t.model_dump() for t in tried]}, RunFolder(report.run_dir).tune)
    return tried


def _load(config: Config, run_id: str | None):
    """(report, events, item ids, text vectors) of a completed run, its artifacts verified."""
    report = latest_report(config.workdir, run_id)
    if report is None or report.status != "ok":
        raise RecsError(f"no completed refresh run in {runs_dir(config.workdir)}"
                        + (f" with id {run_id!r}" if run_id else "") + "; run `recs refresh` first")
    run = RunFolder(report.run_dir)
    verify_artifacts(run, run.embeddings, run.events)
    emb = pq.read_table(run.embeddings)
    events = pd.read_parquet(run.events, columns=["user_id", "item_id", "ts", "event_type"])  # every block
    return report, events, emb["item_id"].to_pylist(), arrow_to_vectors(emb["vector"])
