"""`recs`, the command line: `recommend.cli.app` holds the app and the options every command shares;
`batch` and `read` hold the commands; `output` shows their answers.
"""

from recommend.cli import batch, read  # noqa: F401 (their commands register on the app)
from recommend.cli.app import app


def main() -> None:
    app()
