"""The workdir: run folders, stage manifests and the refresh lock.

    <workdir>/runs/<run_id>/    one folder per refresh (its layout: embedder/run_folder.py)
    <workdir>/cache/            the embedding cache (unless embed.cache says otherwise)
    <workdir>/store/            the embedded store's versions (unless publish.url is set)
    <workdir>/refresh.lock      flock-ed while a refresh runs (recommend/run/infra/lock.py)
"""

from __future__ import annotations

import logging
import shutil
from datetime import datetime, timezone
from pathlib import Path

from pydantic import ValidationError

from embedder.artifacts import write_json
from embedder.errors import RecsError
from embedder.run_folder import RunFolder
from recommend.run.report import Manifest, RefreshReport, read_report

log = logging.getLogger("recs")


def new_run_id() -> str:
    """UTC time to the microsecond: sorts as it was made (versions, prune and rollback rely on that),
    unique under the refresh lock, and a valid Qdrant collection-name part: 20261128T172300-123456."""
    return datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%S-%f")


def runs_dir(workdir: str | Path) -> Path:
    return Path(workdir) / "runs"


def prune_runs(workdir: str | Path, keep: int, protect: set[str]) -> list[str]:
    """Delete run folders beyond the newest `keep`, except those in `protect` (runs behind published
    versions). Returns the run ids deleted, oldest first."""
    root = runs_dir(workdir)
    runs = sorted(p for p in root.glob("*") if p.is_dir()) if root.exists() else []
    deleted = []
    for run in runs[:-keep] if keep else runs:
        if run.name not in protect:
            shutil.rmtree(run, ignore_errors=True)
            deleted.append(run.name)
    return deleted


def write_manifest(run: RunFolder, manifest: Manifest) -> Path:
    return write_json(manifest, run.manifest(manifest.stage))


def latest_report(workdir: str | Path, run_id: str | None = None) -> RefreshReport | None:
    """report.json of `run_id`, or of the newest run that completed (status ok). A damaged report is
    named: as an error for `run_id`, with a warning (and skipped) when looking for the newest."""
    root = runs_dir(workdir)
    candidates = [root / run_id] if run_id else sorted(root.glob("*"), reverse=True) if root.exists() else []
    for run in candidates:
        path = RunFolder(run).report
        if not path.is_file():
            continue
        try:
            report = read_report(path)
        except (ValidationError, ValueError) as exc:
            message = f"{path} is damaged ({str(exc).splitlines()[0]})"
            if run_id:
                raise RecsError(message + "; pick another run (--run) or refresh again") from None
            log.warning("%s; skipped", message)
            continue
        if report is None:  # written by an earlier nightly-recs: its artifacts are not described the same way
            if run_id:
                raise RecsError(f"run {run_id} was made by an earlier nightly-recs; refresh again to evaluate")
            continue
        if run_id or report.status == "ok":
            return report
    return None


def load_run(workdir: str | Path, run_id: str) -> dict:
    """A run's tables for exploration: items, events, lists and quarantine as DataFrames, the report.

    Example: ``run = load_run(config.workdir, rec.live_version()); run["lists"].head()``
    """
    import pandas as pd

    run = RunFolder(runs_dir(workdir) / run_id)
    if not run.root.is_dir():
        raise RecsError(f"no run folder {run}: the version may have been published from another workdir")
    out = {name: pd.read_parquet(getattr(run, name)) for name in ("items", "events", "lists", "quarantine")}
    out["report"] = latest_report(workdir, run_id)
    return out
