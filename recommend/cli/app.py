"""`recs`: a thin command line over the library. Every command's --help ends with an example.

Errors meant for the user print one message to stderr and exit with its code (2: config or input,
1: not found or a failed check), never a traceback.
"""

from __future__ import annotations

import functools
import inspect
import typing
from contextlib import contextmanager
from dataclasses import fields

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
    from recommend.run.infra.progress import configure_logging

    configure_logging(verbose, quiet)


@contextmanager
def user_errors():
    try:
        yield
    except RecsError as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(exc.exit_code) from None


def options_from(options_class):
    """A command whose options are the fields of a dataclass (each field's default a typer.Option):
    typer reads them as the command's parameters, and the function receives one instance. For a
    command with more options than a readable parameter list holds (`recs eval`)."""
    hints = typing.get_type_hints(options_class)

    def wrap(fn):
        @functools.wraps(fn)
        def command(**given):
            return fn(options_class(**given))

        del command.__wrapped__  # typer reads the signature and annotations below, not the function's own
        command.__annotations__ = dict(hints)
        command.__signature__ = inspect.Signature([
            inspect.Parameter(f.name, inspect.Parameter.KEYWORD_ONLY, default=f.default, annotation=hints[f.name])
            for f in fields(options_class)])
        return command

    return wrap
