"""`recs refresh`: ingest -> embed -> quality gate -> index & lists -> publish (recommend/run/stages.py).

Every run writes `<workdir>/runs/<run_id>/report.json` (a `RefreshReport`), a failed one too: with
`status: "failed"`, the stage it failed in and the error, so that a scheduler can act on it. A run
that fails publishes nothing; the live version stays live.

Example:
    from recommend.config import load_config
    from recommend.run.pipeline import refresh
    report = refresh(load_config("config.yaml"))
    report.published_version, report.embed.items_encoded
"""

from __future__ import annotations

import time
from contextlib import nullcontext

from embedder.artifacts import write_json, write_text
from embedder.errors import RecsError, StorageError
from embedder.run_folder import RunFolder
from recommend.config import Config
from recommend.run import stages
from recommend.run.infra.cluster import dask_client
from recommend.run.infra.memory import survivors_frozen
from recommend.run.infra.preflight import preflight
from recommend.run.infra.progress import Reporter
from recommend.run.report import RefreshReport, human_report
from recommend.run.infra.lock import RefreshLock
from recommend.run.plans import RunPlan, plan_run
from recommend.run.workdir import new_run_id, prune_runs, runs_dir
from recommend.serving.store import open_store
from recommend.serving.versions import embedded_root, version_store


class RefreshFailed(RecsError):
    """A refresh failed for a reason that is not one of the named errors (a bug, a full disk...):
    its report says where; the live version stays live. Exit code 1."""


def refresh(config: Config, *, quiet: bool = False, client=None) -> RefreshReport:
    """Run the nightly refresh; return its report (also written to <run>/report.json and report.md).

    Raises a RecsError subclass with a clear message when an input, a service or a check fails,
    after writing the failed run's report; the live version then stays live. `client`: an existing
    Dask client to use instead of starting one.
    """
    with RefreshLock(config.workdir):  # first: a second refresh is refused before anything slow
        plan = plan_run(config)  # each stage's plan, the model resolved once; a ConfigError before any work
        run_id = new_run_id()
        folder = RunFolder(runs_dir(config.workdir) / run_id)
        try:
            folder.root.mkdir(parents=True)
        except OSError as exc:
            raise StorageError(f"cannot create the run folder {folder}: {exc.strerror}") from None
        out = Reporter(quiet)
        out.say(f"refresh: run {run_id} -> {folder}")
        run = stages.Run(folder, out, RefreshReport(run_id=run_id, run_dir=str(folder)))
        started = time.perf_counter()
        try:
            cluster = nullcontext(client) if client is not None else dask_client(config.dask, device=config.embed.device)
            with cluster as run.client, out.bars, survivors_frozen():
                if client is None and run.client.dashboard_link:
                    out.say(f"refresh: Dask dashboard at {run.client.dashboard_link}")
                run.current = "preflight"
                pc = config.publish
                preflight(run.client, sources=_sources(config), cache_root=config.cache_root, model=config.embed.model,
                          qdrant=(pc.url, pc.api_key_env) if pc.enabled and pc.url and pc.upload_on_workers else None,
                          store=str(embedded_root(config.workdir)) if pc.enabled and not pc.url else None)
                _run(run, config, plan)
        except BaseException as exc:
            _failed(run, config, exc, time.perf_counter() - started)
            if not isinstance(exc, Exception):
                raise  # an interrupt stays an interrupt
            error = exc if isinstance(exc, RecsError) else RefreshFailed(
                f"refresh failed in stage {run.current}: {type(exc).__name__}: {exc} (report: {folder.report}). "
                "Nothing was published; the live version stays live.")
            error.report = run.report  # what the CLI prints with --json
            if error is exc:
                raise
            raise error from exc
        run.report.seconds["total"] = round(time.perf_counter() - started, 3)
        _write_report(run)
        _prune_runs(run, config)
        return run.report


def _sources(config: Config) -> dict[str, str]:
    """Every input a worker must read, by its config key."""
    sources = {"items.path": config.items.path, "events.path": config.events.path}
    if config.users:
        sources["users.path"] = config.users.path
    sources.update({f"items.extra_text.{name}.path": x.path for name, x in config.items.extra_text.items()})
    return sources


def _run(run: stages.Run, config: Config, plan: RunPlan) -> None:
    """The stages in order, each with its plan; any failure stops the run before publishing, so the
    live version stays live."""
    if config.publish.url:  # a server that is down fails the run now, not after an hour of encoding
        open_store(config.publish.url, config.publish.api_key_env)
    inputs = stages.ingest(run, plan.ingest)
    emb = stages.embed(run, plan.embed, inputs.items)
    if "text" not in config.items.metadata:  # encoded and written: not needed again
        inputs.items.rows = inputs.items.rows.drop(columns="text")
    pc = config.publish
    store = version_store(pc, config.workdir) if pc.enabled else None
    gate = stages.gate(run, plan.gate, store, inputs.blocks)  # first: a bad run stops before the expensive lists
    lists = stages.lists(run, plan.lists, inputs.blocks, emb)
    if store is not None:
        stages.publish(run, plan.publish, store, inputs.items, emb, lists, gate)
    else:
        run.out.say("[publish] skipped: publish.enabled is false (lists and vectors are in the run folder)")


def _failed(run: stages.Run, config: Config, exc: BaseException, seconds: float) -> None:
    """Record the failure in the run's report; never let writing it hide the original error."""
    report = run.report
    report.status, report.failed_stage = "failed", run.current
    report.error = str(exc) if isinstance(exc, RecsError) else f"{type(exc).__name__}: {exc}"
    report.exit_code = exc.exit_code if isinstance(exc, RecsError) else 130 if isinstance(exc, KeyboardInterrupt) else 1
    report.seconds["total"] = round(seconds, 3)
    try:
        _write_report(run)
        _prune_runs(run, config)
    except (OSError, RecsError):
        pass  # e.g. the disk is full: the error itself is still raised to the caller


def _prune_runs(run: stages.Run, config: Config) -> None:
    """Old run folders go (`runs.keep`), never one behind a published version. When the published
    versions cannot be listed, nothing is deleted."""
    protect = {run.run_id}
    if config.publish.enabled:
        try:
            store = version_store(config.publish, config.workdir)
            protect |= {v.run_id for v in store.versions()} | set(store.incomplete()) | {store.live()}
        except RecsError:
            return
    deleted = prune_runs(config.workdir, config.runs.keep, protect)
    if deleted:
        run.out.say(f"refresh: {len(deleted)} old run folder(s) removed (runs.keep: {config.runs.keep})")


def _write_report(run: stages.Run) -> None:
    write_json(run.report, run.folder.report)
    write_text(human_report(run.report), run.folder.report_md)
