"""Pieces an external Dask cluster started by the tests imports: a scheduler plugin that records
which task ran on which worker. (The scheduler gets tests/ on its PYTHONPATH.)"""

from distributed.diagnostics.plugin import SchedulerPlugin
from distributed.utils import key_split


class TaskRecorder(SchedulerPlugin):
    """Every task that finished in memory: its key prefix and the worker that ran it."""

    name = "task-recorder"

    def __init__(self):
        self.ran: list[tuple[str, str]] = []

    def transition(self, key, start, finish, *args, stimulus_id=None, **kwargs):
        if finish == "memory" and kwargs.get("worker"):
            self.ran.append((key_split(key), kwargs["worker"]))


def ran(dask_scheduler=None) -> list:
    return dask_scheduler.plugins[TaskRecorder.name].ran
