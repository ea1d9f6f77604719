"""Progress on stderr (so stdout stays clean for --json): a line per stage and progress bars that
print plain lines every 10% when stderr is not a terminal (cron, CI logs)."""

from __future__ import annotations

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn


class Reporter:
    """Stage lines and progress bars on stderr, so stdout stays clean for --json."""

    def __init__(self, quiet: bool = False):
        self.console = Console(stderr=True, quiet=quiet, soft_wrap=True)  # whole lines in log files
        self.bars = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                             console=self.console, transient=False, disable=quiet)

    def say(self, text: str) -> None:
        self.console.print(text, highlight=False, markup=False)

    def bar(self, description: str, total: int):
        """A progress callback `advance(n)`. Off a terminal (cron, CI logs) a live bar draws nothing
        until the end, so a plain line is printed at every 10% instead."""
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
