"""Tasks on Dask workers with a bounded window in flight: the encode's chunks, the lists' blocks.

Every submitted task's arguments wait in the scheduler (in the driver's process on a LocalCluster),
so submitting a whole run's blocks at once would hold a second copy of them there. A few tasks per
task slot keep every worker busy; the next one is submitted as each finishes.

Example:
    for i, result in in_window(client, len(blocks), lambda i: client.submit(work, blocks[i], pure=False)):
        keep(i, result)
"""

from __future__ import annotations

import time
from typing import Callable, Iterator

PER_SLOT = 3  # tasks submitted ahead per worker thread: one running, the next ones already there


def task_slots(client) -> int:
    """Worker threads across the cluster (at least 1)."""
    return max(1, sum(int(w.get("nthreads", 1)) for w in client.scheduler_info()["workers"].values()))


def in_window(client, n_tasks: int, submit: Callable[[int], object], window: int | None = None
              ) -> Iterator[tuple[int, object]]:
    """Run tasks 0..n_tasks-1, `submit(i)` submitting task i and returning its future, with at most
    `window` (default PER_SLOT per task slot) in flight. Yields (i, result) in the order they finish;
    each future is released once yielded, so its worker drops the result."""
    from distributed import as_completed

    window = window or max(2, PER_SLOT * task_slots(client))
    number, pending = {}, as_completed()

    def launch(i: int) -> None:
        future = submit(i)
        number[future.key] = i
        pending.add(future)

    for i in range(min(window, n_tasks)):
        launch(i)
    following = min(window, n_tasks)
    for future in pending:
        result = future.result()
        i = number.pop(future.key)
        future.release()
        if following < n_tasks:
            launch(following)
            following += 1
        yield i, result


def task_key(fn: Callable) -> str:
    """A unique task key named after `fn` (its prefix is what the dashboard and tests see)."""
    return f"{fn.__name__.strip('_').replace('_', '-')}-{time.time_ns()}"


def one_task(client, fn: Callable, *args):
    """fn(*args) as one task on a worker, its result brought here (in this process without a client)."""
    if client is None:
        return fn(*args)
    future = client.submit(fn, *args, pure=False, key=task_key(fn))
    try:
        return future.result()
    finally:
        future.release()
