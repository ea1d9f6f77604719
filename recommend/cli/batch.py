"""The batch commands: make a sample shop, refresh, evaluate, check; the artifacts' schema."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import typer

from embedder.errors import RecsError
from embedder.run_folder import RunFolder
from recommend.cli.app import ConfigOpt, JsonOpt, QuietOpt, VerboseOpt, _output, app, options_from, user_errors
from recommend.cli.output import eval_table


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
    from recommend.run.commands.sample import write_sample

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
    from recommend.run.infra.lock import RefreshLock

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
               f"{report.seconds['total']:.1f}s; report: {RunFolder(report.run_dir).report}")


def _numbers(text: str, kind, name: str) -> tuple:
    try:
        values = tuple(kind(v) for v in text.split(",") if v.strip())
    except ValueError:
        raise typer.BadParameter(f"{name}: expected comma-separated numbers, got {text!r}") from None
    if not values:
        raise typer.BadParameter(f"{name}: expected at least one number")
    return values


@dataclass
class EvalOptions:
    config: str = ConfigOpt
    split: str = typer.Option("both", help="random: per-user seeded share held out; temporal: each user's "
                                           "most recent; both (the default).")
    test_ratio: float = typer.Option(0.25, min=0.01, max=0.9, help="Share of each user's items held out.")
    seed: int = typer.Option(42, help="Seed of the random split and the random baseline.")
    k: str = typer.Option("1,5,10,20", "--k", "-k", help="Cut-offs K, comma-separated.")
    sweep: str = typer.Option("0,0.5,0.7,0.9,1", help="blend.behaviour_weight values to score ('' for none).")
    tune: bool = typer.Option(False, "--tune", help="Score a grid of blend settings (weight, l2, text in the "
                                                    "fit, fit input) on both splits and print the best.")
    run: Optional[str] = typer.Option(None, help="Run id to evaluate (default: the newest completed run).")
    plots: bool = typer.Option(True, help="Write metric-vs-K and weight-sweep plots beside the run report.")
    as_json: bool = JsonOpt
    verbose: int = VerboseOpt
    quiet: bool = QuietOpt


@app.command(name="eval")
@options_from(EvalOptions)
def evaluate(options: EvalOptions):
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
    from recommend.run.commands.evaluation import evaluate_run, tune_run

    o = options
    _output(o.verbose, o.quiet)
    if o.split not in ("random", "temporal", "both"):
        raise typer.BadParameter(f"--split must be random, temporal or both, got {o.split!r}")
    cfg = load_config(o.config, check_inputs=False)
    if o.tune:
        with user_errors():
            tried = tune_run(cfg, o.run, test_ratio=o.test_ratio, seed=o.seed)
        if o.as_json:
            typer.echo(json.dumps([t.model_dump() for t in tried]))
            return
        for t in tried[:5]:
            typer.echo(f"nDCG@10 {t.ndcg}: {t.settings}")
        typer.echo("best, for config.yaml:\nblend:\n" + "".join(f"  {key}: {value}\n" for key, value in tried[0].settings.items()))
        return
    ks = _numbers(o.k, int, "--k")
    weights = _numbers(o.sweep, float, "--sweep") if o.sweep.strip() else ()
    results = []
    for one in (("random", "temporal") if o.split == "both" else (o.split,)):
        with user_errors():
            results.append(evaluate_run(cfg, o.run, split=one, test_ratio=o.test_ratio, seed=o.seed, ks=ks, sweep=weights,
                                        plots=o.plots))
    if o.as_json:
        typer.echo(results[0].model_dump_json() if len(results) == 1 else
                   json.dumps({r.split: r.model_dump(mode="json") for r in results}))
        return
    for result in results:
        eval_table(result, ks)


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
    is wrong and was not repaired; a version a running refresh is still publishing is reported as in
    progress, not as a problem.

    \b
    Example:
        recs check --config config.yaml --repair
    """
    from recommend.config import load_config
    from recommend.run.commands.check import check_workdir

    _output(verbose, quiet)
    with user_errors():
        report = check_workdir(load_config(config, check_inputs=False), repair=repair)
    if as_json:
        typer.echo(report.model_dump_json())
    else:
        typer.echo(f"cache: {report.cache_vectors} vectors in sound files; runs: {report.runs} checked; "
                   f"versions: {report.versions if report.versions is not None else 'publishing is off'}")
        for run_id in report.in_progress:
            typer.echo(f"- version {run_id}: being published by the refresh running now (not a problem)")
        for f in report.findings:
            typer.echo(f"- {f.where}: {f.problem}" + (f" (repaired: {f.repaired})" if f.repaired else ""))
        typer.echo("all sound" if not report.findings else "ok after repairs" if report.ok else
                   "problems found" + ("" if repair else "; --repair moves damaged cache files aside and removes unfinished versions"))
    if not report.ok:
        raise typer.Exit(1)

