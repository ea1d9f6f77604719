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

    return Recommender.from_config(config)


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
             split: str = typer.Option("both", help="random: per-user seeded share held out; temporal: each user's "
                                                    "most recent; both (the default)."),
             test_ratio: float = typer.Option(0.25, min=0.01, max=0.9, help="Share of each user's items held out."),
             seed: int = typer.Option(42, help="Seed of the random split and the random baseline."),
             k: str = typer.Option("1,5,10,20", "--k", "-k", help="Cut-offs K, comma-separated."),
             sweep: str = typer.Option("0,0.5,0.7,0.9,1", help="blend.behaviour_weight values to score ('' for none)."),
             tune: bool = typer.Option(False, "--tune", help="Score a grid of blend settings (weight, l2, text in the "
                                                             "fit, fit input) on both splits and print the best."),
             run: Optional[str] = typer.Option(None, help="Run id to evaluate (default: the newest completed run)."),
             plots: bool = typer.Option(True, help="Write metric-vs-K and weight-sweep plots beside the run report."),
             as_json: bool = JsonOpt, verbose: int = VerboseOpt, quiet: bool = QuietOpt):
    """Score the lists offline: split the run's events, rebuild the lists on the training part with
    the config's settings, and score the held-out part (nDCG, precision, recall, MAP, hit rate,
    coverage, the reach and hit rate of items with no training events) beside popularity, random,
    item-kNN and, with implicit installed, ALS baselines from the same split.

    \b
    Example:
        recs eval --config config.yaml --split random --json | jq .lists.at.\"10\".ndcg
        recs eval --tune      # which blend settings suit these events best
    """
    from recommend.config import load_config
    from recommend.run.evaluation import evaluate_run, tune_run

    _output(verbose, quiet)
    if split not in ("random", "temporal", "both"):
        raise typer.BadParameter(f"--split must be random, temporal or both, got {split!r}")
    cfg = load_config(config, check_inputs=False)
    if tune:
        with user_errors():
            tried = tune_run(cfg, run, test_ratio=test_ratio, seed=seed)
        if as_json:
            typer.echo(json.dumps([t.model_dump() for t in tried]))
            return
        for t in tried[:5]:
            typer.echo(f"nDCG@10 {t.ndcg}: {t.settings}")
        typer.echo("best, for config.yaml:\nblend:\n" + "".join(f"  {key}: {value}\n" for key, value in tried[0].settings.items()))
        return
    ks = _numbers(k, int, "--k")
    weights = _numbers(sweep, float, "--sweep") if sweep.strip() else ()
    results = []
    for one in (("random", "temporal") if split == "both" else (split,)):
        with user_errors():
            results.append(evaluate_run(cfg, run, split=one, test_ratio=test_ratio, seed=seed, ks=ks, sweep=weights,
                                        plots=plots))
    if as_json:
        typer.echo(results[0].model_dump_json() if len(results) == 1 else
                   json.dumps({r.split: r.model_dump(mode="json") for r in results}))
        return
    for result in results:
        _eval_table(result, ks)


def _eval_table(result, ks) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"run {result.run_id}: {result.split} split, {result.test_ratio:.0%} held out, seed {result.seed}; "
                        f"{result.users} users, {result.items} items ({result.cold_items} without training events)",
                  title_justify="left")
    for col in ["lists / baseline", "K", "nDCG", "precision", "recall", "MAP", "hit rate", "coverage", "new-item reach"]:
        table.add_column(col)
    for name, scored in {"lists": result.lists, **result.baselines}.items():
        for kk in ks:
            m = scored.at[str(kk)]
            table.add_row(name, str(kk), f"{m.ndcg:.4f}", f"{m.precision:.4f}", f"{m.recall:.4f}", f"{m.map:.4f}",
                          f"{m.hit_rate:.3f}", f"{m.coverage:.3f}", f"{m.cold_reach:.3f} (hits {m.cold_hit_rate:.3f})")
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
          repair: bool = typer.Option(False, "--repair", help="Move damaged cache files aside (their items are "
                                                              "encoded again by the next refresh)."),
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
                   "problems found" + ("" if repair else "; --repair moves damaged cache files aside"))
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
    """Published versions, newest first, and which one is live.

    \b
    Example:
        recs versions
    """
    with user_errors():
        found = _recommender(config).versions()
    if as_json:
        typer.echo(json.dumps([{"run_id": v.run_id, "live": v.live, "items": v.items, "users": v.users,
                                "created_at": v.metadata.get("created_at")} for v in found]))
        return
    if not found:
        typer.echo("no version published yet: run `recs refresh`")
    for v in found:
        typer.echo(f"{'*' if v.live else ' '} {v.run_id}  items={v.items} users={v.users} "
                   f"created={v.metadata.get('created_at', '?')}{'  (live)' if v.live else ''}")


@app.command()
def rollback(run_id: Optional[str] = typer.Argument(None, help="Version to make live (default: the one before the live one)."),
             config: str = ConfigOpt):
    """Make an earlier published version live again (one atomic alias switch).

    \b
    Example:
        recs rollback                       # back to the previous version
        recs rollback 20261128T020000-123456  # to a named one
    """
    from recommend.config import load_config
    from recommend.serving.publish import rollback as do_rollback
    from recommend.serving.store import open_store

    with user_errors():
        cfg = load_config(config, check_inputs=False)
        client = open_store(cfg.publish.url, Path(cfg.workdir) / "qdrant", cfg.publish.api_key_env)
        before, after = do_rollback(client, cfg.publish.prefix, run_id)
    typer.echo(f"live: {after} (was {before})")


@app.command()
def serve(config: str = ConfigOpt,
          host: str = typer.Option("127.0.0.1", help="Address to listen on (0.0.0.0 for every interface)."),
          port: int = typer.Option(8000, min=0, max=65535, help="Port (0: any free port)."),
          quiet: bool = typer.Option(False, "--quiet", "-q", help="No line per request on stderr.")):
    """Answer queries over HTTP from the live version: /users/<id>, /items/<id>/similar,
    /search?q=..., /versions, /health (JSON; 404 unknown id, 400 bad parameter, 503 store unavailable).

    \b
    Example:
        recs serve --config config.yaml --port 8000 &
        curl 'http://127.0.0.1:8000/users/U00042?k=5'
    """
    from recommend.serving.facade import Recommender
    from recommend.serving.service import make_server

    with user_errors():
        server = make_server(Recommender.from_config(config), host, port)
    server.quiet = quiet
    host_, port_ = server.server_address[:2]
    typer.echo(f"serving on http://{host_}:{port_} (Ctrl-C stops)", err=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()


def main() -> None:
    app()


if __name__ == "__main__":
    sys.exit(main())
