"""`recs check`: verify what a workdir holds (the embedding cache, the run folders, the published
versions), say what is wrong, and with `repair` mend what can be mended.

- cache: every file's checksum and vectors (embedder/cache.py); a damaged file is moved aside, its
  items are encoded again by the next refresh.
- runs: each run's report.json and manifests parse, and every artifact a manifest lists still has
  the digest it was written with. A damaged run is not repaired (its lists were published or not;
  the next refresh makes new ones): it is named, so that `recs eval --run` can avoid it.
- store: every published version's files and counts are verified; versions whose publish never
  finished are named, and with `repair` removed (unless live; never while a refresh runs).

Example:
    report = check_workdir(load_config("config.yaml"), repair=True)
    report.ok, [f.problem for f in report.findings]
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from pydantic import BaseModel, ValidationError

from embedder.artifacts import file_digest
from embedder.cache import EmbeddingCache
from embedder.errors import RecsError
from embedder.run_folder import RunFolder
from recommend.config import Config
from recommend.run.infra.lock import LockHeld, RefreshLock
from recommend.run.report import read_report
from recommend.run.workdir import runs_dir


class Finding(BaseModel):
    where: str                    # cache | run <id> | store
    problem: str
    repaired: str | None = None   # what was done about it


class CheckReport(BaseModel):
    cache_vectors: int            # vectors in sound cache files
    runs: int                     # run folders checked
    versions: int | None          # published versions listed (None: publishing is off)
    findings: list[Finding]
    in_progress: list[str] = []   # versions being published by the refresh running now: not problems

    @property
    def ok(self) -> bool:
        return not [f for f in self.findings if f.repaired is None]


class DamagedArtifact(RecsError):
    """A run artifact does not hold what was written (truncated, changed). Exit code 1."""


def run_problems(run: RunFolder) -> list[str]:
    """What is wrong with one run folder (empty: nothing)."""
    problems = []
    path = run.report
    if not path.is_file():
        problems.append("no report.json: the run was stopped before it could write one (killed)")
    else:
        try:
            read_report(path)  # None (an earlier version's format) is not a problem
        except (ValidationError, ValueError) as exc:
            problems.append(f"report.json is damaged ({str(exc).splitlines()[0]})")
    for manifest in run.manifests():
        try:
            files = json.loads(manifest.read_text()).get("files", {})
        except ValueError as exc:
            problems.append(f"{manifest.name} is damaged ({exc})")
            continue
        for name, digest in files.items():
            problem = artifact_problem(run, name, digest)
            if problem:
                problems.append(problem)
    return problems


def artifact_problem(run: RunFolder, name: str, digest: str) -> str | None:
    path = run.root / name
    if not path.is_file():
        return f"{name} is missing"
    if file_digest(path) != digest:
        return f"{name} is damaged: its bytes are not those written ({path.stat().st_size} bytes now)"
    return None


def verify_artifacts(run: RunFolder, *paths: Path) -> None:
    """Raise DamagedArtifact naming the file when an artifact (a file or folder of the run) no longer
    matches its manifest."""
    listed = {}
    for manifest in run.manifests():
        try:
            listed.update(json.loads(manifest.read_text()).get("files", {}))
        except ValueError:
            continue
    for name in map(run.relative, paths):  # a folder (events.parquet) stands for every file listed in it
        for found in [n for n in listed if n == name or n.startswith(name + "/")]:
            problem = artifact_problem(run, found, listed[found])
            if problem:
                raise DamagedArtifact(f"run {run.run_id}: {problem}; pick another run (--run) or refresh again")


def check_workdir(config: Config, repair: bool = False) -> CheckReport:
    """Check the cache, every run folder and the published versions of one config's workdir."""
    findings = []
    vectors, damaged = EmbeddingCache(config.cache_root).check(repair=repair)
    findings += [Finding(where="cache", problem=d, repaired="moved aside" if repair else None) for d in damaged]
    runs = [RunFolder(p) for p in sorted(runs_dir(config.workdir).glob("*")) if p.is_dir()] if runs_dir(config.workdir).exists() else []
    try:
        RefreshLock(config.workdir).acquire().release()
        running = None
    except LockHeld:  # a refresh is running: its folder has no report yet, and that is fine
        running = runs[-1] if runs else None
    versions, published, in_progress = None, None, []
    if config.publish.enabled:
        versions, published = _check_store(config, findings, repair=repair and running is None,
                                           writing=running.run_id if running else None, in_progress=in_progress)
    for run in runs:
        if run == running:
            continue
        problems = run_problems(run)
        # a killed run's folder (no report) behind no published version holds nothing anyone reads
        removable = repair and published is not None and run.run_id not in published and \
            any(p.startswith("no report.json") for p in problems)
        if removable:
            shutil.rmtree(run.root, ignore_errors=True)
        findings += [Finding(where=f"run {run.run_id}", problem=p, repaired="removed" if removable else None)
                     for p in problems[:1 if removable else None]]
    return CheckReport(cache_vectors=vectors, runs=len(runs), versions=versions, findings=findings, in_progress=in_progress)


def _check_store(config: Config, findings: list, repair: bool, writing: str | None,
                 in_progress: list) -> tuple[int | None, set[str] | None]:
    """Every published version verified (the embedded store: every shard file's size and digest and the engine's own counts; a server: its counts),
    and those whose publish never finished; `repair` removes those that are not live (never while a
    refresh is running: its own version is unfinished until it switches). `writing`: the run id of
    the refresh holding the workdir's lock now: its unfinished version is added to `in_progress`,
    not to the findings (a check run by monitoring during every night's publish must not alarm).
    Returns (how many complete versions, their run ids), or (None, None) when the store cannot be read."""
    from recommend.serving.versions import version_store

    try:
        store = version_store(config.publish, config.workdir)
        live = store.live()
        listed = store.versions()
        for v in listed:
            problem = store.verify(v.run_id, deep=True)
            if problem:
                findings.append(Finding(where=f"version {v.run_id}", problem=f"damaged{' (live)' if v.live else ''}: {problem}"))
        for run_id in store.incomplete():
            if run_id == writing:
                in_progress.append(run_id)
                continue
            removed = None
            if repair and run_id != live:
                store.remove(run_id)
                removed = "removed"
            findings.append(Finding(where=f"version {run_id}", problem=store.verify(run_id) or "incomplete", repaired=removed))
        if live is not None and live not in {v.run_id for v in listed}:
            findings.append(Finding(where="store", problem=f"the live version {live} is not a complete version"))
        return len(listed), {v.run_id for v in listed} | ({live} if live else set())
    except RecsError as exc:
        findings.append(Finding(where="store", problem=str(exc)))
        return None, None
