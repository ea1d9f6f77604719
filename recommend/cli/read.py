"""The read commands: answers from the live version (recommend, similar, search), versions and
rollback, and the HTTP service."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import typer

from recommend.cli.app import ConfigOpt, JsonOpt, KOpt, QuietOpt, VerboseOpt, _output, app, user_errors
from recommend.cli.output import print_answer


WhereOpt = typer.Option(None, "--where", help="A condition on an indexed item field (publish.indexed_fields), "
                        "repeatable, all must hold: FIELD=VALUE, FIELD=A|B, FIELD<N, FIELD<=N, FIELD>N, FIELD>=N.")
ExcludeOpt = typer.Option(None, "--exclude", help="An item id never to answer (repeatable).")
DiversityOpt = typer.Option(0.0, "--diversity", min=0.0, max=1.0, help="Variety over relevance, 0 (none) to 1: maximal "
                            "marginal relevance over a deeper pool of candidates.")


def _recommender(config: str):
    from recommend.serving.facade import Recommender

    return Recommender.from_config(config, poll_s=0)



@app.command()
def recommend(user_id: str = typer.Argument(..., help="The user's id, as in the events."),
              k: Optional[int] = KOpt, config: str = ConfigOpt, as_json: bool = JsonOpt,
              recent: Optional[list[str]] = typer.Option(None, "--recent", help="For a user the batch has not seen: "
                                                         "item ids they just interacted with (repeatable)."),
              where: Optional[list[str]] = WhereOpt, exclude: Optional[list[str]] = ExcludeOpt,
              diversity: float = DiversityOpt):
    """Recommended items for USER_ID from the live version (none they already interacted with).
    With --where, the items of the list that pass, filled by a vector query when fewer than k do.

    \b
    Example:
        recs recommend U00042 --k 5
        recs recommend U00042 --where 'genres=Comedy' --where 'year>=2000' --exclude 1234
        recs recommend new-user --recent I00012 --recent I00340
        recs recommend U00042 --diversity 0.5
    """
    with user_errors():
        print_answer(_recommender(config).for_user(user_id, k, recent_items=recent, where=where, exclude=exclude,
                                                   diversity=diversity), as_json)


@app.command()
def similar(item_id: str = typer.Argument(..., help="The item's id, as in the catalog."),
            k: Optional[int] = KOpt, config: str = ConfigOpt, as_json: bool = JsonOpt,
            where: Optional[list[str]] = WhereOpt, exclude: Optional[list[str]] = ExcludeOpt,
            diversity: float = DiversityOpt):
    """The items most similar to ITEM_ID in the live version (the item itself excluded).

    \b
    Example:
        recs similar I00000 --json
        recs similar I00000 --where 'genres=Comedy|Drama'
    """
    with user_errors():
        print_answer(_recommender(config).similar(item_id, k, where=where, exclude=exclude, diversity=diversity), as_json)


@app.command()
def search(text: str = typer.Argument(..., help="Free text to encode now and match against items."),
           k: Optional[int] = KOpt, config: str = ConfigOpt, as_json: bool = JsonOpt,
           where: Optional[list[str]] = WhereOpt, exclude: Optional[list[str]] = ExcludeOpt,
           diversity: float = DiversityOpt):
    """The items nearest to TEXT, encoded now with the live version's model.

    \b
    Example:
        recs search "trail running shoes"
        recs search "space adventure" --where 'year<1990'
    """
    if not text.strip():
        raise typer.BadParameter("search needs a text, e.g. recs search \"trail running shoes\"")
    with user_errors():
        print_answer(_recommender(config).search(text, k, where=where, exclude=exclude, diversity=diversity), as_json)


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
                   f"created={v.metadata.get('created_at', '?')}{f'  added={v.added}' if v.added else ''}"
                   f"{'  (live)' if v.live else ''}")


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
    from recommend.run.infra.lock import RefreshLock
    from recommend.serving.versions import version_store

    with user_errors():
        cfg = load_config(config, check_inputs=False)
        with RefreshLock(cfg.workdir):  # not while a refresh publishes or prunes
            done = version_store(cfg.publish, cfg.workdir).rollback(run_id)
    for skipped in done.skipped:
        typer.echo(f"skipped damaged version {skipped}", err=True)
    typer.echo(f"live: {done.live} (was {done.previous})")


@app.command(name="add-items")
def add_items(path: str = typer.Argument(..., help="A file of new or changed items, with the catalog's columns "
                                                   "(Parquet, CSV or JSON lines)."),
              config: str = ConfigOpt, as_json: bool = JsonOpt, verbose: int = VerboseOpt, quiet: bool = QuietOpt):
    """Add new or changed items to the live version now: text search, similar-from-text and filters
    find them from the next query (a running `recs serve` within seconds). Texts are encoded through
    the embedding cache; the published lists stay as they are until the next refresh, which takes
    the items from the catalog as usual. A rollback leaves them behind with their version. Rows that
    cannot be added are named with their reason (exit 2 when none can).

    \b
    Example:
        recs add-items new_items.csv --config config.yaml
        recs versions      # added=... on the live version
    """
    from recommend.config import load_config
    from recommend.serving.intake import Intake

    _output(verbose, quiet)
    with user_errors():
        report = Intake.from_config(load_config(config, check_inputs=False)).add_file(path)
    if as_json:
        typer.echo(report.model_dump_json())
        return
    typer.echo(f"added {report.added} items to version {report.version} ({report.new} new, {report.replaced} changed; "
               f"{report.encoded} texts encoded, {report.from_cache} from cache) in {report.seconds:.1f}s; "
               f"{report.added_today} added to it today")
    for problem in report.problems:
        typer.echo(f"- not added: {problem}", err=True)
    if report.quarantined > len(report.problems):
        typer.echo(f"- and {report.quarantined - len(report.problems)} more rows not added", err=True)
    if not report.still_live:
        typer.echo(f"warning: version {report.version} is no longer live (a refresh switched meanwhile): "
                   "add the items again", err=True)


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
        from recommend.serving.service import api_key

        keyed = api_key(settings) is not None  # an empty key is refused here, before anything starts
        if not keyed and settings.host not in ("127.0.0.1", "localhost", "::1"):
            typer.echo(f"warning: serving on {settings.host} without an API key: anyone who reaches this port can "
                       f"read the lists (set {settings.api_key_env})", err=True)
        if settings.workers > 1:
            from recommend.serving.httpserver import free_port, run_workers

            if settings.port == 0:  # uvicorn binds for its workers and never says which port 0 became
                settings = settings.model_copy(update={"port": free_port(settings.host)})
            os.environ["RECS_CONFIG"] = str(Path(config).resolve())
            os.environ["RECS_SERVE"] = json.dumps({**updates, "port": settings.port})  # the workers' settings as here
            typer.echo(f"serving on http://{settings.host}:{settings.port} with {settings.workers} workers "
                       f"(Ctrl-C stops){'; API key required' if keyed else ''}", err=True)
            run_workers("recommend.serving.service:app_from_env", settings)
            return
        from recommend.serving.httpserver import run_server
        from recommend.serving.service import app_from_config

        app = app_from_config(cfg)
    run_server(app, settings, announce=lambda url: typer.echo(
        f"serving on {url} (Ctrl-C stops){'; API key required' if keyed else ''}", err=True))

