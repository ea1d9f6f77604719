"""Output on stderr (stdout stays clean for --json): stage lines, progress bars, and the `recs` logger.

Off a terminal (cron, CI logs) a live bar draws nothing until the end, so a bar prints a plain line
at every 10% instead.
"""

from __future__ import annotations

import logging

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn


STDERR_HANDLER = "recs-stderr"


def configure_logging(verbose: int = 0, quiet: bool = False) -> None:
    """The `recs` logger on stderr: warnings by default, info with one -v, debug with two, errors
    only with --quiet."""
    level = logging.ERROR if quiet else (logging.WARNING, logging.INFO, logging.DEBUG)[min(verbose, 2)]
    logger = logging.getLogger("recs")
    logger.setLevel(level)
    if not any(h.name == STDERR_HANDLER for h in logger.handlers):  # ours once, whatever else is attached
        handler = logging.StreamHandler()
        handler.name = STDERR_HANDLER
        handler.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
        logger.addHandler(handler)
    logger.propagate = False


class Reporter:
    """Stage lines and progress bars on stderr."""

    def __init__(self, quiet: bool = False):
        self.console = Console(stderr=True, quiet=quiet, soft_wrap=True)  # whole lines in log files
        self.bars = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                             console=self.console, transient=False, disable=quiet)

    def say(self, text: str) -> None:
        self.console.print(text, highlight=False, markup=False)

    def bar(self, description: str, total: int):
        """A progress callback `advance(n)` for a bar of `total` steps."""
        task = self.bars.add_task(description, total=total)
        state = {"done": 0, "shown": 0}
        live = self.console.is_terminal

        def advance(n: int = 1) -> None:
            self.bars.advance(task, n)
            state["done"] += n
            step = int(10 * state["done"] / max(total, 1))
            if not live and step > state["shown"]:
                state["shown"] = step
                self.say(f"  {description}: {state['done']}/{total}")

        return advance
