"""`recs`: a thin command line over the library. Every command's --help ends with an example.

Errors meant for the user print one message to stderr and exit with its code (2: config or input,
1: not found or a failed check), never a traceback.
"""

from __future__ import annotations

import json
import sys
from contextlib import contextmanager
from pathlib import Path
from typing import Optional

import typer

from embedder.errors import RecsError

app = typer.Typer(add_completion=False, no_args_is_help=True, rich_markup_mode=None,
                  context_settings={"help_option_names": ["-h", "--help"]},
                  help="nightly-recs: batch-computed recommendations. Start with `recs sample data/sample` "
                       "and `recs refresh`.")

ConfigOpt = typer.Option("config.yaml", "--config", "-c", envvar="RECS_CONFIG", help="Path to config.yaml.")
JsonOpt = typer.Option(False, "--json", help="Print JSON (one line) instead of a table.")
KOpt = typer.Option(None, "--k", "-k", min=1, max=1000, help="How many items, 1 to 1000 (default: lists.k from the config).")
VerboseOpt = typer.Option(0, "--verbose", "-v", count=True, help="More log lines on stderr (-vv: debug).")
QuietOpt = typer.Option(False, "--quiet", "-q", help="No progress on stderr, and only errors from the log.")


def _version(value: bool) -> None:
    if value:
        from importlib.metadata import version

        typer.echo(f"nightly-recs {version('nightly-recs')}")
        raise typer.Exit()


@app.callback()
def main_options(version: bool = typer.Option(False, "--version", callback=_version, is_eager=True,
                                              help="Print the version and exit.")):
    """nightly-recs: batch-computed recommendations. Start with `recs sample data/sample` and `recs refresh`."""


def _output(verbose: int, quiet: bool) -> None:
    from recommend.run.progress import configure_logging

    configure_logging(verbose, quiet)


@contextmanager
def user_errors():
    try:
        yield
    except RecsError as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(exc.exit_code) from None


def _recommender(config: str):
    from recommend.serving.facade import Recommender

    return Recommender.from_config(config, poll_s=0)


def _print_answer(answer, as_json: bool) -> None:
    if as_json:
        typer.echo(json.dumps(answer.to_dict()))
        return
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"{answer.query} — version {answer.version} ({answer.source})", title_justify="left")
    extra = list(dict.fromkeys(k for r in answer.items for k in r.metadata))
    for col in ["rank", "item_id", "score", *extra]:
        table.add_column(col)
    for rank, r in enumerate(answer.items, 1):
        table.add_row(str(rank), r.item_id, f"{r.score:.4f}", *[str(r.metadata.get(c, "")) for c in extra])
    Console(soft_wrap=True).print(table)


@app.command()
def sample(out: Path = typer.Argument(Path("data/sample"), help="Folder to write items/events/users Parquet into."),
           items: int = typer.Option(3000, min=12, help="Number of items."),
           users: int = typer.Option(1500, min=1, help="Number of users with events."),
           seed: int = typer.Option(42, help="Random seed: same seed, same files.")):
    """Write a deterministic sample shop (catalog + a month of events) to OUT.

    \b
    Example:
        recs sample data/sample --items 3000 --users 1500
    """
    from recommend.run.sample import write_sample

    paths = write_sample(out, n_items=items, n_users=users, seed=seed)
    for name, path in paths.items():
        typer.echo(f"{name}: {path}")


@app.command()
def refresh(config: str = ConfigOpt,
            as_json: bool = typer.Option(False, "--json", help="Print the run report as JSON on the last line of "
                                                               "stdout, a failed run's too."),
            verbose: int = VerboseOpt, quiet: bool = QuietOpt):
    """Run the nightly refresh: ingest, embed (cached), index, publish a new live version.

    Exits 0 only when the new version is live; otherwise non-zero with a message, and the
    previous version stays live. Every run writes <workdir>/runs/<run_id>/report.json, a failed one
    too (status "failed", the stage and the error).

    \b
    Example:
        recs refresh --config config.yaml --json | tail -n 1 | jq .embed.items_encoded
    """
    from recommend.config import ConfigError, load_config
    from recommend.run.lock import RefreshLock

    _output(verbose, quiet)
    try:
        cfg = load_config(config)
        with RefreshLock(cfg.workdir):  # taken (or refused) before the heavy imports below
            from recommend.run.pipeline import refresh as run_refresh

            report = run_refresh(cfg, quiet=quiet)
    except RecsError as exc:
        typer.echo(f"error: {exc}", err=True)
        if as_json:
            from recommend.run.report import RefreshReport

            failed = getattr(exc, "report", None) or RefreshReport(
                status="failed", run_id=None, run_dir=None, failed_stage="config" if isinstance(exc, ConfigError) else "start",
                error=str(exc), exit_code=exc.exit_code)
            typer.echo(failed.model_dump_json())
        raise typer.Exit(exc.exit_code) from None
    if as_json:
        typer.echo(report.model_dump_json())
        return
    items, emb = report.items, report.embed
    what = (f"published {report.published_version}" if report.published_version
            else f"built {report.run_id} (not published: publish.enabled is false)")
    typer.echo(f"{what}: {items.accepted} items ({emb.items_encoded} texts encoded, {emb.items_from_cache} from cache; "
               f"{items.quarantined} of {items.rows_read} rows quarantined), {report.index.users} users, "
               f"{report.seconds['total']:.1f}s; report: {report.run_dir}/report.json")


def _numbers(text: str, kind, name: str) -> tuple:
    try:
        values = tuple(kind(v) for v in text.split(",") if v.strip())
    except ValueError:
        raise typer.BadParameter(f"{name}: expected comma-separated numbers, got {text!r}") from None
    if not values:
        raise typer.BadParameter(f"{name}: expected at least one number")
    return values


@app.command(name="eval")
def evaluate(config: str = ConfigOpt,
             split: str = typer.Option("random", help="random: per-user seeded share held out; temporal: each user's most recent."),
             test_ratio: float = typer.Option(0.25, min=0.01, max=0.9, help="Share of each user's items held out."),
             seed: int = typer.Option(42, help="Seed of the random split and the random baseline."),
             k: str = typer.Option("1,5,10,20", "--k", "-k", help="Cut-offs K, comma-separated."),
             sweep: str = typer.Option("0,0.5,0.8,0.9,0.95,1", help="blend.behaviour_weight values to score ('' for none)."),
             run: Optional[str] = typer.Option(None, help="Run id to evaluate (default: the newest completed run)."),
             plots: bool = typer.Option(True, help="Write metric-vs-K and weight-sweep plots beside the run report."),
             as_json: bool = JsonOpt, verbose: int = VerboseOpt, quiet: bool = QuietOpt):
    """Score the lists offline: split the run's events, rebuild the lists on the training part with
    the config's settings, and score the held-out part (nDCG, precision, recall, MAP, hit rate,
    coverage, cold-item share) beside popularity and random baselines from the same split.

    \b
    Example:
        recs eval --config config.yaml --split random --test-ratio 0.25 --seed 42 --json | jq .lists.at.\"10\".ndcg
    """
    from recommend.config import load_config
    from recommend.run.evaluation import evaluate_run

    _output(verbose, quiet)
    if split not in ("random", "temporal"):
        raise typer.BadParameter(f"--split must be random or temporal, got {split!r}")
    ks = _numbers(k, int, "--k")
    weights = _numbers(sweep, float, "--sweep") if sweep.strip() else ()
    with user_errors():
        result = evaluate_run(load_config(config, check_inputs=False), run, split=split, test_ratio=test_ratio,
                              seed=seed, ks=ks, sweep=weights, plots=plots)
    if as_json:
        typer.echo(result.model_dump_json())
        return
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"run {result.run_id}: {split} split, {test_ratio:.0%} held out, seed {seed}; "
                        f"{result.users} users, {result.items} items ({result.cold_items} without training events)",
                  title_justify="left")
    for col in ["lists / baseline", "K", "nDCG", "precision", "recall", "MAP", "hit rate", "coverage", "cold share"]:
        table.add_column(col)
    for name, scored in {"lists": result.lists, **result.baselines}.items():
        for kk in ks:
            m = scored.at[str(kk)]
            table.add_row(name, str(kk), f"{m.ndcg:.4f}", f"{m.precision:.4f}", f"{m.recall:.4f}",
                          f"{m.map:.4f}", f"{m.hit_rate:.3f}", f"{m.coverage:.3f}", f"{m.cold_share:.4f}")
    Console(soft_wrap=True).print(table)
    if result.sweep:
        pairs = ", ".join(f"{w:g}: {v:.4f}" for w, v in zip(result.sweep.behaviour_weight, result.sweep.value))
        typer.echo(f"nDCG@{result.sweep.k} by blend.behaviour_weight: {pairs}")
    typer.echo("written: " + ", ".join(result.written))


@app.command()
def schema():
    """Print the JSON schema of report.json, the stage manifests and `recs eval --json`.

    \b
    Example:
        recs schema | jq '.["$defs"].RefreshReport.properties | keys'
    """
    from recommend.run.report import schema as artifacts_schema

    typer.echo(json.dumps(artifacts_schema(), indent=2))


@app.command()
def check(config: str = ConfigOpt,
          repair: bool = typer.Option(False, "--repair", help="Move damaged cache files aside (their items are encoded "
                                                              "again by the next refresh); remove unfinished versions."),
          as_json: bool = JsonOpt, verbose: int = VerboseOpt, quiet: bool = QuietOpt):
    """Verify the workdir: every embedding cache file (checksum, finite unit vectors), every run
    folder (report, manifests, artifact digests) and the published versions. Exits 1 when something
    is wrong and was not repaired.

    \b
    Example:
        recs check --config config.yaml --repair
    """
    from recommend.config import load_config
    from recommend.run.check import check_workdir

    _output(verbose, quiet)
    with user_errors():
        report = check_workdir(load_config(config, check_inputs=False), repair=repair)
    if as_json:
        typer.echo(report.model_dump_json())
    else:
        typer.echo(f"cache: {report.cache_vectors} vectors in sound files; runs: {report.runs} checked; "
                   f"versions: {report.versions if report.versions is not None else 'publishing is off'}")
        for f in report.findings:
            typer.echo(f"- {f.where}: {f.problem}" + (f" (repaired: {f.repaired})" if f.repaired else ""))
        typer.echo("all sound" if not report.findings else "ok after repairs" if report.ok else
                   "problems found" + ("" if repair else "; --repair moves damaged cache files aside and removes unfinished versions"))
    if not report.ok:
        raise typer.Exit(1)


@app.command()
def recommend(user_id: str = typer.Argument(..., help="The user's id, as in the events."),
              k: Optional[int] = KOpt, config: str = ConfigOpt, as_json: bool = JsonOpt,
              recent: Optional[list[str]] = typer.Option(None, "--recent", help="For a user the batch has not seen: "
                                                         "item ids they just interacted with (repeatable).")):
    """Recommended items for USER_ID from the live version (none they already interacted with).

    \b
    Example:
        recs recommend U00042 --k 5
        recs recommend new-user --recent I00012 --recent I00340
    """
    with user_errors():
        _print_answer(_recommender(config).for_user(user_id, k, recent_items=recent), as_json)


@app.command()
def similar(item_id: str = typer.Argument(..., help="The item's id, as in the catalog."),
            k: Optional[int] = KOpt, config: str = ConfigOpt, as_json: bool = JsonOpt):
    """The items most similar to ITEM_ID in the live version (the item itself excluded).

    \b
    Example:
        recs similar I00000 --json
    """
    with user_errors():
        _print_answer(_recommender(config).similar(item_id, k), as_json)


@app.command()
def search(text: str = typer.Argument(..., help="Free text to encode now and match against items."),
           k: Optional[int] = KOpt, config: str = ConfigOpt, as_json: bool = JsonOpt):
    """The items nearest to TEXT, encoded now with the live version's model.

    \b
    Example:
        recs search "trail running shoes"
    """
    if not text.strip():
        raise typer.BadParameter("search needs a text, e.g. recs search \"trail running shoes\"")
    with user_errors():
        _print_answer(_recommender(config).search(text, k), as_json)


@app.command()
def versions(config: str = ConfigOpt, as_json: bool = JsonOpt):
    """Published versions, newest first, and which one is live (complete versions only: one whose
    publish did not finish is never listed).

    \b
    Example:
        recs versions --json | jq '.[] | select(.live) | .run_id'
    """
    from recommend.config import load_config
    from recommend.serving.versions import version_store

    with user_errors():
        cfg = load_config(config, check_inputs=False)
        found = version_store(cfg.publish, cfg.workdir).versions()
    if as_json:
        typer.echo(json.dumps([v.to_dict() for v in found]))
        return
    if not found:
        typer.echo("no version published yet: run `recs refresh`")
    for v in found:
        typer.echo(f"{'*' if v.live else ' '} {v.run_id}  items={v.items} users={v.users} "
                   f"created={v.metadata.get('created_at', '?')}{'  (live)' if v.live else ''}")


@app.command()
def rollback(run_id: Optional[str] = typer.Argument(None, help="Version to make live (default: the newest sound one "
                                                              "before the live one)."),
             config: str = ConfigOpt):
    """Make an earlier published version live again (one atomic switch; a running `recs serve`
    follows it within seconds). A damaged or incomplete version is never made live.

    \b
    Example:
        recs rollback                       # back to the previous version
        recs rollback 20261128T020000-123456  # to a named one
    """
    from recommend.config import load_config
    from recommend.run.lock import RefreshLock
    from recommend.serving.versions import version_store

    with user_errors():
        cfg = load_config(config, check_inputs=False)
        with RefreshLock(cfg.workdir):  # not while a refresh publishes or prunes
            done = version_store(cfg.publish, cfg.workdir).rollback(run_id)
    for skipped in done.skipped:
        typer.echo(f"skipped damaged version {skipped}", err=True)
    typer.echo(f"live: {done.live} (was {done.previous})")


@app.command()
def serve(config: str = ConfigOpt,
          host: Optional[str] = typer.Option(None, help="Address to listen on (default: serve.host, 127.0.0.1)."),
          port: Optional[int] = typer.Option(None, min=0, max=65535, help="Port (default: serve.port, 8000; 0: any free port)."),
          workers: Optional[int] = typer.Option(None, min=1, help="Server processes (default: serve.workers, 1)."),
          verbose: int = VerboseOpt, quiet: bool = QuietOpt):
    """Answer queries over HTTP from the live version, and follow each new one without a restart:
    /users/<id>, /items/<id>/similar, /search?q=..., /versions, /health, /metrics, /docs.
    When the variable named by serve.api_key_env (RECS_API_KEY) is set, every route but /health
    needs 'Authorization: Bearer <key>'.

    \b
    Example:
        recs serve --config config.yaml --port 8000 &
        curl 'http://127.0.0.1:8000/users/U00042?k=5'
    """
    import os

    from recommend.config import load_config

    _output(verbose, quiet)
    with user_errors():
        cfg = load_config(config, check_inputs=False)
        updates = {key: value for key, value in (("host", host), ("port", port), ("workers", workers)) if value is not None}
        cfg.serve = cfg.serve.model_copy(update=updates)
        settings = cfg.serve
        keyed = bool(os.environ.get(settings.api_key_env))
        if not keyed and settings.host not in ("127.0.0.1", "localhost", "::1"):
            typer.echo(f"warning: serving on {settings.host} without an API key: anyone who reaches this port can "
                       f"read the lists (set {settings.api_key_env})", err=True)
        if settings.workers > 1:
            from recommend.serving.httpserver import run_workers

            os.environ["RECS_CONFIG"] = str(Path(config).resolve())
            typer.echo(f"serving on http://{settings.host}:{settings.port} with {settings.workers} workers "
                       f"(Ctrl-C stops){'; API key required' if keyed else ''}", err=True)
            run_workers("recommend.serving.service:app_from_env", settings)
            return
        from recommend.serving.httpserver import run_server
        from recommend.serving.service import app_from_config

        app = app_from_config(cfg)
    run_server(app, settings, announce=lambda url: typer.echo(
        f"serving on {url} (Ctrl-C stops){'; API key required' if keyed else ''}", err=True))


def main() -> None:
    app()


if __name__ == "__main__":
    sys.exit(main())
